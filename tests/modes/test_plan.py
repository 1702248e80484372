"""``mode=plan``: parameter counts and weight bytes against published sizes and against the libraries themselves,
the seed's own arithmetic, the hardware's dtype rules, and a plan that does not fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from expertchat.config.schema import HardwareConfig, ModelConfig
from expertchat.errors import ExpertChatError
from expertchat.modes import plan
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[2]
MIXTRAL = ModelConfig(name="mixtral", path="mistralai/Mixtral-8x7B-Instruct-v0.1", load_in_4bit=True)
LLAMA3 = ModelConfig(name="llama3", path="meta-llama/Meta-Llama-3-8B-Instruct")
BELUGA = HardwareConfig(name="beluga", gpus=4, gpu_memory_gb=16.9, gpu_name="V100", compute_capability=7.0)
GB = 1e9


def test_nf4_bytes_per_weight_are_what_bitsandbytes_stores():
    """4-bit codes, an 8-bit absmax per block of 64, an fp32 constant per 256 blocks: 0.5159 bytes a weight."""
    import torch

    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(1024, 512, dtype=torch.float16)
    packed, state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    stored = (packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
              + state.state2.absmax.numel() * state.state2.absmax.element_size())
    assert stored == pytest.approx(plan.NF4_BYTES * weight.numel())


def _cfg(*overrides: str):
    return compose_cfg("+experiment=mixtral_vs_llama", *overrides)


def test_published_sizes_mixtral_in_4_bit_and_llama3_in_fp16():
    result = plan.plan(_cfg())
    mixtral, llama = result["models"]
    assert (mixtral["dtype"], llama["dtype"]) == ("float16", "float16")  # auto on a V100
    assert abs(mixtral["params"] - 46.7e9) < 0.05e9  # Mistral AI: 46.7 B
    assert 24 * GB <= mixtral["weights"] <= 26 * GB  # ~24-26 GB in nf4 (published QLoRA figures, the seed)
    assert 15.5 * GB <= llama["weights"] <= 16.5 * GB  # ~16 GB in fp16
    assert mixtral["unquantized_experts"] == 0


def test_mixtrals_experts_count_as_nf4():
    """Per-expert nn.Linear layers (engine/experts.py): bitsandbytes quantizes the experts with attention."""
    shape = plan.shape(MIXTRAL)
    assert shape.fused_experts == 0
    experts = 32 * 8 * 3 * 4096 * 14336  # w1, w2, w3 of 8 experts in 32 layers
    assert shape.quantized == experts + 32 * (2 * 4096 ** 2 + 2 * 4096 * 1024)  # + q, o and the grouped k, v


def test_fused_experts_under_4_bit_are_a_blocker(tmp_path):
    """A MoE type without per-expert layers here (Qwen3-MoE): its 3-D experts would stay 16-bit; the plan says
    loading would stop, naming a parameter."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "moe_intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 8}))
    result = plan.plan(compose_cfg(f"actor.path={tmp_path}", "actor.package=null", "actor.gguf_file=null",
                                   "actor.load_in_4bit=true", "hardware=a100_40gb"))
    assert not result["fits"]
    assert any(b.startswith("actor.load_in_4bit=true: ") and "(e.g. model.layers.0.mlp.experts." in b
               and "loading stops" in b
               for b in result["blockers"])


def test_the_seeds_arithmetic_both_models_on_one_4x16gb_node():
    """The seed: "Mixtral in 4 bit ~27 GB, Llama-3-8B ~16 GB, 43 GB in all: 3 GPUs were just short, so 4"."""
    result = plan.plan(_cfg())
    assert 40 * GB <= result["held"] <= 43 * GB
    assert result["fits"] and result["unit"] == "per GPU"
    assert not plan.plan(_cfg("hardware.gpus=3"))["fits"]


def test_the_flagship_fits_an_a100_node_and_says_which_dtype(tmp_path):
    cfg = replace(_cfg("hardware=a100_40gb"), run_dir=str(tmp_path))
    result = plan.run(cfg, checked=plan.plan(cfg))
    assert result["fits"] and {m["dtype"] for m in result["models"]} == {"bfloat16"}
    lines = plan.table_lines(cfg, result)
    assert lines[-1].endswith("fits on hardware=a100_40gb") and any("bfloat16 (dtype auto" in line for line in lines)
    assert any(line.startswith("  actor: bfloat16") and "nf4: " in line and "flash_attention_2 possible" in line
               for line in lines)  # dtype, quantization and attention named per model
    v100 = plan.table_lines(_cfg(), plan.plan(_cfg()))
    assert any(line.startswith("  judge: float16") and "no FlashAttention 2" in line for line in v100)


def test_a_plan_that_does_not_fit_stops_with_what_would(tmp_path):
    """A decoding batch too large for the node: one line naming the largest batch that fits, and plan.json."""
    cfg = compose_cfg("model@actor=llama3_8b_instruct", "model@judge=qwen3_4b_instruct", "hardware=beluga",
                      "generation.batch_size=64", "actor.max_length=4096", "judge.max_length=4096")
    cfg = replace(cfg, run_dir=str(tmp_path))
    with pytest.raises(ExpertChatError) as info:
        plan.run(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith("plan: does not fit hardware=beluga: needs ")
    assert "would fit: " in message and "hardware=a100_40gb" in message
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["fits"] is False and written["would_fit"] and written["stage"] == "actor decoding"
    smaller = int(message.split("generation.batch_size=")[1].split(";")[0])
    assert plan.plan(replace(cfg, generation=replace(cfg.generation, batch_size=smaller)))["fits"]
    assert not plan.plan(replace(cfg, generation=replace(cfg.generation, batch_size=smaller + 1)))["fits"]


def test_too_few_gpus_names_the_smallest_count_that_fits():
    cfg = compose_cfg("model@actor=llama3_8b_instruct", "model@judge=qwen3_4b_instruct", "hardware=beluga",
                      "hardware.gpus=1", "actor.max_length=1024", "judge.max_length=1024", "generation.batch_size=8")
    result = plan.plan(cfg)
    assert not result["fits"] and result["held"] > cfg.hardware.gpu_memory_gb * GB  # 24 GB of fp16 weights
    assert "4 x Tesla V100-SXM2-16GB (hardware.gpus=4)" in plan.suggestions(cfg, result)
    assert plan.plan(replace(cfg, hardware=replace(cfg.hardware, gpus=4)))["fits"]
    assert not plan.plan(replace(cfg, hardware=replace(cfg.hardware, gpus=3)))["fits"]


def test_the_cpu_plans_against_this_machines_ram():
    cfg = compose_cfg()
    result = plan.plan(cfg)
    assert result["unit"] == "RAM" and result["capacity"] == plan.machine_ram() and result["fits"]
    assert result["models"][1].get("shared") == "actor"  # one SmolLM2 in memory for both roles
    four_bit = plan.plan(compose_cfg("actor.load_in_4bit=true"))
    assert not four_bit["fits"] and "needs a GPU" in four_bit["blockers"][0]


def test_lora_parameters_and_the_reference():
    cfg = _cfg()
    llama = plan.plan(cfg)["models"][1]
    r = cfg.training.lora.r  # q, k, v, o of 32 layers: r * (in + out) each
    assert llama["train"]["adapter_params"] == 32 * r * ((4096 + 4096) * 2 + (4096 + 1024) * 2)
    assert llama["train"]["states"] == 16 * llama["train"]["adapter_params"]
    mixtral = plan.plan(cfg)["models"][0]  # nf4 on GPUs: paged 8-bit AdamW (training.optimizer=auto)
    assert mixtral["train"]["states"] == 10 * mixtral["train"]["adapter_params"]
    fp32_adam = plan.plan(replace(cfg, training=replace(cfg.training, optimizer="adamw_torch")))["models"][0]
    assert fp32_adam["train"]["states"] == 16 * fp32_adam["train"]["adapter_params"]
    base = plan.plan(replace(cfg, training=replace(cfg.training, reference="base")))["models"][1]
    assert base["train"]["reference"] == 0  # the adapter-disabled base: nothing extra
    frozen = plan.plan(replace(cfg, training=replace(cfg.training, steps=0)))["models"][1]
    assert frozen["train"] is None


def test_kv_cache_of_contrastive_search_holds_top_k_rows():
    cfg = _cfg()
    llama = plan.plan(cfg)["models"][1]
    g = cfg.generation  # 2 (K, V) x 32 layers x 8 heads x 128 dims x fp16, top_k rows per prompt
    assert llama["decode"]["kv"] == 2 * 32 * 8 * 128 * 2 * g.batch_size * g.top_k * (3072 + g.max_new_tokens)


@pytest.mark.e2e
def test_the_cli_plans_the_flagship_without_loading_weights(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "expertchat", "+experiment=mixtral_vs_llama", "mode=plan",
                           f"hydra.run.dir={tmp_path / 'beluga'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    log = proc.stderr + proc.stdout
    assert "Memory plan for hardware=beluga" in log and "mixtral_8x7b_instruct" in log and "float16" in log
    assert proc.returncode == 0 and "fits on hardware=beluga" in log, log[-2000:]
    proc = subprocess.run([sys.executable, "-m", "expertchat", "+experiment=mixtral_vs_llama", "mode=plan",
                           "hardware=a100_40gb", f"hydra.run.dir={tmp_path / 'a100'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verdict: fits on hardware=a100_40gb" in proc.stderr + proc.stdout
    assert json.loads((tmp_path / "a100" / "plan.json").read_text())["fits"] is True


def test_the_plan_places_each_model_and_loading_takes_its_maps(monkeypatch):
    """mode=plan's placement (accelerate's device map under the plan's budgets) is what a run loads with; without
    the planned GPUs a run stops in one line before loading."""
    cfg = _cfg()
    result = plan.check(cfg)
    assert set(result["placement"]) == {"actor", "judge"} and result["fits"]
    for placed in result["placement"].values():
        assert not placed["offloaded"] and set(placed["device_map"].values()) == {0, 1, 2, 3}
        assert set(placed["max_memory"]) == {0, 1, 2, 3, "cpu"} and placed["max_memory"]["cpu"] == 0
    lines = plan.table_lines(cfg, result)
    assert any(line.startswith("  actor placement: max_memory ") and "GPU 3: layers" in line for line in lines)
    monkeypatch.setattr(plan, "check_gpus", lambda hw: None)  # as on a node with the planned GPUs
    assert plan.device_maps(cfg) == {r: p["device_map"] for r, p in result["placement"].items()}
    monkeypatch.undo()
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ExpertChatError, match="hardware=beluga plans 4 GPU"):
            plan.device_maps(cfg)


def test_a_run_whose_plan_does_not_fit_stops_with_the_verdict():
    cfg = _cfg("generation.batch_size=64")
    with pytest.raises(ExpertChatError, match=r"^plan: does not fit hardware=beluga: needs .* GB per GPU of 16\.9"):
        plan.device_maps(cfg)


def test_prefix_caches_and_merged_copies_are_counted():
    cpu = plan.plan(compose_cfg("generation.prefix_cache_gb=1"))
    assert cpu["prefix"] == 2 * 2**30 and cpu["models"][0]["decode"]["prefix"] == 2 * 2**30
    assert cpu["merged_copies"] == 3 * cpu["models"][0]["weights"]  # SmolLM2 on a CPU: room for three copies
    never = plan.plan(compose_cfg("generation.prefix_cache_gb=1", "training.lora.merged_copies=never"))
    assert never["merged_copies"] == 0 and never["need"] < cpu["need"]
    assert plan.plan(_cfg())["merged_copies"] == 0  # 4-bit and spread bases run unmerged
