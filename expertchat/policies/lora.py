"""LoRA policies (``training.method=lora``, QLoRA on a 4-bit base): one PEFT adapter per role on its base, a frozen
``<role>_start`` adapter per role during a training stage, views that switch adapters per call (or run merged
copies). The decisions behind it: :mod:`expertchat.policies.adapters`."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from expertchat.config.schema import ROLES, TrainingConfig
from expertchat.engine.models import LoadedModel, base_name, is_quantized
from expertchat.errors import ExpertChatError
from expertchat.policies.adapters import Policies, quiet
from expertchat.policies.merging import MergedCopies
from expertchat.policies.views import AdapterSwitch, ModelView, Reference


def freeze_adapter(peft: Any, name: str) -> None:
    """Make the LoRA weights of adapter ``name`` untrainable (PEFT names them ``...lora_A.<name>.weight``)."""
    for n, p in peft.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)


class LoraPolicies(Policies, method="lora"):
    """One LoRA adapter per role (see :class:`~expertchat.policies.adapters.Policies` for the interface).

    A base is wrapped by PEFT once, on the first training stage or resume, with one adapter per role using it
    (two adapters, ``actor`` and ``judge``, when both roles share the base). Until then a role's view runs the
    plain base. Each view is a :class:`~expertchat.policies.views.ModelView` that computes with its role's
    adapter (or a merged copy of base + adapter, :attr:`merged`) and restores the base's state afterwards.

    Args:
        models: ``{"actor": ..., "judge": ...}`` as ``models.load_pair`` returns them (may share one model).
        cfg: the training config (``cfg.lora``: the adapter's shape and ``merged_copies``).
    """

    def __init__(self, models: dict[str, LoadedModel], cfg: TrainingConfig) -> None:
        super().__init__(models, cfg)
        self._peft: dict[int, Any] = {}  # id(base model) -> its PEFT wrapper
        self._switch: dict[int, AdapterSwitch] = {}  # id(base model) -> its adapter switch
        self.merged = MergedCopies(cfg.lora.merged_copies)  # inference on base + adapter merged, when it fits
        self.models = {role: self._view(role, self._policy_adapter) for role in ROLES}

    # ---- views
    def use_base(self, role: str) -> None:
        self._trained.discard(role)  # the view then runs with adapters disabled; the adapter stays loaded

    def _policy_adapter(self, role: str) -> str | None:
        return role if role in self._trained else None

    def _start_adapter(self, role: str) -> str | None:
        return self._start.get(role)

    def _view(self, role: str, adapter: Callable[[str], str | None]) -> LoadedModel:
        """``role``'s base computing with the adapter that ``adapter(role)`` names at call time (None: none)."""
        lm = self.base[role]
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
        """``role``'s ``<role>_start`` adapter, or the base (adapters disabled) outside a stage or before the role
        had an adapter: the judge its partner is scored by."""
        return self._view(role, self._start_adapter)

    def describe(self, role: str, what: str) -> str:
        """Which weights serve as ``role``'s judge-view or reference (``what``) in the current stage, in words."""
        if what == "reference" and self.cfg.reference == "base":
            return "base, adapters disabled"
        start = self._start.get(role)
        return f"{role} adapter at round start (frozen copy '{start}')" if start else "base, adapters disabled"

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

    # ---- a training stage
    def _snapshot(self) -> None:
        """Copy each trained role's adapter into a frozen adapter ``<role>_start``, which takes over the policy's
        merged copy (if any)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        self._start = {}
        for role in sorted(self._trained):
            peft = self._peft_of(role)
            name = f"{role}_start"
            if name not in peft.peft_config:
                peft.add_adapter(name, copy.deepcopy(peft.peft_config[role]))
            set_peft_model_state_dict(peft, get_peft_model_state_dict(peft, adapter_name=role), adapter_name=name)
            freeze_adapter(peft, name)
            self.merged.rename(peft, role, name)  # the policy's merged copy (if any) serves the snapshot
            self._start[role] = name

    def _release_snapshots(self) -> None:
        """Drop the snapshots' merged copies (the ``<role>_start`` adapters stay, overwritten next stage)."""
        for role, name in self._start.items():
            self.merged.drop(self._peft_of(role), name)

    def policy(self, role: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """The PEFT wrapper with ``role``'s adapter active and trainable (every other adapter frozen), and its
        reference: the ``<role>_start`` adapter (``training.reference=previous``; the base in round 0) or the
        base with adapters disabled (``base``), computed unmerged as the policy is."""
        peft = self._wrap(role)
        peft.set_adapter(role)  # active and trainable; every other adapter frozen
        for name in self._start.values():
            freeze_adapter(peft, name)
        self.merged.drop(peft, role)  # its weights are about to change
        raw = self.base[role].model
        ref_adapter = self._start.get(role) if self.cfg.reference == "previous" else None
        # unmerged, as the policy computes: at the first step the policy's log-probs equal the reference's exactly
        return peft, Reference(ModelView(raw, lambda: (self._switch.get(id(raw)), ref_adapter)))

    def mark_trained(self, role: str) -> None:
        """From now on ``role``'s view runs its own adapter; its stale merged copy (if any) is dropped."""
        super().mark_trained(role)
        self.merged.drop(self._peft_of(role), role)

    # ---- saving and loading
    def _save_weights(self, role: str, folder: Path) -> Path:
        """PEFT puts a non-default adapter in a sub-folder named after it: ``folder/<role>``, returned. Its
        ``adapter_config.json`` names the base by :func:`models.base_name`."""
        self._peft_of(role).save_pretrained(str(folder), selected_adapters=[role],
                                            save_embedding_layers=False)  # LoRA never trains them
        folder = folder / role
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base_name(self.base[role].cfg)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        return folder

    def _load_weights(self, role: str, folder: Path) -> None:
        """Load the adapter in ``folder`` as ``role``'s (replacing any) and drop its stale merged copy.

        Raises:
            ExpertChatError: ``folder`` holds no ``adapter_config.json`` (a run trained with ``method=full``).
        """
        if not (folder / "adapter_config.json").exists():
            raise ExpertChatError(f"no adapter at {folder} (adapter_config.json missing): a run trained with "
                                  f"training.method=full cannot resume with method=lora")
        self.merged.drop(self._wrap(role, load_from=str(folder)), role)
