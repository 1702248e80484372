"""Model architectures without weights: a model's ``config.json`` (its local folder, else the table of known
architectures in ``architectures.json`` beside this module, each with its source) built on PyTorch's meta device,
so the parameter count and the weights bitsandbytes would quantize are transformers' own, for the installed version.
``mode=plan`` (``expertchat/modes/plan.py``) sizes memory from it."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertchat.engine.models import cache_root, cpu_supports_bf16, looks_local, package_dir
from expertchat.errors import ExpertChatError

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.config.schema import HardwareConfig, ModelConfig

ARCHITECTURES = Path(__file__).with_name("architectures.json")


@dataclass(frozen=True)
class Shape:
    """What the plan needs of an architecture, read off the model built on the meta device.

    ``params`` counts every parameter once (tied embeddings once, every MoE expert); ``quantized`` those that
    ``load_in_4bit`` turns into nf4; ``lora`` maps a module name (``q_proj``) to ``(count, in + out)`` of its
    ``nn.Linear`` modules, for the adapter's ``r * (in + out)`` parameters per module.
    """

    source: str
    params: int
    quantized: int
    layers: int
    hidden: int
    intermediate: int
    experts: int
    experts_per_token: int
    vocab: int
    heads: int
    kv_per_token: int  # K and V elements per token over all layers: 2 * layers * kv_heads * head_dim
    fused_experts: int  # floating parameters of >= 3 dimensions (fused MoE experts): bitsandbytes cannot quantize them
    lora: tuple[tuple[str, int, int], ...]
    fused_example: str = ""  # the first such parameter's name (``load_in_4bit`` stops on it at load)


def architecture(cfg: ModelConfig) -> tuple[dict[str, Any], str]:
    """The config.json fields of a model and where they came from: its local folder's ``config.json``, the
    converted folder of an embedded GGUF, else ``architectures.json`` by hub id (``hub_id`` or ``path``).

    Raises:
        ExpertChatError: neither a local config.json nor a known architecture.
    """
    folders = []
    if cfg.package and cfg.gguf_file:
        folders.append(cache_root() / "converted" / Path(cfg.gguf_file).stem.replace(".", "_"))
    elif cfg.package:
        folders.append(package_dir(cfg.package) / cfg.path)
    elif cfg.path and looks_local(cfg.path):
        folders.append(Path(os.path.expanduser(cfg.path)))
    for folder in folders:
        if (folder / "config.json").is_file():
            return json.loads((folder / "config.json").read_text()), str(folder / "config.json")
    known = json.loads(ARCHITECTURES.read_text())
    for key in (cfg.hub_id, cfg.path):
        if key in known:
            return known[key]["config"], known[key]["source"] + (f" (no config.json in {folders[0]})" if folders
                                                                   else "")
    where = f"no config.json in {folders[0]}" if folders else f"'{cfg.path}' is not a local folder"
    raise ExpertChatError(f"plan: model '{cfg.name}': {where} and {cfg.hub_id or cfg.path} is not in "
                          f"{ARCHITECTURES.name} ({', '.join(k for k in known if not k.startswith('_'))}); set "
                          f"<role>.path=<local folder with config.json>")


@functools.lru_cache(maxsize=16)
def _meta(config_json: str, source: str) -> Any:
    """The model of a config.json's fields on the meta device (:func:`build_meta`), built once per architecture."""
    from transformers import AutoConfig

    fields = json.loads(config_json)
    kind = fields.pop("model_type", None)
    for key in ("architectures", "auto_map", "quantization_config", "torch_dtype", "dtype", "transformers_version"):
        fields.pop(key, None)
    try:
        return build_meta(AutoConfig.for_model(kind, **fields))
    except (ValueError, KeyError, TypeError) as exc:
        raise ExpertChatError(f"plan: transformers cannot build model_type '{kind}' from {source} ({exc})") from None


def meta_model(cfg: ModelConfig) -> Any:
    """A model config's architecture (:func:`architecture`) built on the meta device: shapes, no storage."""
    config, source = architecture(cfg)
    return _meta(json.dumps(config, sort_keys=True), source)


def four_bit_modules(model: Any) -> list[str]:
    """The names of the modules ``load_in_4bit`` turns into nf4 ``Linear4bit``: every module whose type is exactly
    ``nn.Linear`` except those transformers keeps (the output layer, ``_keep_in_fp32_modules``), as
    ``replace_with_bnb_linear`` decides."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return [name for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and should_convert_module(name, skip)]


@functools.lru_cache(maxsize=16)
def _shape(config_json: str, source: str) -> Shape:
    import torch

    model = _meta(config_json, source)
    config = model.config
    four_bit = set(four_bit_modules(model))
    quantized, lora = 0, {}
    fused = {n: p.numel() for n, p in model.named_parameters() if p.dim() >= 3 and p.is_floating_point()}
    for name, module in model.named_modules():
        if name in four_bit:
            quantized += module.weight.numel()
        if type(module) is torch.nn.Linear and module is not model.get_output_embeddings():
            leaf = name.rpartition(".")[2]
            count, size = lora.get(leaf, (0, 0))
            lora[leaf] = (count + 1, size + module.in_features + module.out_features)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return Shape(
        source=source, params=sum(p.numel() for p in model.parameters()), quantized=quantized,
        layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
        experts=getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 1,
        experts_per_token=getattr(text, "num_experts_per_tok", None) or 1, vocab=text.vocab_size, heads=heads,
        kv_per_token=2 * text.num_hidden_layers * kv_heads * head_dim, fused_experts=sum(fused.values()),
        lora=tuple((k, c, s) for k, (c, s) in sorted(lora.items())), fused_example=next(iter(fused), ""))


def build_meta(config: Any) -> Any:
    """The causal LM of ``config`` on PyTorch's meta device (shapes, no storage), built by the class that loads
    it (``experts.causal_lm_class``: Mixtral with one ``nn.Linear`` per expert projection)."""
    import torch
    from transformers import AutoModelForCausalLM

    from expertchat.engine.experts import causal_lm_class

    cls = causal_lm_class(config.model_type)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config) if cls is AutoModelForCausalLM else cls(config)


def shape(cfg: ModelConfig) -> Shape:
    """The :class:`Shape` of a model config's architecture (:func:`architecture`), built once per architecture."""
    config, source = architecture(cfg)
    return _shape(json.dumps(config, sort_keys=True), source)


def assumed_dtype(name: str, hardware: HardwareConfig) -> str:
    """The dtype a setting means on ``hardware``: ``auto`` is bf16 from compute capability 8.0, fp16 below it
    (V100), and on a CPU bf16 where it computes it natively, else fp32 (as :func:`models.resolve_dtype`)."""
    if name != "auto":
        return name
    if hardware.gpus:
        return "bfloat16" if hardware.compute_capability >= 8.0 else "float16"
    return "bfloat16" if cpu_supports_bf16() else "float32"
