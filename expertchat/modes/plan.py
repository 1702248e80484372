"""``mode=plan``: does this configuration fit the GPUs (or the RAM) of ``hardware``? No weights are loaded.

Each model's architecture comes from the ``config.json`` of its local folder, else from the table of known
architectures shipped in ``expertchat/engine/architectures.json`` (the published config.json's fields, with their
source). The model is then built on PyTorch's meta device (shapes only, no storage) by the class that loads it, so its
parameter count and the weights bitsandbytes would quantize are transformers' own, for the installed version:
``load_in_4bit`` replaces every module whose type is exactly ``nn.Linear`` except the output layer
(``replace_with_bnb_linear``), Mixtral's per-expert ``w1/w2/w3`` included (``engine/experts.py``); the embeddings,
norms and a MoE router stay in 16 bit. Fused 3-D experts of other MoE types would stay 16-bit too (bitsandbytes
issue #1849): loading stops on them, and the plan says so as a blocker.

Per model: weights, the KV cache of one decoding chunk, the activations of its prefill, and when it is trained the
LoRA adapter with gradients and Adam state and the activations of a DPO step. ``device_map`` spreads every model
over all GPUs of the node (both models share it), so what is held for the whole run divides over the GPUs and a
stage's transient memory comes on top; the largest stage decides. Figures are GB (10^9 bytes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from expertchat.config.schema import CONF
from expertchat.engine.architecture import Shape, assumed_dtype, shape
from expertchat.engine.models import _same_weights
from expertchat.engine.placement import budgets, check_gpus, describe, device_map, offloaded
from expertchat.errors import ExpertChatError

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.config.schema import ExpertChatConfig, HardwareConfig, ModelConfig
    from expertchat.report.tracking import Tracker

log = logging.getLogger(__name__)

GB = 1e9
# nf4 with double quantization (Dettmers et al. 2023, QLoRA, section 3; bitsandbytes' blocksize 64): a 4-bit code
# per weight, one 8-bit absmax per block of 64 weights, one fp32 constant per 256 blocks: 4.127 bits per weight.
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
# What a process's CUDA context holds on each GPU it touches, outside PyTorch's allocator: 781 MB measured by
# nvidia-smi after `import torch` and one tensor (pytorch/pytorch#34323); newer CUDA with lazy loading needs less.
CUDA_CONTEXT_GB = 0.8
# A trainable LoRA parameter: the fp32 weight (peft keeps adapters in fp32 on a 16-bit or 4-bit base), its fp32
# gradient and Adam's two fp32 moments.
LORA_TRAINED_BYTES = 16
# Adam's two moments of one parameter: fp32, or 8-bit with paged 8-bit AdamW (bitsandbytes' blockwise 8-bit state;
# its per-block constants are ignored here).
ADAM_BYTES = {"adamw_torch": 8, "paged_adamw_8bit": 2}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _decode(m: ModelConfig, s: Shape, b: int, batch: int, new: int, k: int = 1) -> dict[str, float]:
    """Bytes of one decoding chunk of ``batch`` prompts of ``m.max_length`` tokens and ``new`` tokens, with
    ``k`` > 1 contrastive search's candidates: ``kv`` (the cache, ``k`` rows per prompt, prompt + new tokens
    long) and the hidden states a forward keeps (every layer's in contrastive search) are spread over the GPUs
    with the layers; ``local`` to one GPU: one layer's MLP (gate, up, their product: one expert at a time), the
    attention mask (SDPA) or scores (eager, fp32), the fp32 logits of the last position, contrastive search's
    fp32 context of hidden states."""
    prompt = batch * m.max_length
    kv = s.kv_per_token * b * batch * k * (m.max_length + new)
    hidden = (s.layers + 1 if k > 1 else 2) * prompt * s.hidden * b
    context = batch * (2 * m.max_length + new) * s.hidden * 4 if k > 1 else 0
    scores = (batch * s.heads * m.max_length * 4 if m.attn_implementation == "eager" else 1) * prompt
    local = prompt * 3 * s.intermediate * b + scores + batch * k * s.vocab * 4 + context
    return {"kv": kv, "spread": kv + hidden, "local": local, "activations": hidden + local}


def _train(m: ModelConfig, s: Shape, cfg: ExpertChatConfig, b: int) -> dict[str, float]:
    """Bytes of one online DPO step on ``2 * training.batch_size`` sequences (TRL samples 2 completions per
    prompt, then runs the policy with gradients and the reference without) of prompt + completion tokens:
    ``states`` and ``reference`` are held all run, ``spread`` and ``local`` are the step's. Saved per layer and
    token: the attention block's norm input and output, q, k, v and its output, the MLP's norm input and output,
    gate, up, activation and product (with gradient checkpointing only each layer's input, and no KV cache while
    sampling); one layer's activations and gradients while it recomputes; the logits (fp32 log-probabilities of
    the completions)."""
    t = cfg.training
    length = t.max_prompt_tokens + t.max_new_tokens
    tokens = 2 * t.batch_size * length
    per_layer = 6 * s.hidden + s.kv_per_token // s.layers + 4 * s.intermediate * s.experts_per_token
    adam = ADAM_BYTES[optimizer_on(cfg, m)]
    if t.method == "full":
        adapter, states, reference = 0, s.params * (b + adam), _weights(m, s, b)  # grads, Adam; TRL's copy
    else:
        targets = set(t.lora.target_modules)
        adapter = sum(t.lora.r * size for leaf, _, size in s.lora if "all-linear" in targets or leaf in targets)
        states = adapter * (LORA_TRAINED_BYTES - 8 + adam)
        reference = adapter * 4 if t.reference == "previous" else 0  # the frozen round-start adapter, fp32
    saved = s.layers * tokens * (s.hidden if t.gradient_checkpointing else per_layer) * b
    kv = 0 if t.gradient_checkpointing else s.kv_per_token * b * tokens
    logits = tokens * s.vocab * b + 2 * t.batch_size * t.max_new_tokens * s.vocab * 4 * 2
    return {"adapter_params": adapter, "states": states, "reference": reference, "spread": saved + kv,
            "local": 2 * tokens * per_layer * b + logits, "activations": saved + 2 * tokens * per_layer * b + logits}


def optimizer_on(cfg: ExpertChatConfig, m: ModelConfig) -> str:
    """The optimizer ``training.optimizer`` means for model ``m`` on ``hardware`` (as ``stages.dpo.optimizer``
    decides at run time: ``auto`` is paged 8-bit AdamW on GPUs for a 4-bit or fully fine-tuned base)."""
    t = cfg.training
    if t.optimizer != "auto":
        return t.optimizer
    return "paged_adamw_8bit" if cfg.hardware.gpus and (m.load_in_4bit or t.method == "full") else "adamw_torch"


def _weights(m: ModelConfig, s: Shape, b: int) -> float:  # bytes
    return s.quantized * NF4_BYTES + (s.params - s.quantized) * b if m.load_in_4bit else s.params * b


def model_plan(cfg: ExpertChatConfig, role: str) -> dict[str, Any]:
    """One model's figures on ``cfg.hardware`` (bytes; see the module docstring): parameters, the dtype
    assumed, weights, a decoding chunk of the dialogue (``generation.*``) and of its rating of the partner
    (``judging.batch_size`` turns and the WIM critique, :func:`_decode`) and, when the model is trained, the DPO
    step (:func:`_train`). Mixtral's experts are per-expert ``nn.Linear`` layers (``engine/experts.py``) and count
    as nf4; fused 3-D experts of other MoE types stay 16-bit, and loading stops on them (``unquantized_experts``)."""
    m = getattr(cfg, role)
    s = shape(m)
    dtype = assumed_dtype(m.dtype, cfg.hardware)
    b = DTYPE_BYTES[dtype]
    t, g = cfg.training, cfg.generation
    trained = t.steps > 0 and (role == "actor" or t.bidirectional)
    contrastive = g.strategy == "contrastive" and g.top_k > 1 and g.penalty_alpha > 0
    return {
        "role": role, "name": m.name, "source": s.source, "params": s.params, "dtype": dtype,
        "load_in_4bit": m.load_in_4bit, "nf4_params": s.quantized if m.load_in_4bit else 0,
        "unquantized_experts": s.fused_experts if m.load_in_4bit else 0, "fused_example": s.fused_example,
        "weights": _weights(m, s, b), "layer": _weights(m, s, b) / s.layers,
        "decode": _decode(m, s, b, g.batch_size, g.max_new_tokens, g.top_k if contrastive else 1),
        "rating": _decode(m, s, b, cfg.judging.batch_size, cfg.judging.wim_max_new_tokens),
        "train": _train(m, s, cfg, b) if trained else None,
    }


def plan(cfg: ExpertChatConfig, placement: bool = False) -> dict[str, Any]:
    """The whole plan: both models (weights once when both roles share them, as ``models.load_pair`` does),
    what is held all run (weights, adapters with gradients and optimizer state, references), the largest stage
    (dialogue decoding with both roles' prefix caches, rating, training; merged adapter copies during inference),
    and the verdict against ``hardware``: per GPU (a CUDA context, the held memory over all GPUs plus one layer per
    model for ``device_map``'s whole-layer split, the largest stage's spread part over all GPUs and its local part
    on one) or, without GPUs, against the node's RAM (``hardware.memory_gb``, 0: this machine's).

    Args:
        placement: also place each ``device_map=auto`` model on the GPUs (:func:`placements`, accelerate's device
            map under the plan's budgets); a map that offloads to the CPU or disk is a blocker.

    Returns:
        ``{"hardware", "models": [model_plan, ...], "held", "stage", "stage_bytes", "need", "capacity",
        "unit", "fits", "blockers", "merged_copies", "placement"}``; bytes, per GPU when ``hardware.gpus`` > 0.
    """
    hw, g = cfg.hardware, cfg.generation
    models = [model_plan(cfg, role) for role in ("actor", "judge")]
    if _same_weights(cfg.actor, cfg.judge):
        models[1]["weights"], models[1]["shared"] = 0.0, "actor"  # one base, an adapter per role
    prefix = 2 * g.prefix_cache_gb * 2**30  # both roles' stores (GiB caps), live while either role decodes
    for m in models:
        m["decode"] = {**m["decode"], "prefix": prefix, "spread": m["decode"]["spread"] + prefix}
    held = sum(m["weights"] + (m["train"]["states"] + m["train"]["reference"] if m["train"] else 0) for m in models)
    gpus = max(hw.gpus, 1)
    layers = sum(m["layer"] for m in models if "shared" not in m) if hw.gpus else 0
    capacity = hw.gpu_memory_gb * GB if hw.gpus else (hw.memory_gb * GB or machine_ram())
    base = CUDA_CONTEXT_GB * GB + held / gpus + layers if hw.gpus else held
    merged = _merged_copies(cfg, models, capacity - base)
    stages = [(f"{m['role']} {kind}", part) for m in models
              for kind, part in (("decoding", m["decode"]), ("rating", m["rating"]), ("training", m["train"]))
              if part]
    stages = [(n, {**p, "local": p["local"] + (merged if "training" not in n else 0)}) for n, p in stages]
    name, stage = max(stages, key=lambda s: s[1]["spread"] / gpus + s[1]["local"])
    stage_bytes = stage["spread"] / gpus + stage["local"]
    need = base + stage_bytes
    blockers = [f"{m['role']}.load_in_4bit=true needs a GPU (bitsandbytes nf4) and hardware={hw.name} has none"
                for m in models if m["load_in_4bit"] and not hw.gpus]
    blockers += [f"{m['role']}.load_in_4bit=true: {m['unquantized_experts'] / 1e9:.2f} B MoE expert parameters in "
                 f"fused 3-D tensors (e.g. {m['fused_example']}) stay 16-bit (bitsandbytes issue #1849): loading "
                 f"stops on them" for m in models if m["unquantized_experts"]]
    placed = placements(cfg, models) if placement and hw.gpus else {}
    blockers += [f"{role}'s device map puts {len(p['offloaded'])} modules on the CPU or disk ({p['where']})"
                 for role, p in placed.items() if p["offloaded"]]
    return {"hardware": asdict(hw), "models": models, "held": held, "stage": name, "stage_bytes": stage_bytes,
            "need": need, "capacity": capacity, "unit": "per GPU" if hw.gpus else "RAM",
            "fits": need <= capacity and not blockers, "blockers": blockers, "layers": layers, "prefix": prefix,
            "merged_copies": merged, "placement": placed}


def _merged_copies(cfg: ExpertChatConfig, models: list[dict[str, Any]], room: float) -> float:
    """Bytes of the merged adapter copies inference holds (``policies/merging.py``: at most three at a time, each
    a full copy of a base on one device): none with ``training.lora.merged_copies=never``, full fine-tuning, a
    4-bit base, or a base spread over several GPUs (``device_map``); with ``auto`` only when a copy takes at most
    half of the ``room`` left (as ``merging.why_not`` decides at run time)."""
    t, hw = cfg.training, cfg.hardware
    if t.method != "lora" or t.lora.merged_copies == "never":
        return 0.0
    bases = [m["weights"] for m in models if "shared" not in m and not m["load_in_4bit"]
             and not (hw.gpus > 1 and getattr(cfg, m["role"]).device_map)]
    copy = max(bases, default=0.0)
    return 3 * copy if t.lora.merged_copies == "always" or copy <= room / 2 else 0.0


def placements(cfg: ExpertChatConfig, models: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each ``device_map=auto`` model's placement on ``hardware``'s GPUs (a shared base once): ``max_memory`` (its
    weights over the GPUs plus one layer each, ``placement.budgets``), accelerate's ``device_map`` under it, the
    modules it ``offloaded``, and the map in words (``where``). ``models.load_pair`` loads with these maps."""
    out = {}
    for m in models:
        model = getattr(cfg, m["role"])
        if "shared" in m or model.device_map != "auto":
            continue
        budget = budgets(m["weights"], m["layer"], cfg.hardware.gpus)
        dmap = device_map(model, m["dtype"], budget)
        out[m["role"]] = {"max_memory": budget, "device_map": dmap, "offloaded": offloaded(dmap),
                          "where": describe(dmap)}
    return out


def device_maps(cfg: ExpertChatConfig) -> dict[str, dict[str, int | str]]:
    """The device maps a run loads with (role -> map; empty without GPUs in ``hardware``): the plan's, after
    checking that this machine has the GPUs it planned for (``placement.check_gpus``).

    Raises:
        ExpertChatError: the plan does not fit (its verdict, as ``mode=plan`` says it), or the GPUs are missing.
    """
    if not cfg.hardware.gpus or not any(getattr(cfg, r).device_map == "auto" for r in ("actor", "judge")):
        return {}
    result = plan(cfg, placement=True)
    if not result["fits"]:
        raise ExpertChatError(verdict(cfg, result) + "; see `python -m expertchat ... mode=plan`")
    check_gpus(cfg.hardware)
    return {role: p["device_map"] for role, p in result["placement"].items()}


def machine_ram() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))  # this machine's memory in bytes


def _fits(cfg: ExpertChatConfig, **changes: Any) -> dict[str, Any] | None:
    """The plan of ``cfg`` with ``changes`` (``generation=...``, ``hardware=...``), or None where the changed
    config is invalid (e.g. a bf16 setting on a V100 profile)."""
    try:
        return plan(replace(cfg, **changes))
    except ExpertChatError:
        return None


def suggestions(cfg: ExpertChatConfig, result: dict[str, Any]) -> list[str]:
    """What would fit, each change alone: more GPUs of the same kind, another hardware profile of
    ``conf/hardware/``, a smaller decoding or DPO batch, 4-bit."""
    import yaml

    from expertchat.config.schema import HardwareConfig

    out, hw = [], cfg.hardware
    if hw.gpus:
        more = next((n for n in range(hw.gpus + 1, 17) if (_fits(cfg, hardware=replace(hw, gpus=n)) or {}).get(
            "fits")), None)
        out += [f"{more} x {hw.gpu_name} (hardware.gpus={more})"] if more else []
    for path in sorted((CONF / "hardware").glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        if path.stem != hw.name and (_fits(cfg, hardware=HardwareConfig(**values)) or {}).get("fits"):
            out.append(f"hardware={path.stem}")
    g, t = cfg.generation, cfg.training
    batch = next((k for k in range(g.batch_size - 1, 0, -1)
                  if (_fits(cfg, generation=replace(g, batch_size=k)) or {}).get("fits")), None)
    out += [f"generation.batch_size={batch}"] if batch else []
    steps = next((k for k in range(t.batch_size - 1, 0, -1)
                  if (_fits(cfg, training=replace(t, batch_size=k)) or {}).get("fits")), None)
    out += [f"training.batch_size={steps}"] if steps else []
    plain = [m["role"] for m in result["models"] if not m["load_in_4bit"]]
    if hw.gpus and plain:
        four = {role: replace(getattr(cfg, role), load_in_4bit=True) for role in plain}
        if (_fits(cfg, **four) or {}).get("fits"):
            out.append(" ".join(f"{role}.load_in_4bit=true" for role in plain))
    return out


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def _dtype_text(m: dict[str, Any]) -> str:
    """How a model's weights are held, e.g. ``nf4 3% + fp16`` (the share of parameters in nf4)."""
    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[m["dtype"]]
    return f"nf4 {m['nf4_params'] / m['params']:.0%} + {short}" if m["load_in_4bit"] else short


def table_lines(cfg: ExpertChatConfig, result: dict[str, Any]) -> list[str]:
    """The plan as console lines: one row per model, then the placement and the verdict."""
    hw = cfg.hardware
    where = (f"{hw.gpus} x {hw.gpu_name}, {hw.gpu_memory_gb:g} GB each, compute capability {hw.compute_capability:.1f}"
             if hw.gpus else f"no GPU, {result['capacity'] / GB:.1f} GB of RAM")
    lines = [f"Memory plan for hardware={hw.name} ({where}); GB = 10^9 bytes, no weights loaded",
             f"  {'role':6}{'model':24}{'params':>9}  {'weights as':14}{'weights':>8}{'KV cache':>9}{'activ.':>8}"
             f"{'rating':>8}{'LoRA+Adam':>10}{'DPO step':>9}{'reference':>10}"]
    for m in result["models"]:
        train = m["train"] or {}
        rating = m["rating"]["kv"] + m["rating"]["activations"]
        lines.append(f"  {m['role']:6}{m['name'][:23]:24}{m['params'] / 1e9:>8.2f}B  {_dtype_text(m):14}"
                     f"{_gb(m['weights']) if 'shared' not in m else 'shared':>8}{_gb(m['decode']['kv']):>9}"
                     f"{_gb(m['decode']['activations']):>8}{_gb(rating):>8}{_gb(train.get('states')):>10}"
                     f"{_gb(train.get('activations')):>9}{_gb(train.get('reference')):>10}")
    lines += _notes(cfg, result)
    lines += [f"  {role} placement: max_memory {p['max_memory'][0] / GB:.2f} GB on each GPU, none on the CPU -> "
              f"{p['where']}" for role, p in result.get("placement", {}).items()]
    gpus = max(hw.gpus, 1)
    if hw.gpus:
        lines.append(f"  per GPU: {CUDA_CONTEXT_GB:.2f} CUDA context + {result['held'] / gpus / GB:.2f} held "
                     f"({_gb(result['held'])} over {gpus} GPUs) + {result['layers'] / GB:.2f} one layer per model "
                     f"(device_map moves whole layers) + {result['stage_bytes'] / GB:.2f} {result['stage']}"
                     f" = {result['need'] / GB:.2f} GB of {hw.gpu_memory_gb:g}")
    else:
        lines.append(f"  RAM: {_gb(result['held'])} held + {result['stage_bytes'] / GB:.2f} {result['stage']} = "
                     f"{result['need'] / GB:.2f} GB of {result['capacity'] / GB:.1f}")
    lines.append(f"  verdict: {'fits' if result['fits'] else 'does not fit'} on hardware={hw.name}"
                 + "".join(f"; {b}" for b in result["blockers"]))
    return lines


def _attention(model: ModelConfig, hw: HardwareConfig) -> str:
    """The attention kernel a model runs with on ``hw``, in words: its ``attn_implementation``, else SDPA
    (transformers' choice), with FlashAttention 2 named where the GPUs have it (compute capability >= 8.0)."""
    if model.attn_implementation:
        return model.attn_implementation
    if hw.gpus and hw.compute_capability >= 8.0:
        return "sdpa (flash_attention_2 possible here: <role>.attn_implementation=flash_attention_2 with flash-attn)"
    return "sdpa" + (" (no FlashAttention 2 below compute capability 8.0)" if hw.gpus else "")


def _notes(cfg: ExpertChatConfig, result: dict[str, Any]) -> list[str]:
    """The assumptions behind the rows: dtypes, what stays 16-bit, the reference, the batches and lengths."""
    hw, g, t, out = cfg.hardware, cfg.generation, cfg.training, []
    for m in result["models"]:
        model = getattr(cfg, m["role"])
        why = (f"dtype auto on {f'compute capability {hw.compute_capability:.1f}' if hw.gpus else 'this CPU'}"
               if model.dtype == "auto" else f"{m['role']}.dtype")
        text = f"  {m['role']}: {m['dtype']} ({why})"
        if m["load_in_4bit"]:
            text += (f"; nf4: {m['nf4_params'] / 1e9:.2f} B parameters (the nn.Linear layers); 16-bit: embeddings, "
                     f"lm_head, norms, router" + (f", {m['unquantized_experts'] / 1e9:.2f} B in fused MoE experts"
                                                   if m["unquantized_experts"] else ""))
        out += [text + f"; attention {_attention(model, hw)}", f"    architecture from {m['source']}"]
    k = g.top_k if g.strategy == "contrastive" and g.top_k > 1 and g.penalty_alpha > 0 else 1
    out.append(f"  decoding: generation.batch_size {g.batch_size}" + (f" x top_k {k} candidates" if k > 1 else "")
               + f" x (<role>.max_length + {g.max_new_tokens} new tokens); rating: judging.batch_size "
               f"{cfg.judging.batch_size} turns")
    out.append(f"  prefix caches: 2 roles x generation.prefix_cache_gb {g.prefix_cache_gb:g} GiB = "
               f"{result['prefix'] / GB:.2f} GB with the layers while dialogues decode; merged adapter copies "
               f"(training.lora.merged_copies={t.lora.merged_copies}): {result['merged_copies'] / GB:.2f} GB on one "
               f"device during inference" + ("" if result["merged_copies"] or t.method != "lora" else
                                              " (4-bit or spread bases, or no room: adapters run unmerged)"))
    out.append(f"  DPO step: 2 x training.batch_size {t.batch_size} sequences of {t.max_prompt_tokens} + "
               f"{t.max_new_tokens} tokens, gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}")
    trained = [m for m in result["models"] if m["train"]]
    if trained and t.method == "lora":
        ref = ("a frozen copy of the round-start adapter on the same base (training.reference=previous)"
               if t.reference == "previous" else "the base with adapters disabled (training.reference=base): "
               "nothing extra")
        out.append(f"  training: LoRA r={t.lora.r} on {','.join(t.lora.target_modules)}: "
                   + ", ".join(f"{m['role']} {m['train']['adapter_params'] / 1e6:.1f} M parameters "
                               f"({optimizer_on(cfg, getattr(cfg, m['role']))})" for m in trained)
                   + " (fp32 weight and gradient, Adam's 2 moments in fp32 or 8 bit)")
        out.append(f"  reference: no model copy (peft): {ref}")
    elif trained:
        out.append("  training: full fine-tuning: gradients and Adam moments of every weight, and TRL's reference is a "
                   "full copy of the model")
    return out


def check(cfg: ExpertChatConfig) -> dict[str, Any]:
    """The plan with each model's placement, before the tracker opens; raises ExpertChatError for an architecture
    it cannot find."""
    return plan(cfg, placement=True)


def run(cfg: ExpertChatConfig, tracker: Tracker | None = None, checked: dict[str, Any] | None = None) -> dict:
    """Print the plan's table, write it to ``<run_dir>/plan.json``, and stop with one line naming what would fit
    when it does not.

    Raises:
        ExpertChatError: the plan does not fit ``hardware`` (the message lists changes that would fit).
    """
    from expertchat.runs.store import RunStore

    result = checked if checked is not None else check(cfg)
    for line in table_lines(cfg, result):
        log.info("%s", line)
    if not result["fits"]:
        result["would_fit"] = suggestions(cfg, result)
    if cfg.run_dir:
        RunStore(cfg.run_dir).write_json("plan.json", result)
    if tracker is not None:
        tracker.log_summary({"plan/need_gb": result["need"] / GB, "plan/fits": result["fits"]})
    if not result["fits"]:
        raise ExpertChatError(verdict(cfg, result) + "; would fit: "
                              + "; ".join(result["would_fit"] or ["nothing tried here"]))
    return result


def verdict(cfg: ExpertChatConfig, result: dict[str, Any]) -> str:
    """The one-line verdict of a plan that does not fit: what it needs against what ``hardware`` has, and why."""
    return (f"plan: does not fit hardware={cfg.hardware.name}: needs {result['need'] / GB:.1f} GB {result['unit']} "
            f"of {result['capacity'] / GB:.1f}" + "".join(f"; {b}" for b in result["blockers"]))
