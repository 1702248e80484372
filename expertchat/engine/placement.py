"""Where a model's weights go on a node's GPUs: per-GPU budgets turned into a device map by accelerate's
``infer_auto_device_map`` on the model built on the meta device (``architecture.meta_model``), before any weight
loads. ``mode=plan`` prints these maps and loading uses them as they are (``models.load_model(device_map=...)``), so
a run never spills weights to the CPU or the disk: a map that would is the plan's verdict, not a slow run.

Sizes: each parameter in the dtype it loads in; under ``load_in_4bit`` the weights of the modules bitsandbytes
quantizes (``architecture.four_bit_modules``) at accelerate's ``CustomDtype.INT4`` (0.5 bytes; nf4 with double
quantization stores 0.516, the one-layer slack of each budget covers the rest).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from expertchat.engine.architecture import four_bit_modules, meta_model
from expertchat.errors import ExpertChatError

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.config.schema import HardwareConfig, ModelConfig

OFFLOAD = ("cpu", "disk")


def budgets(weights: float, layer: float, gpus: int) -> dict[int | str, int]:
    """``max_memory`` for one model's weights: ``weights / gpus`` plus one layer (a device map moves whole layers)
    on each of ``gpus`` GPUs, and nothing on the CPU (``"cpu": 0``: no offload). Bytes."""
    per_gpu = int(weights / gpus + layer)
    return {**dict.fromkeys(range(gpus), per_gpu), "cpu": 0}


def device_map(cfg: ModelConfig, dtype: str, max_memory: dict[int | str, int]) -> dict[str, int | str]:
    """accelerate's device map of ``cfg``'s model under ``max_memory`` (module name -> GPU index, or ``"cpu"`` /
    ``"disk"`` where the budgets run out); decoder layers are never split (``_no_split_modules``).

    Args:
        cfg: the model; its ``load_in_4bit`` sizes the quantized weights at 4 bits.
        dtype: ``float16`` | ``bfloat16`` | ``float32``: what the other parameters load in.
        max_memory: bytes per device, as :func:`budgets` gives them.
    """
    import torch
    from accelerate import infer_auto_device_map
    from accelerate.utils import CustomDtype

    model = meta_model(cfg)
    special = ({f"{name}.weight": CustomDtype.INT4 for name in four_bit_modules(model)} if cfg.load_in_4bit
               else {})
    quiet = logging.getLogger("accelerate.utils.modeling")  # planning for GPUs this machine lacks: "not available"
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules,
                                     dtype=getattr(torch, dtype), special_dtypes=special)
    finally:
        quiet.setLevel(level)


def offloaded(dmap: dict[str, int | str]) -> list[str]:
    """The modules a device map puts on the CPU or the disk."""
    return [name for name, where in dmap.items() if where in OFFLOAD]


def describe(dmap: dict[str, int | str]) -> str:
    """A device map in a line: ``GPU 0: layers 0-7 + embed_tokens; GPU 1: layers 8-15 + norm, lm_head``.

    >>> describe({"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1})
    'GPU 0: layers 0-0 + embed_tokens; GPU 1: layers 1-1 + lm_head'
    >>> describe({"": 0})
    'GPU 0: all'
    """
    parts = []
    for device in dict.fromkeys(dmap.values()):
        names = [n for n, d in dmap.items() if d == device]
        layers = sorted(int(m.group(1)) for n in names if (m := re.search(r"layers\.(\d+)$", n)))
        other = [n.rpartition(".")[2] or "all" for n in names if not re.search(r"layers\.(\d+)$", n)]
        what = ([f"layers {layers[0]}-{layers[-1]}"] if layers else []) + ([", ".join(other)] if other else [])
        parts.append(f"{'GPU ' + str(device) if isinstance(device, int) else device}: {' + '.join(what)}")
    return "; ".join(parts)


def check_gpus(hardware: HardwareConfig) -> None:
    """That this machine has the GPUs a plan for ``hardware`` placed weights on: CUDA, at least ``hardware.gpus``
    devices, each with at least ``hardware.gpu_memory_gb`` (2% tolerance: drivers report slightly different totals).

    Raises:
        ExpertChatError: naming the profile, what this machine has, and the fix.
    """
    import torch

    fix = "set hardware=<the profile of this node> (conf/hardware/), or hardware=cpu"
    if not torch.cuda.is_available():
        raise ExpertChatError(f"hardware={hardware.name} plans {hardware.gpus} GPU(s) and this machine has no CUDA: "
                              f"{fix}")
    if torch.cuda.device_count() < hardware.gpus:
        raise ExpertChatError(f"hardware={hardware.name} plans {hardware.gpus} GPUs and this job sees "
                              f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES, --gpus): {fix}")
    for i in range(hardware.gpus):
        total = torch.cuda.get_device_properties(i).total_memory
        if total < 0.98 * hardware.gpu_memory_gb * 1e9:
            raise ExpertChatError(f"hardware={hardware.name} plans {hardware.gpu_memory_gb:g} GB per GPU and GPU {i} "
                                  f"({torch.cuda.get_device_name(i)}) has {total / 1e9:.1f}: {fix}")

