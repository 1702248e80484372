"""The model part of the typed schema (``model@actor``, ``model@judge``: ``conf/model/``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from expertchat.errors import check

ATTENTION = ("sdpa", "eager", "flash_attention_2")  # ModelConfig.attn_implementation: transformers' names


@dataclass
class ModelConfig:
    """One model, composed twice as ``model@actor`` and ``model@judge``."""

    name: str = "model"  # display name, written into every record
    path: str = ""  # hub id or local folder (relative to ``package`` when that is set)
    package: Optional[str] = None  # installed Python package that ships the checkpoint (found without import)
    gguf_file: Optional[str] = None  # GGUF file inside ``path``: de-quantized once into the cache
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 where native, fp16 on V100)
    device: Optional[str] = None  # cpu | cuda | cuda:1 ... (None: cuda when available)
    device_map: Optional[str] = None  # e.g. "auto" to shard a large model over the node's GPUs
    load_in_4bit: bool = False  # bitsandbytes nf4 (QLoRA); GPU only
    bnb_4bit_compute_dtype: str = "float16"
    chat_template: Optional[str] = None  # override the tokenizer's chat template
    max_length: int = 2048  # longest prompt fed to the model; longer dialogues are cut from the left
    trust_remote_code: bool = False
    hub_id: Optional[str] = None  # the hub id saved adapters name as their base (default: path, as given)
    attn_implementation: Optional[str] = None  # sdpa | eager | flash_attention_2 (None: transformers' choice, sdpa)

    def __post_init__(self) -> None:
        check(self.dtype in {"auto", "float32", "bfloat16", "float16"}, "dtype", f"is '{self.dtype}'; "
               "use auto, float32, bfloat16 or float16")
        check(self.attn_implementation in {None, *ATTENTION}, "attn_implementation",
               f"is '{self.attn_implementation}'; use {', '.join(ATTENTION)} or null")
        check(self.max_length > 0, "model.max_length", "must be > 0")
