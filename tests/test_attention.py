"""Decode-step attention: the grouped-query path computes what transformers' SDPA computes (with left padding,
causal suffixes, grouped heads), hands what it does not cover to SDPA, and is what a CPU load picks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from expertchat.attention import MAX_QUERY, NAME, grouped_attention, register
from expertchat.config import GenerationConfig, ModelConfig
from expertchat.generation import generate
from expertchat.models import load_model
from tests.conftest import make_tiny_model

def attention_module() -> torch.nn.Module:
    module = torch.nn.Module().eval()
    module.num_key_value_groups = 3  # what a Llama attention layer carries (SDPA repeats the KV heads by it)
    return module


PROMPTS = ["Why is the sky blue?", "Name a prime.", "Explain plate tectonics to a geologist in one sentence."]


def inputs(q: int, dtype=torch.float32, batch: int = 3, heads: int = 6, kv_heads: int = 2, past: int = 11):
    """Random q/k/v and SDPA's boolean mask for ``q`` new positions after ``past`` cached ones, row r padded on
    the left by 3 * r positions."""
    torch.manual_seed(q)
    length = past + q
    query = torch.randn(batch, heads, q, 8, dtype=dtype)
    key, value = (torch.randn(batch, kv_heads, length, 8, dtype=dtype) for _ in range(2))
    causal = torch.ones(q, length, dtype=torch.bool).tril(diagonal=past)
    mask = causal.expand(batch, 1, q, length).clone()
    for r in range(batch):
        mask[r, :, :, :3 * r] = False
    return query, key, value, mask


@pytest.mark.parametrize("q", [1, 4, MAX_QUERY + 8])  # a decode step, a suffix, a prefill (SDPA's path)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_attention_computes_what_sdpa_computes(q, dtype, atol):
    module = attention_module()
    query, key, value, mask = inputs(q, dtype)
    got, _ = grouped_attention(module, query, key, value, mask, scaling=0.3)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert got.shape == expected.shape == (3, q, 6, 8)
    assert torch.allclose(got.float(), expected.float(), atol=atol)


def test_a_step_with_nothing_to_attend_to_stays_finite():
    query, key, value, mask = inputs(2)
    mask[0] = False  # e.g. a left pad's position in a short prefill
    got, _ = grouped_attention(attention_module(), query, key, value, mask)
    assert torch.isfinite(got).all()


def test_one_new_position_needs_no_mask():
    module = attention_module()
    query, key, value, _ = inputs(1)
    got, _ = grouped_attention(module, query, key, value, None)
    expected, _ = sdpa_attention_forward(module, query, key, value, None)
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_model_decodes_the_same_tokens_with_grouped_attention(smol_tokenizer):
    register()
    sdpa = make_tiny_model(smol_tokenizer, hidden=32)  # 2 query heads on 1 KV head
    grouped = make_tiny_model(smol_tokenizer, hidden=32)
    grouped.set_attn_implementation(NAME)
    assert grouped.config._attn_implementation == NAME
    gen = GenerationConfig(max_new_tokens=10, top_k=1)
    for cfg in (gen, dataclasses.replace(gen, strategy="contrastive", top_k=3)):
        a = [g.token_ids for g in generate(sdpa, smol_tokenizer, PROMPTS, cfg)]
        b = [g.token_ids for g in generate(grouped, smol_tokenizer, PROMPTS, cfg)]
        assert a == b


def test_a_cpu_load_picks_grouped_attention_unless_told(smol_tokenizer, tmp_path):
    make_tiny_model(smol_tokenizer).save_pretrained(tmp_path / "m")
    smol_tokenizer.save_pretrained(tmp_path / "m")
    cfg = ModelConfig(name="tiny", path=str(tmp_path / "m"), device="cpu", dtype="float32")
    assert load_model(cfg).model.config._attn_implementation == NAME
    told = load_model(dataclasses.replace(cfg, attn_implementation="sdpa"))
    assert told.model.config._attn_implementation == "sdpa"
