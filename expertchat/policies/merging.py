"""Merged copies: a role's LoRA adapter folded into a copy of its base, so that inference runs at the base's speed.

Unmerged, every adapted linear layer computes ``x W + s * (x A) B`` and PEFT dispatches per layer and call:
SmolLM2-135M decoded at 75-79 tok/s through its adapters against 99-106 tok/s without (issue 13). A merged copy
computes ``x (W + s * B A)`` (Hu et al., 2021, section 4.1): the base's cost. The base itself is never changed:
merging in place and unmerging again drifts in half precision, and one shared base serves both roles. So a
copy costs the base's size once per adapter in use; the pipeline holds at most three at a time (see
:class:`~expertchat.policies.adapters.Policies`).

Chosen by ``training.lora.merged_copies``:

* ``auto``: merge when the base is not quantized (the merged weights of a 4-bit base would be rounded again), sits
  on one device, and the copy takes at most half of that device's free memory; otherwise the unmerged path,
  said once per base in the log;
* ``always``: merge wherever possible, a one-line error where it is not;
* ``never``: the unmerged path (PEFT's layers switched per call).

In float32 the merged and unmerged paths agree to rounding (the tests check logits and greedy tokens); in bf16
``W + s * B A`` is rounded to bf16 once, so logits differ in the last bits and sampled text can differ.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from expertchat.engine.models import is_quantized
from expertchat.errors import ExpertChatError

log = logging.getLogger(__name__)

MODES = ("auto", "always", "never")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (what a copy costs), LoRA weights included."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device`` in bytes: ``torch.cuda.mem_get_info`` on a GPU, available RAM (psutil) else."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def why_not(peft: Any) -> str | None:
    """Why ``peft``'s base cannot get a merged copy here, or None when it can (memory checked at the moment)."""
    model = peft.get_base_model()
    if is_quantized(model):
        return "the base is quantized"
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        return f"the base is spread over {len(devices)} devices"
    need, free = weight_bytes(model), free_bytes(devices.pop())
    if need > free / 2:
        return f"a copy needs {need / 2**30:.2f} GB and the device has {free / 2**30:.2f} GB free (at most half is used)"
    return None


def merged_copy(peft: Any, adapter: str | None) -> torch.nn.Module:
    """A new plain model: ``peft``'s base with ``adapter`` merged into its weights (PEFT's ``merge_and_unload``
    on a deep copy; ``None``: the base alone, ``unload``), frozen, in eval mode. ``peft`` is left as it was."""
    clone = copy.deepcopy(peft)
    model = clone.unload() if adapter is None else clone.merge_and_unload(adapter_names=[adapter])
    model.requires_grad_(False)
    return model.eval()


class MergedCopies:
    """The merged copies in use, one per (PEFT-wrapped base, adapter name).

    A copy is made on first use (:meth:`get`) and stays valid until the adapter's weights change: the owner calls
    :meth:`drop` then (after training, after loading), or :meth:`rename` when an adapter's weights are copied
    under a new name (the round-start snapshot takes over the policy's copy instead of building its own).

    Args:
        mode: ``training.lora.merged_copies``: ``auto``, ``always`` or ``never``.
    """

    def __init__(self, mode: str = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"merged copies: mode '{mode}' is not one of {MODES}")
        self.mode = mode
        self._copies: dict[tuple[int, str | None], torch.nn.Module] = {}
        self._unmerged: set[int] = set()  # bases 'auto' decided to run unmerged (said once)
        self.built = 0  # copies made so far (for tests and the log)

    def get(self, peft: Any, adapter: str | None) -> torch.nn.Module | None:
        """The merged copy of ``peft``'s base with ``adapter`` (``None``: the base without its LoRA layers, e.g. a
        round-0 judge, whose unmerged path still runs every disabled layer and switch), made on first use; None:
        run unmerged.

        Raises:
            ExpertChatError: ``always``, and this base cannot get a copy (quantized, spread over devices, or short
                of memory).
        """
        if self.mode == "never":
            return None
        key = (id(peft), adapter)
        found = self._copies.get(key)
        if found is not None:
            return found
        if id(peft) in self._unmerged:
            return None
        reason = why_not(peft)
        if reason is not None:
            if self.mode == "always":
                raise ExpertChatError(f"training.lora.merged_copies=always: cannot copy adapter '{adapter}': "
                                      f"{reason}; use auto or never")
            log.info("adapters run unmerged (training.lora.merged_copies=auto): %s", reason)
            self._unmerged.add(id(peft))
            return None
        self._copies[key] = merged_copy(peft, adapter)
        self.built += 1
        return self._copies[key]

    def drop(self, peft: Any, adapter: str) -> None:
        """Forget the copy of ``adapter`` (its weights changed, or it is no longer used)."""
        self._copies.pop((id(peft), adapter), None)

    def rename(self, peft: Any, old: str, new: str) -> None:
        """Adapter ``new`` now holds the weights of ``old``: ``old``'s copy (if any) becomes ``new``'s."""
        self.drop(peft, new)
        found = self._copies.pop((id(peft), old), None)
        if found is not None:
            self._copies[(id(peft), new)] = found

    def __len__(self) -> int:
        return len(self._copies)
