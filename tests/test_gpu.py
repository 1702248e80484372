"""The gpu tier: what only CUDA shows, on tiny random models (nothing downloads). fp16 and bf16 loading, nf4 with its
compute dtype, a planned device map, TRL's precision and optimizer settings, the smoke loop end to end through the
CLI (a 4-bit tiny Mixtral actor on the plan's device map, a tiny Llama judge), and the plan against
``torch.cuda.max_memory_allocated``. Skipped without CUDA (tests/conftest.py); ``launchers/gpu_check.sh`` runs it on
a bare GPU machine. Each test appends its figures as a JSON line to ``$EXPERTCHAT_GPU_FIGURES`` when that is set.

Tolerances: weights as planned within 3% of ``memory_allocated`` after loading; the decoding chunk's peak
(``max_memory_allocated`` less the weights) at most 10% above the plan plus 64 MB for CUDA libraries' workspaces
(cuBLAS, SDPA), which the plan's CUDA context line covers at scale (the plan must not promise memory that is not
there), and at least a third of the plan (a plan far above the truth turns runs away for nothing). Not yet run on a
GPU: the first run's figures (``gpu_check.sh`` prints them) are the measurement these bounds are to be checked on."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from expertchat.config.schema import GenerationConfig, ModelConfig
from expertchat.engine.models import load_model, native_bf16
from tests.conftest import make_tiny_model, run_cli, save_tiny_mixtral

pytestmark = pytest.mark.gpu
IDS = torch.tensor([[1, 20, 300, 4000, 50, 7, 9, 11], [3, 5, 8, 13, 21, 34, 55, 89]])
HALF = ["float16"] + (["bfloat16"] if torch.cuda.is_available() and native_bf16() else [])


def figures(**values) -> None:
    """Append ``values`` as one JSON line to ``$EXPERTCHAT_GPU_FIGURES`` (the GPU check prints them)."""
    path = os.environ.get("EXPERTCHAT_GPU_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"gpu": torch.cuda.get_device_name(), **values}) + "\n")


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device)).logits.float().cpu()


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_loads_on_the_gpu_and_agrees_with_fp32(smol_tokenizer, tmp_path, dtype):
    make_tiny_model(smol_tokenizer).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    reference = _logits(load_model(ModelConfig(name="ref", path=str(tmp_path), dtype="float32", device="cpu")).model)
    lm = load_model(ModelConfig(name="half", path=str(tmp_path), dtype=dtype, device="cuda"))
    param = next(lm.model.parameters())
    assert param.device.type == "cuda" and param.dtype == getattr(torch, dtype)
    got = _logits(lm.model)
    assert torch.isfinite(got).all()
    error = (got - reference).abs().max().item()
    figures(test="half_precision", dtype=dtype, max_abs_logit_error=error)
    assert error < 0.05


@pytest.mark.parametrize("compute", HALF)
def test_nf4_mixtral_computes_in_its_compute_dtype(smol_tokenizer, tmp_path, compute):
    import bitsandbytes as bnb

    fused = save_tiny_mixtral(smol_tokenizer, tmp_path)
    lm = load_model(ModelConfig(name="mixtral", path=str(tmp_path), load_in_4bit=True,
                                bnb_4bit_compute_dtype=compute, dtype=compute))
    experts = [m for n, m in lm.model.named_modules() if n.rpartition(".")[2] in {"w1", "w2", "w3"}]
    assert len(experts) == 24 and all(isinstance(m, bnb.nn.Linear4bit) for m in experts)
    assert {m.compute_dtype for m in experts} == {getattr(torch, compute)}
    assert {p.device.type for p in lm.model.parameters()} == {"cuda"}
    got, reference = _logits(lm.model), _logits(fused)
    error = (got - reference).abs().max().item()
    figures(test="nf4", compute_dtype=compute, max_abs_logit_error=error,
            allocated_mb=torch.cuda.memory_allocated() / 1e6)
    assert torch.isfinite(got).all() and error < 1.0


def test_the_planned_device_map_is_what_loads(smol_tokenizer, tmp_path):
    from expertchat.engine import placement

    save_tiny_mixtral(smol_tokenizer, tmp_path)
    cfg = ModelConfig(name="mixtral", path=str(tmp_path), load_in_4bit=True, dtype="float16", device_map="auto")
    dmap = placement.device_map(cfg, "float16", {0: 10**9, "cpu": 0})
    assert not placement.offloaded(dmap)
    lm = load_model(cfg, device_map=dmap)
    assert set(lm.model.hf_device_map.values()) == {0}
    assert torch.isfinite(_logits(lm.model)).all()


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed (gpu_check.sh without it)")
def test_trl_precision_and_optimizer_on_a_4_bit_base(smol_tokenizer, tmp_path):
    from expertchat.stages import dpo
    from tests.training_helpers import cfg

    save_tiny_mixtral(smol_tokenizer, tmp_path)
    lm = load_model(ModelConfig(name="mixtral", path=str(tmp_path), load_in_4bit=True, dtype="float16"))
    args = dpo.online_dpo_args(cfg(gradient_checkpointing=True), str(tmp_path / "scratch"), 64, 0, lm.model)
    assert (args.fp16, args.bf16) == (True, False)  # fp16 compute, as on a V100: TRL's fp16=True, bf16=False
    assert str(args.optim.value) == "paged_adamw_8bit"


def test_the_smoke_loop_runs_on_the_gpu(smol_tokenizer, tmp_path):
    """The CLI end to end: a 4-bit tiny Mixtral actor placed by the plan (hardware = this GPU) with LoRA on attention
    and experts, a tiny Llama judge, each with its real chat template; training when trl is installed."""
    from tests.conftest import DATA

    templates = {n: json.loads((DATA / "chat_templates" / f"{n}.json").read_text())["chat_template"]
                 for n in ("mixtral_8x7b_instruct", "llama3_8b_instruct")}
    save_tiny_mixtral(smol_tokenizer, tmp_path / "mixtral")
    make_tiny_model(smol_tokenizer, seed=1).save_pretrained(tmp_path / "llama")
    smol_tokenizer.save_pretrained(tmp_path / "llama")
    props = torch.cuda.get_device_properties(0)
    steps = "1" if importlib.util.find_spec("trl") else "0"
    out = tmp_path / "run"
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={out}", "reward=rating_only", f"training.steps={steps}",
                   "hardware.name=this_gpu", "hardware.gpus=1",
                   f"hardware.gpu_memory_gb={props.total_memory / 1e9:.2f}",
                   f"hardware.compute_capability={props.major}.{props.minor}",
                   f"actor.path={tmp_path / 'mixtral'}", "actor.package=null", "actor.gguf_file=null",
                   "actor.name=tiny_mixtral", "actor.load_in_4bit=true", "actor.device_map=auto",
                   f"actor.chat_template={json.dumps(templates['mixtral_8x7b_instruct'])}",
                   f"judge.path={tmp_path / 'llama'}", "judge.package=null", "judge.gguf_file=null",
                   "judge.name=tiny_llama", f"judge.chat_template={json.dumps(templates['llama3_8b_instruct'])}",
                   "training.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,w1,w2,w3]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "turns.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"tiny_mixtral", "tiny_llama"}
    if steps == "1":
        assert (out / "adapters" / "round_0" / "actor" / "adapter_config.json").exists()
    figures(test="smoke", training_steps=int(steps), status=json.loads((out / "status.json").read_text()))


def test_the_plan_against_max_memory_allocated(smol_tokenizer, tmp_path):
    """A 50 M-parameter Llama in fp16: its planned weights against memory_allocated, its planned decoding chunk
    (KV cache and activations, ``modes.plan._decode``) against the peak of the same chunk decoded here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from expertchat.engine.generation import generate
    from expertchat.modes import plan
    from tests.conftest import compose_cfg

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=512, intermediate_size=1536,
                                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                                 max_position_embeddings=2048, tie_word_embeddings=True)).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    props = torch.cuda.get_device_properties(0)
    cfg = compose_cfg(f"actor.path={tmp_path}", "actor.package=null", "actor.gguf_file=null", "actor.dtype=float16",
                      "actor.max_length=1024", "generation.batch_size=8", "generation.max_new_tokens=32",
                      "hardware.name=this_gpu", "hardware.gpus=1", f"hardware.gpu_memory_gb={props.total_memory / 1e9}",
                      f"hardware.compute_capability={props.major}.{props.minor}")
    planned = plan.model_plan(cfg, "actor")
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    lm = load_model(ModelConfig(**{**cfg.actor.__dict__, "device": "cuda"}))
    weights = torch.cuda.memory_allocated() - before
    words = smol_tokenizer.decode(torch.randint(1000, 20000, (1400,)).tolist())  # cut to max_length tokens
    prompts = [words] * cfg.generation.batch_size
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    generate(lm.model, lm.tokenizer, prompts, GenerationConfig(max_new_tokens=32, batch_size=8), seed=0,
             stop_token_ids=[], max_prompt_tokens=1024)
    peak = torch.cuda.max_memory_allocated() - start
    chunk = planned["decode"]["kv"] + planned["decode"]["activations"]
    figures(test="plan_vs_measured", planned_weights_mb=planned["weights"] / 1e6, measured_weights_mb=weights / 1e6,
            planned_decode_mb=chunk / 1e6, measured_decode_peak_mb=peak / 1e6, ratio=peak / chunk)
    assert abs(weights - planned["weights"]) <= 0.03 * planned["weights"]
    assert chunk / 3 <= peak <= 1.10 * chunk + 64e6


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed")
def test_flash_attention_2_matches_sdpa_where_the_gpu_has_it(smol_tokenizer, tmp_path):
    """``attn_implementation=flash_attention_2`` (compute capability >= 8.0, bf16): the same logits as SDPA to bf16
    rounding, and the project's decoding loop (left padding, its own KV cache) runs on it for a batch of two."""
    from expertchat.engine.generation import generate

    if not native_bf16():
        pytest.skip("FlashAttention 2 needs compute capability >= 8.0")
    make_tiny_model(smol_tokenizer).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    models = {a: load_model(ModelConfig(name=a, path=str(tmp_path), dtype="bfloat16", device="cuda",
                                        attn_implementation=a)) for a in ("sdpa", "flash_attention_2")}
    sdpa, flash = (_logits(models[a].model) for a in ("sdpa", "flash_attention_2"))
    assert (sdpa - flash).abs().max().item() < 0.05
    greedy = GenerationConfig(max_new_tokens=8, top_k=1, batch_size=2)
    prompts = ["Hello there, how are you?", "A much longer prompt that needs left padding in the batch: yes."]
    out = generate(models["flash_attention_2"].model, smol_tokenizer, prompts, greedy, seed=0)
    assert len(out) == 2 and all(0 < g.new_tokens <= 8 for g in out)
