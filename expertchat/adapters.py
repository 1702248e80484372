"""The trained models of a run: one LoRA adapter per role (or full weights), and the views every stage reads.

Decisions:

* **Reference = the round-start policy** (``training.reference=previous``). Each role keeps ONE adapter that
  continues training across rounds, so ``adapters/round_<r>/<role>/`` alone (on the base) is the policy of
  round r. At the start of a training stage the adapter is copied into a frozen ``<role>_start`` adapter,
  which serves as DPO reference and as the judge that the partner is scored by. Nothing is merged into the
  base, so this is exact also on a quantized (QLoRA) base, and works when both roles share one base. (TRL's
  own PEFT reference, the base with adapters disabled, is ``training.reference=base``.)
* **One base, two adapters** when actor and judge share weights (``models.load_pair``): the base is wrapped
  once by PEFT with adapters ``actor`` and ``judge``. Every stage reaches a model through a
  :class:`~expertchat.views.ModelView`, which runs the shared base with its role's adapter (or the base,
  adapters disabled, before the role has one) and restores adapter, trainable flags and train/eval mode
  afterwards. While the actor trains, its judge is the judge's ``judge_start`` adapter (the base in round 0):
  frozen, eval mode, no grad; and the other way round.
* **Inference on merged copies** where they fit (``training.lora.merged_copies``, :mod:`expertchat.merging`):
  a view calls a copy of base + adapter merged, made on first use and dropped when the adapter changes
  (training, loading). The round-start snapshot takes over its policy's copy, so at most three copies live at
  a time: the two policies between training stages (the two snapshots, the partners' judges, within one) and
  the base alone (a round-0 judge, the evaluation's frozen judge). The DPO reference stays unmerged, computed as
  the policy is: at a round's first step their log-probs are equal.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from expertchat.config import TrainingConfig
from expertchat.dialogue import ROLES
from expertchat.errors import ExpertChatError
from expertchat.merging import MergedCopies
from expertchat.models import LoadedModel, base_name, is_quantized
from expertchat.store import RunStore
from expertchat.views import AdapterSwitch, ModelView, Reference

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """PEFT 0.21 and TRL 1.16 read ``model.is_gradient_checkpointing``, deprecated by transformers 5: a
    FutureWarning at every wrap and training step that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`is_gradient_checkpointing` is deprecated.*",
                                category=FutureWarning)
        yield


def partner(role: str) -> str:
    return "judge" if role == "actor" else "actor"


def adapter_dir(round_idx: int, role: str) -> str:
    """Where a round's adapter (or full weights) of ``role`` is saved, relative to the run folder."""
    return f"adapters/round_{round_idx}/{role}"


def freeze_adapter(peft: Any, name: str) -> None:
    """Make the LoRA weights of adapter ``name`` untrainable (PEFT names them ``...lora_A.<name>.weight``)."""
    for n, p in peft.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)


# ------------------------------------------------------------------------------------------------- policies


class Policies:
    """The trained models of a run, and the views every stage uses.

    ``models`` (a role -> :class:`LoadedModel` dict) is what the dialogue and rating stages get: each role's
    current policy. With LoRA a base is wrapped by PEFT once, on the first training stage or resume, with one
    adapter per role using it (two adapters when both roles share the base). With ``training.method=full``
    each role owns its weights (a shared base is copied for the judge once, at start). The training stage
    (``training.train_round``) drives it: :meth:`round_start`, then per role :meth:`policy`, TRL,
    :meth:`after_training`, :meth:`mark_trained` and :meth:`save`.

    Args:
        models: ``{"actor": ..., "judge": ...}`` as ``models.load_pair`` returns them (may share one model).
        cfg: the training config.

    Raises:
        ExpertChatError: ``training.method=full`` on a quantized model.
    """

    def __init__(self, models: dict[str, LoadedModel], cfg: TrainingConfig) -> None:
        self.cfg = cfg
        self.base = dict(models)
        self._amp: dict[str, torch.dtype] = {}  # full fine-tuning: role -> the half dtype its weights loaded in
        if cfg.method == "full":
            self._prepare_full(models)
        self._peft: dict[int, Any] = {}  # id(base model) -> its PEFT wrapper
        self._switch: dict[int, AdapterSwitch] = {}  # id(base model) -> its adapter switch
        self._trained: set[str] = set()  # roles that have an adapter (or trained full weights)
        self._start: dict[str, Any] = {}  # during a training stage: role -> its round-start snapshot
        self.merged = MergedCopies(cfg.lora.merged_copies)  # inference on base + adapter merged, when it fits
        self.models = {role: self._view(role, self._policy_adapter) for role in ROLES}

    def _prepare_full(self, models: dict[str, LoadedModel]) -> None:
        """Full fine-tuning: each role gets its own fp32 weights, frozen except while the role trains (a
        judge's forward then builds no graph)."""
        if models["actor"].model is models["judge"].model:
            judge = models["judge"]
            log.info("full fine-tuning: the judge gets its own copy of the shared weights")
            self.base["judge"] = LoadedModel(judge.name, copy.deepcopy(judge.model), judge.tokenizer, judge.cfg)
        for role, lm in self.base.items():
            if is_quantized(lm.model):
                raise ExpertChatError(f"training.method=full cannot train the quantized {role} model "
                                      f"'{lm.name}': use training.method=lora (QLoRA) or {role}.load_in_4bit=false")
            if lm.model.dtype in (torch.float16, torch.bfloat16):
                # AdamW on half-precision weights loses most updates (bf16: 5e-5 vanishes against |w| > 0.01)
                # and AMP refuses fp16 gradients: train fp32 weights (mixed precision on a GPU).
                log.warning("full fine-tuning: %s's weights upcast from %s to float32 (half-precision updates "
                            "vanish); set %s.dtype=float32 to load them so", lm.name,
                            str(lm.model.dtype).removeprefix("torch."), role)
                self._amp[role] = lm.model.dtype  # kept as the autocast dtype on a GPU
                lm.model.float()
            lm.model.requires_grad_(False)

    # ---- views
    def _policy_adapter(self, role: str) -> str | None:
        return role if role in self._trained else None

    def _start_adapter(self, role: str) -> str | None:
        return self._start.get(role)

    def _view(self, role: str, adapter: Callable[[str], str | None]) -> LoadedModel:
        lm = self.base[role]
        if self.cfg.method == "full":
            return lm
        raw = lm.model
        view = ModelView(raw, lambda: (self._switch.get(id(raw)), adapter(role)),
                         lambda: self._merged_copy(raw, adapter(role)))
        return LoadedModel(lm.name, view, lm.tokenizer, lm.cfg)

    def _merged_copy(self, raw: torch.nn.Module, adapter: str | None) -> torch.nn.Module | None:
        """The merged copy of ``raw`` + ``adapter`` (None: the base) a view calls; None: no PEFT wrapper yet (the
        plain model), or run unmerged."""
        peft = self._peft.get(id(raw))
        return None if peft is None else self.merged.get(peft, adapter)

    def frozen(self, role: str) -> LoadedModel:
        """``role`` as it was at the start of the current training stage (its ``<role>_start`` adapter, or the
        base before it had one): the judge its partner is scored by."""
        if self.cfg.method == "full":
            lm = self.base[role]
            start = self._start.get(role)
            return lm if start is None else LoadedModel(lm.name, start, lm.tokenizer, lm.cfg)
        return self._view(role, self._start_adapter)

    def describe(self, role: str, what: str) -> str:
        """Which weights serve as ``role``'s judge-view or reference in the current stage, in words."""
        if self.cfg.method == "full":
            return f"{role} full weights at round start"
        if what == "reference" and self.cfg.reference == "base":
            return "base, adapters disabled"
        start = self._start.get(role)
        return f"{role} adapter at round start (frozen copy '{start}')" if start else "base, adapters disabled"

    def amp(self, role: str) -> torch.dtype | None:
        """Full fine-tuning: the half dtype ``role``'s weights loaded in (autocast on a GPU); else None."""
        return self._amp.get(role)

    # ---- adapters
    def _lora_config(self):
        from peft import LoraConfig

        lora = self.cfg.lora
        targets = list(lora.target_modules)
        return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=targets[0] if targets == ["all-linear"] else targets, bias="none",
                          task_type="CAUSAL_LM")

    def _peft_of(self, role: str) -> Any:
        """The PEFT wrapper of ``role``'s base (once it has one)."""
        return self._peft[id(self.base[role].model)]

    def _wrap(self, role: str, load_from: str | None = None):
        """The PEFT wrapper of ``role``'s base with an adapter named ``role`` (new, or loaded from a folder)."""
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

        raw = self.base[role].model
        peft = self._peft.get(id(raw))
        if peft is None:
            if is_quantized(raw):
                prepare_model_for_kbit_training(raw, use_gradient_checkpointing=self.cfg.gradient_checkpointing)
            with quiet():
                if load_from:
                    peft = PeftModel.from_pretrained(raw, load_from, adapter_name=role, is_trainable=True)
                else:
                    peft = get_peft_model(raw, self._lora_config(), adapter_name=role)
            self._peft[id(raw)] = peft
            self._switch[id(raw)] = AdapterSwitch(peft)
        elif load_from:
            if role in peft.peft_config:
                peft.delete_adapter(role)
            peft.load_adapter(load_from, adapter_name=role, is_trainable=True)
        elif role not in peft.peft_config:
            peft.add_adapter(role, self._lora_config())
        peft.eval()
        return peft

    @contextlib.contextmanager
    def round_start(self) -> Iterator[None]:
        """A training stage: within it each role's round-start snapshot is its frozen judge-view and reference;
        dropped on leaving (also on failure)."""
        self._snapshot()
        try:
            yield
        finally:
            if self.cfg.method != "full":  # full fine-tuning's snapshots are TRL's reference models, not adapters
                for role, name in self._start.items():
                    self.merged.drop(self._peft_of(role), name)
            self._start = {}

    def _snapshot(self) -> None:
        """Freeze each role's current policy as its round-start copy (LoRA: adapter ``<role>_start``)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        self._start = {}
        if self.cfg.method == "full":
            return  # the round-start copies are the references TRL makes, kept after each role trains
        for role in sorted(self._trained):
            peft = self._peft_of(role)
            name = f"{role}_start"
            if name not in peft.peft_config:
                peft.add_adapter(name, copy.deepcopy(peft.peft_config[role]))
            set_peft_model_state_dict(peft, get_peft_model_state_dict(peft, adapter_name=role), adapter_name=name)
            freeze_adapter(peft, name)
            self.merged.rename(peft, role, name)  # the policy's merged copy (if any) serves the snapshot
            self._start[role] = name

    def policy(self, role: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """The module TRL trains for ``role``, and the reference it compares against (None: TRL's own copy)."""
        if self.cfg.method == "full":
            model = self.base[role].model
            for p in model.parameters():
                p.requires_grad_(True)
            return model, None  # TRL deep-copies the model at trainer init: the round-start policy
        peft = self._wrap(role)
        peft.set_adapter(role)  # active and trainable; every other adapter frozen
        for name in self._start.values():
            freeze_adapter(peft, name)
        self.merged.drop(peft, role)  # its weights are about to change
        raw = self.base[role].model
        ref_adapter = self._start.get(role) if self.cfg.reference == "previous" else None
        # unmerged, as the policy computes: at the first step the policy's log-probs equal the reference's exactly
        return peft, Reference(ModelView(raw, lambda: (self._switch.get(id(raw)), ref_adapter)))

    def after_training(self, role: str, ref_model: torch.nn.Module | None) -> None:
        """Put ``role``'s base back to inference (eval mode, KV cache on), also after a failed run. Full
        fine-tuning: the weights are frozen again, and the trainer's ``ref_model`` (TRL's round-start copy) judges
        the partner for the rest of the stage."""
        model = self.base[role].model
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
            model.config.use_cache = True
        if self.cfg.method == "full":
            if ref_model is not None and role not in self._start:
                self._start[role] = ref_model
            for p in model.parameters():
                p.requires_grad_(False)
        model.eval()

    def mark_trained(self, role: str) -> None:
        """From now on ``role``'s view runs its own adapter (or trained weights)."""
        self._trained.add(role)
        if self.cfg.method != "full":
            self.merged.drop(self._peft_of(role), role)

    # ---- saving and loading
    def save(self, store: RunStore, round_idx: int, role: str, card: str = "") -> str:
        """Save ``role``'s policy to ``adapters/round_<r>/<role>/`` (a PEFT adapter naming its base by
        :func:`models.base_name`, so it loads on another machine; or full weights) with ``card`` as README.md."""
        lm = self.base[role]
        folder = root = store.scratch() / f"save-{round_idx}-{role}"  # written in full, then moved into place
        if self.cfg.method == "full":
            lm.model.save_pretrained(folder)
            lm.tokenizer.save_pretrained(folder)
        else:  # PEFT puts a non-default adapter in a sub-folder named after it
            self._peft_of(role).save_pretrained(str(folder), selected_adapters=[role],
                                                save_embedding_layers=False)  # LoRA never trains them
            folder = folder / role
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = base_name(lm.cfg)
            (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        if card:
            (folder / "README.md").write_text(card, encoding="utf-8")
        store.publish(folder, adapter_dir(round_idx, role), written_in=root)
        return adapter_dir(round_idx, role)

    def load(self, store: RunStore, round_idx: int, role: str) -> None:
        """Load ``role``'s policy saved by round ``round_idx``.

        Raises:
            ExpertChatError: LoRA, but the folder holds no adapter (a run trained with ``method=full``).
        """
        folder = store.path(adapter_dir(round_idx, role))
        if self.cfg.method == "full":
            from transformers import AutoModelForCausalLM

            raw = self.base[role].model
            saved = AutoModelForCausalLM.from_pretrained(folder, dtype=raw.dtype)
            raw.load_state_dict(saved.state_dict())
        else:
            if not (folder / "adapter_config.json").exists():
                raise ExpertChatError(f"no adapter at {folder} (adapter_config.json missing): a run trained with "
                                      f"training.method=full cannot resume with method=lora")
            self.merged.drop(self._wrap(role, load_from=str(folder)), role)
        self._trained.add(role)
        log.info("loaded %s's policy from %s", role, folder)

    def restore(self, store: RunStore, rounds: int) -> int | None:
        """On resume: load each role's policy from the last completed training stage that saved it. Returns
        that round (None when no policy was saved yet)."""
        last = None
        for role in ROLES:
            for r in reversed(range(rounds)):
                if store.done(r, "training") and store.path(adapter_dir(r, role)).is_dir():
                    self.load(store, r, role)
                    last = r if last is None else max(last, r)
                    break
        return last
