"""Full fine-tuning policies (``training.method=full``): each role owns its fp32 weights, trained in place; the
round-start snapshot of a role is the reference copy TRL makes of it."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from expertchat.config.schema import ROLES, TrainingConfig
from expertchat.engine.layout import transpose_linear_weights
from expertchat.engine.models import LoadedModel, is_quantized
from expertchat.errors import ExpertChatError
from expertchat.policies.adapters import Policies

log = logging.getLogger(__name__)


class FullPolicies(Policies, method="full"):
    """Each role owns its weights (see :class:`~expertchat.policies.adapters.Policies` for the interface).

    A base both roles share is copied for the judge once, here. Half-precision weights are upcast to float32
    (the half dtype is kept for autocast, :meth:`amp`), and every weight is frozen except while its role trains,
    so that a judge's forward builds no graph. A role's view is its model itself.

    Args:
        models: ``{"actor": ..., "judge": ...}`` as ``models.load_pair`` returns them (may share one model).
        cfg: the training config.

    Raises:
        ExpertChatError: a model is quantized (4-bit weights cannot be trained in full).
    """

    def __init__(self, models: dict[str, LoadedModel], cfg: TrainingConfig) -> None:
        super().__init__(models, cfg)
        self._amp: dict[str, torch.dtype] = {}  # role -> the half dtype its weights loaded in
        self._prepare(models)
        self.models = {role: self.base[role] for role in ROLES}

    def _prepare(self, models: dict[str, LoadedModel]) -> None:
        """Give each role its own fp32 weights, frozen."""
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
                transpose_linear_weights(lm.model)  # fp32 now: the CPU's faster layout (engine/layout.py)
            lm.model.requires_grad_(False)

    # ---- views
    def frozen(self, role: str) -> LoadedModel:
        """``role``'s weights at the start of the current training stage once it has trained in it (TRL's
        reference copy), else its current weights: the judge its partner is scored by."""
        lm = self.base[role]
        start = self._start.get(role)
        return lm if start is None else LoadedModel(lm.name, start, lm.tokenizer, lm.cfg)

    def describe(self, role: str, what: str) -> str:
        """Which weights serve as ``role``'s judge-view or reference (``what``) in the current stage, in words."""
        return f"{role} full weights at round start"

    def amp(self, role: str) -> torch.dtype | None:
        """The half dtype ``role``'s weights loaded in (autocast on a GPU); None when they loaded in float32."""
        return self._amp.get(role)

    # ---- a training stage
    def _snapshot(self) -> None:
        """Nothing to copy: the round-start copies are the references TRL makes, kept by :meth:`_end_training`."""
        self._start = {}

    def _release_snapshots(self) -> None:
        """Nothing to free beyond ``_start`` itself (TRL's reference copies)."""

    def policy(self, role: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """``role``'s own weights, made trainable, and None: TRL deep-copies the model at trainer init, and that
        copy (the round-start policy) is the reference."""
        model = self.base[role].model
        for p in model.parameters():
            p.requires_grad_(True)
        return model, None

    def _end_training(self, role: str, ref_model: torch.nn.Module | None) -> None:
        """Freeze ``role``'s weights again; the trainer's ``ref_model`` (TRL's round-start copy) judges the
        partner for the rest of the stage."""
        if ref_model is not None and role not in self._start:
            self._start[role] = ref_model
        for p in self.base[role].model.parameters():
            p.requires_grad_(False)

    # ---- saving and loading
    def _save_weights(self, role: str, folder: Path) -> Path:
        """The weights and tokenizer, ``save_pretrained`` into ``folder`` (returned)."""
        lm = self.base[role]
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
        return folder

    def _load_weights(self, role: str, folder: Path) -> None:
        """Copy the weights saved in ``folder`` into ``role``'s model, in place (its dtype kept)."""
        from transformers import AutoModelForCausalLM

        raw = self.base[role].model
        saved = AutoModelForCausalLM.from_pretrained(folder, dtype=raw.dtype)
        raw.load_state_dict(saved.state_dict())
