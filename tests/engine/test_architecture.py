"""A model's architecture without its weights: parameter counts against the published ones, the weights
bitsandbytes quantizes against the library itself, fused MoE experts, the dtype ``auto`` means on each machine."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from expertchat.config.schema import HardwareConfig, ModelConfig
from expertchat.engine import architecture
from expertchat.errors import ExpertChatError
from tests.conftest import smollm2_config

MIXTRAL = ModelConfig(name="mixtral", path="mistralai/Mixtral-8x7B-Instruct-v0.1", load_in_4bit=True)
BELUGA = HardwareConfig(name="beluga", gpus=4, gpu_memory_gb=16.9, gpu_name="V100", compute_capability=7.0)
GB = 1e9


@pytest.mark.parametrize("path, published, tolerance", [
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", 46.7e9, 0.05e9),  # Mistral AI: 46.7B total
    ("meta-llama/Meta-Llama-3-8B-Instruct", 8_030_261_248, 0),  # the model card's safetensors count
    ("Qwen/Qwen3-4B-Instruct-2507", 4.0e9, 0.05e9),  # the model card: 4.0B
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008, 0),  # the model card's safetensors count
])
def test_parameter_counts_match_the_published_ones(path, published, tolerance):
    assert abs(architecture.shape(ModelConfig(name="m", path=path)).params - published) <= tolerance


def test_the_embedded_model_plans_from_its_own_config_json_and_counts_what_loads(smollm2):
    shape = architecture.shape(smollm2_config())
    assert shape.source.endswith("config.json") and "converted" in shape.source
    assert shape.params == sum(p.numel() for p in smollm2.model.parameters())


def test_the_weights_bitsandbytes_quantizes_are_the_ones_counted(smol_tokenizer, tmp_path):
    """A tiny random Mixtral loaded in 4 bit on the CPU by the project's loader: the plan's nf4 parameters are the
    loaded model's Params4bit (two codes a byte), the experts included; embeddings, lm_head, norms and router stay
    as they were; nothing is left fused."""
    from expertchat.engine.models import load_model
    from tests.conftest import bnb_cpu, save_tiny_mixtral

    bnb_cpu()
    fused = save_tiny_mixtral(smol_tokenizer, tmp_path)
    cfg = ModelConfig(name="tiny", path=str(tmp_path), load_in_4bit=True, bnb_4bit_compute_dtype="float32")
    shape = architecture.shape(cfg)
    loaded = load_model(cfg).model
    four_bit = sum(2 * p.numel() for p in loaded.parameters() if type(p).__name__ == "Params4bit")
    assert shape.quantized == four_bit
    assert shape.params == sum(p.numel() for p in fused.parameters())
    assert shape.fused_experts == 0 and {leaf: n for leaf, n, _ in shape.lora}["w2"] == 2 * 4


def test_auto_is_fp16_on_a_v100_bf16_on_an_a100():
    assert architecture.assumed_dtype("auto", BELUGA) == "float16"
    assert architecture.assumed_dtype("auto", replace(BELUGA, compute_capability=8.0)) == "bfloat16"
    assert architecture.assumed_dtype("float32", BELUGA) == "float32"


def test_an_unknown_architecture_is_one_line(tmp_path):
    with pytest.raises(ExpertChatError, match=r"<role>\.path=<local folder with config\.json>") as info:
        architecture.shape(ModelConfig(name="x", path="some-org/unknown-model"))
    assert "\n" not in str(info.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                                                      "intermediate_size": 16, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2}))
    assert architecture.shape(ModelConfig(name="x", path=str(tmp_path))).source == str(tmp_path / "config.json")
