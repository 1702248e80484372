"""The trained models of a run: one LoRA adapter per role (or full weights), and the views every stage reads.

:class:`Policies` is the interface every stage uses; ``Policies(models, cfg)`` builds the class of
``training.method``: :class:`~expertchat.policies.lora.LoraPolicies` (``lora``, QLoRA on a 4-bit base) or
:class:`~expertchat.policies.full.FullPolicies` (``full``).

Decisions:

* **Reference = the round-start policy** (``training.reference=previous``). Each role keeps ONE adapter that
  continues training across rounds, so ``adapters/round_<r>/<role>/`` alone (on the base) is the policy of
  round r. At the start of a training stage the adapter is copied into a frozen ``<role>_start`` adapter,
  which serves as DPO reference and as the judge that the partner is scored by. Nothing is merged into the
  base, so this is exact also on a quantized (QLoRA) base, and works when both roles share one base. (TRL's
  own PEFT reference, the base with adapters disabled, is ``training.reference=base``.)
* **One base, two adapters** when actor and judge share weights (``models.load_pair``): the base is wrapped
  once by PEFT with adapters ``actor`` and ``judge``. Every stage reaches a model through a
  :class:`~expertchat.policies.views.ModelView`, which runs the shared base with its role's adapter (or the base,
  adapters disabled, before the role has one) and restores adapter, trainable flags and train/eval mode
  afterwards. While the actor trains, its judge is the judge's ``judge_start`` adapter (the base in round 0):
  frozen, eval mode, no grad; and the other way round.
* **Inference on merged copies** where they fit (``training.lora.merged_copies``, :mod:`expertchat.policies.merging`):
  a view calls a copy of base + adapter merged, made on first use and dropped when the adapter changes
  (training, loading). The round-start snapshot takes over its policy's copy, so at most three copies live at
  a time: the two policies between training stages (the two snapshots, the partners' judges, within one) and
  the base alone (a round-0 judge, the evaluation's frozen judge). The DPO reference stays unmerged, computed as
  the policy is: at a round's first step their log-probs are equal.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Self

import torch

from expertchat.config.schema import ROLES, TrainingConfig
from expertchat.engine.models import LoadedModel
from expertchat.errors import ExpertChatError
from expertchat.runs.store import RunStore

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
    """The other role: ``"actor"`` <-> ``"judge"``."""
    return "judge" if role == "actor" else "actor"


def adapter_dir(round_idx: int, role: str) -> str:
    """Where a round's adapter (or full weights) of ``role`` is saved, relative to the run folder."""
    return f"adapters/round_{round_idx}/{role}"


def check_weights(folder: Path, root: Path | None = None) -> None:
    """Every ``*.safetensors`` file under ``folder`` has a whole header whose tensors cover the file (safetensors'
    own reader checks that; it reads the header only, not the weights).

    Raises:
        ExpertChatError: one line naming the first bad file (relative to ``root``), its size and the cause.
    """
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            name = path.relative_to(root) if root is not None and path.is_relative_to(root) else path
            raise ExpertChatError(f"{name} is incomplete or corrupt ({path.stat().st_size} bytes; {exc}): an "
                                  f"interrupted copy or a full disk; copy it again (or rerun that round's training "
                                  f"into a copy of the run folder)") from None


def saved_folders(store: RunStore, round_idx: int) -> dict[str, str]:
    """``{role: folder}`` that round ``round_idx``'s training marker says it saved (empty before it is done)."""
    if not store.done(round_idx, "training"):
        return {}
    roles = store.stage_summary(round_idx, "training").get("roles", {})
    return {role: m["saved"] for role, m in roles.items() if isinstance(m, dict) and m.get("saved")}


def check_saved(store: RunStore, rounds: Iterable[int]) -> None:
    """Every policy the training markers of ``rounds`` say was saved is still there: a deleted folder (a quota,
    a partial copy) is never silently replaced by the base model, in a resume or in ``mode=eval``.

    Raises:
        ExpertChatError: one line naming the first missing folder, its marker and the ways on.
    """
    for r in rounds:
        for role, folder in saved_folders(store, r).items():
            if not store.path(folder).is_dir():
                raise ExpertChatError(
                    f"{folder} is missing, but stages/round_{r}.training.json says round {r} saved {role}'s policy "
                    f"there: copy the folder back, or rerun from round {r}'s training in a copy of the run folder "
                    f"without that marker and the ones after it (the base model never stands in for it)")


# ------------------------------------------------------------------------------------------------- policies


class Policies(abc.ABC):
    """The trained models of a run, and the views every stage uses.

    ``models`` (a role -> :class:`LoadedModel` dict) is what the dialogue and rating stages get: each role's
    current policy. ``Policies(models, cfg)`` returns the subclass registered for ``cfg.method``:
    :class:`~expertchat.policies.lora.LoraPolicies` (one PEFT adapter per role on its base) or
    :class:`~expertchat.policies.full.FullPolicies` (each role owns its weights). The training stage
    (``training.train_round``) drives it: :meth:`round_start`, then per role :meth:`policy`, TRL,
    :meth:`after_training`, :meth:`mark_trained` and :meth:`save`.

    Args:
        models: ``{"actor": ..., "judge": ...}`` as ``models.load_pair`` returns them (may share one model).
        cfg: the training config.

    Raises:
        ExpertChatError: ``training.method=full`` on a quantized model; a method no subclass implements.
    """

    _methods: ClassVar[dict[str, type[Policies]]] = {}  # training.method -> its subclass

    def __init_subclass__(cls, method: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method is not None:
            Policies._methods[method] = cls

    def __new__(cls, models: dict[str, LoadedModel], cfg: TrainingConfig) -> Self:
        if cls is not Policies:  # a subclass, named directly
            return super().__new__(cls)
        if cfg.method not in Policies._methods:
            raise ExpertChatError(f"training.method={cfg.method} has no implementation; use "
                                  f"{' or '.join(sorted(Policies._methods))}")
        return super().__new__(Policies._methods[cfg.method])

    def __init__(self, models: dict[str, LoadedModel], cfg: TrainingConfig) -> None:
        self.cfg = cfg
        self.base = dict(models)  # role -> its model (LoRA: the plain base, PEFT wraps it in place)
        self._trained: set[str] = set()  # roles that have an adapter (or trained full weights)
        # during a training stage: role -> its round-start snapshot (LoRA: the adapter's name; full: TRL's copy)
        self._start: dict[str, Any] = {}
        self.models: dict[str, LoadedModel] = {}  # role -> the view of its current policy (set by subclasses)

    # ---- views
    @abc.abstractmethod
    def frozen(self, role: str) -> LoadedModel:
        """``role`` as it was at the start of the current training stage: the judge its partner is scored by.
        Without a snapshot (outside a stage, or before the role had an adapter) LoRA gives the base with adapters
        disabled, full fine-tuning the role's current weights."""

    @abc.abstractmethod
    def describe(self, role: str, what: str) -> str:
        """Which weights serve as ``role``'s judge-view or reference in the current stage, in words.

        Args:
            role: ``"actor"`` or ``"judge"``.
            what: ``"judge"`` or ``"reference"``.
        """

    def amp(self, role: str) -> torch.dtype | None:
        """Full fine-tuning: the half dtype ``role``'s weights loaded in (autocast on a GPU); else None."""
        return None

    # ---- a training stage
    @contextlib.contextmanager
    def round_start(self) -> Iterator[None]:
        """A training stage: within it each role's round-start snapshot is its frozen judge-view and reference;
        dropped on leaving (also on failure)."""
        self._snapshot()
        try:
            yield
        finally:
            self._release_snapshots()
            self._start = {}

    @abc.abstractmethod
    def _snapshot(self) -> None:
        """Reset ``_start``, then freeze each role's current policy as its round-start copy."""

    @abc.abstractmethod
    def _release_snapshots(self) -> None:
        """Free what the round-start snapshots in ``_start`` hold (before ``_start`` is emptied)."""

    @abc.abstractmethod
    def policy(self, role: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """The module TRL trains for ``role``, and the reference it compares against (None: TRL's own copy)."""

    def after_training(self, role: str, ref_model: torch.nn.Module | None) -> None:
        """Put ``role``'s base back to inference (eval mode, KV cache on), also after a failed run.

        Args:
            role: the role that trained.
            ref_model: the trainer's reference model (full fine-tuning: TRL's round-start copy, which then
                judges the partner for the rest of the stage); None when the trainer was never built.
        """
        model = self.base[role].model
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
            model.config.use_cache = True
        self._end_training(role, ref_model)
        model.eval()

    def _end_training(self, role: str, ref_model: torch.nn.Module | None) -> None:
        """What the method does after TRL, before ``role``'s base goes back to eval mode: nothing by default."""

    def mark_trained(self, role: str) -> None:
        """From now on ``role``'s view runs its own adapter (or trained weights)."""
        self._trained.add(role)

    def use_base(self, role: str) -> None:
        """From now on ``role``'s view runs its base model, untrained (the cross-play league's ``base`` point).

        Raises:
            ExpertChatError: the method keeps no base apart from the trained weights (``training.method=full``).
        """
        raise ExpertChatError(f"training.method={self.cfg.method} trains the weights in place: its base is gone "
                              f"once a round is loaded")

    # ---- saving and loading
    def save(self, store: RunStore, round_idx: int, role: str, card: str = "") -> str:
        """Save ``role``'s policy to ``adapters/round_<r>/<role>/`` with ``card`` as README.md.

        LoRA saves a PEFT adapter naming its base by :func:`models.base_name` (so it loads on another machine),
        full fine-tuning the weights and tokenizer. Written in the store's scratch folder, then moved into place.

        Returns:
            The folder, relative to the run folder.
        """
        folder = root = store.scratch() / f"save-{round_idx}-{role}"  # written in full, then moved into place
        folder = self._save_weights(role, folder)
        if card:
            (folder / "README.md").write_text(card, encoding="utf-8")
        store.publish(folder, adapter_dir(round_idx, role), written_in=root)
        return adapter_dir(round_idx, role)

    @abc.abstractmethod
    def _save_weights(self, role: str, folder: Path) -> Path:
        """Write ``role``'s policy under ``folder``; returns the folder that holds it (to publish)."""

    def load(self, store: RunStore, round_idx: int, role: str) -> None:
        """Load ``role``'s policy saved by round ``round_idx``.

        Raises:
            ExpertChatError: LoRA, but the folder holds no adapter (a run trained with ``method=full``); a weights
                file that is cut or corrupt (:func:`check_weights`).
        """
        folder = store.path(adapter_dir(round_idx, role))
        check_weights(folder, store.root)
        self._load_weights(role, folder)
        self._trained.add(role)
        log.info("loaded %s's policy from %s", role, folder)

    @abc.abstractmethod
    def _load_weights(self, role: str, folder: Path) -> None:
        """Load ``role``'s policy from ``folder`` (absolute), as :meth:`_save_weights` wrote it."""

    def restore(self, store: RunStore, rounds: int) -> int | None:
        """On resume: load each role's policy from the last completed training stage that saved it. Returns
        that round (None when no policy was saved yet)."""
        check_saved(store, range(rounds))
        last = None
        for role in ROLES:
            for r in reversed(range(rounds)):
                if store.done(r, "training") and store.path(adapter_dir(r, role)).is_dir():
                    self.load(store, r, role)
                    last = r if last is None else max(last, r)
                    break
        return last
