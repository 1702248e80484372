"""The machine part of the typed schema (``hardware.*``: what ``mode=plan`` plans against, what the GPU-only rules
check, what the Slurm launcher profiles ask for), kept apart from ``schema.py`` for
its length; ``expertchat.config`` re-exports it: ``from expertchat.config import HardwareConfig``."""

from __future__ import annotations

from dataclasses import dataclass

from expertchat.config.model import ModelConfig
from expertchat.errors import check


@dataclass
class HardwareConfig:
    """The machine a job runs on (``conf/hardware/``): what ``mode=plan`` plans against, what the GPU-only config
    rules check, and what the Slurm launcher profiles ask for (``${hardware.gpus}``, ``${hardware.cpus}``,
    ``${hardware.memory_gb}``, ``--gpus-per-node=${hardware.gpu_type}:${hardware.gpus}``). The default, ``cpu``, is
    this machine without a GPU; 0 means "this machine's own" for ``cpus`` and ``memory_gb``. ``stage_models`` is the
    switch the cluster launcher profiles and ``launchers/alliance/run.sbatch`` read to copy model folders to the
    node-local disk once per job (``expertchat_stage_models`` in ``launchers/alliance/env.sh``)."""

    name: str = "cpu"
    gpus: int = 0  # per node; 0 = none
    gpu_memory_gb: float = 0.0  # one GPU's memory in GB (10^9 bytes) as torch reports its total_memory
    gpu_name: str = "none"
    compute_capability: float = 0.0  # 0.0 = no GPU; bf16 and FlashAttention 2 need >= 8.0 (V100: 7.0)
    cpus: int = 0  # CPU cores per node a job may use; 0 = this machine's
    memory_gb: int = 0  # node RAM a job may use, in whole GB as Slurm counts it (--mem=186G); 0 = this machine's
    gpu_type: str = ""  # the GPU's name in the cluster's Slurm requests (--gpus-per-node=<gpu_type>:<gpus>, e.g. h100)
    local_disk_gb: int = 0  # node-local disk of a job ($SLURM_TMPDIR), GB; 0 = unknown or none
    stage_models: bool = False  # copy local model folders to $SLURM_TMPDIR once per job before it starts (rsync)

    def __post_init__(self) -> None:
        check(self.gpus >= 0, "hardware.gpus", "must be >= 0")
        check(self.gpus == 0 or self.gpu_memory_gb > 0, "hardware.gpu_memory_gb", "must be > 0 when gpus > 0")
        check(self.gpus == 0 or self.compute_capability > 0, "hardware.compute_capability",
               "must be > 0 when gpus > 0 (V100: 7.0, A100: 8.0, H100: 9.0)")
        check(self.cpus >= 0 and self.memory_gb >= 0, "hardware.cpus", "and hardware.memory_gb must be >= 0")
        check(self.local_disk_gb >= 0, "hardware.local_disk_gb", "must be >= 0")
        check(self.gpu_type == "" or self.gpu_type.replace("_", "").replace(".", "").isalnum(), "hardware.gpu_type",
               f"is '{self.gpu_type}'; use the cluster's GPU name for Slurm (h100, a100, v100) or ''")

    def check_model(self, model: ModelConfig, role: str) -> None:
        """The GPU's own limits on a model's settings: below compute capability 8.0 (V100 = 7.0) there is no bf16
        (``dtype``, ``bnb_4bit_compute_dtype``) and no FlashAttention 2 (``attn_implementation``)."""
        if not 0 < self.compute_capability < 8.0:
            return
        gpu = f"{self.gpu_name} (hardware={self.name}, compute capability {self.compute_capability})"
        for key in ("dtype", "bnb_4bit_compute_dtype"):
            check(getattr(model, key) != "bfloat16", f"{role}.{key}",
                   f"is bfloat16 but the {gpu} has no bf16: use float16 (or auto for dtype)")
        check(model.attn_implementation != "flash_attention_2", f"{role}.attn_implementation",
               f"is flash_attention_2 but the {gpu} has no FlashAttention 2: use sdpa or eager")
