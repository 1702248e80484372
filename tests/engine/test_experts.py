"""Mixtral with one nn.Linear per expert projection: the same logits as transformers' fused Mixtral, every expert
projection quantized in 4 bit, published checkpoint names on save, and a one-line stop for fused experts left in
16 bit under load_in_4bit."""

from __future__ import annotations

import json

import pytest
import torch

from expertchat.config.schema import ModelConfig
from expertchat.engine.experts import LinearExperts, UnfusedMixtralForCausalLM
from expertchat.engine.models import load_model
from expertchat.errors import ExpertChatError
from tests.conftest import bnb_cpu, save_tiny_mixtral

IDS = torch.tensor([[1, 20, 300, 4000, 50, 7, 9, 11], [3, 5, 8, 13, 21, 34, 55, 89]])


@pytest.fixture
def tiny_mixtral(smol_tokenizer, tmp_path):
    return save_tiny_mixtral(smol_tokenizer, tmp_path / "mixtral"), tmp_path / "mixtral"


def test_unfused_fp32_logits_equal_transformers_mixtral(tiny_mixtral):
    fused, folder = tiny_mixtral
    lm = load_model(ModelConfig(name="mixtral", path=str(folder), dtype="float32", device="cpu"))
    assert type(lm.model) is UnfusedMixtralForCausalLM
    assert all(isinstance(layer.mlp.experts, LinearExperts) for layer in lm.model.model.layers)
    assert not [n for n, p in lm.model.named_parameters() if p.dim() >= 3]
    with torch.no_grad():
        torch.testing.assert_close(lm.model(IDS).logits, fused(IDS).logits, atol=1e-5, rtol=0)


def test_saving_writes_the_published_per_expert_names(tiny_mixtral, tmp_path):
    from safetensors import safe_open

    _, folder = tiny_mixtral
    UnfusedMixtralForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "resaved")
    with safe_open(tmp_path / "resaved" / "model.safetensors", "pt") as saved, \
            safe_open(folder / "model.safetensors", "pt") as published:
        names = set(published.keys())
        assert set(saved.keys()) == names
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["model_type"] == "mixtral"


def test_in_4_bit_every_expert_projection_is_nf4_and_the_logits_finite(tiny_mixtral):
    bnb = bnb_cpu()
    _, folder = tiny_mixtral
    lm = load_model(ModelConfig(name="mixtral", path=str(folder), load_in_4bit=True, bnb_4bit_compute_dtype="float32"))
    projections = {n: m for n, m in lm.model.named_modules() if n.rpartition(".")[2] in {"w1", "w2", "w3"}}
    assert len(projections) == 2 * 4 * 3
    assert all(isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state.quant_type == "nf4"
               for m in projections.values())
    with torch.no_grad():
        assert torch.isfinite(lm.model(IDS).logits).all()


def test_fused_experts_left_16_bit_under_load_in_4bit_stop_in_one_line(smol_tokenizer, tmp_path):
    """Qwen3-MoE has no un-fused class here: its 3-D experts would stay 16-bit, so loading stops naming one."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    bnb_cpu()
    Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=len(smol_tokenizer), hidden_size=16, intermediate_size=32,
                                       moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, head_dim=8)
                        ).save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ExpertChatError, match=r"qwen\.load_in_4bit=true: parameter model\.layers\.0\.mlp\.experts\."
                                              r"\w+ \(4, \d+, \d+\) stays torch\.\w+") as info:
        load_model(ModelConfig(name="qwen", path=str(tmp_path), load_in_4bit=True))
    assert "\n" not in str(info.value)
