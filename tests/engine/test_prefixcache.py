"""Prefix caching: the same tokens with and without it (sampling, greedy, contrastive; finished rows, chunks,
re-rendered prompts that do not extend the cached tokens), the memory cap, and models it does not apply to."""

from __future__ import annotations

import logging

import pytest
import torch

from expertchat.config.schema import GenerationConfig
from expertchat.engine.generation import generate
from expertchat.engine.models import render_prompt
from expertchat.engine.prefixcache import Entry, PrefixStore, cacheable
from tests.conftest import make_tiny_model

QUESTIONS = ["Hi.", "What drives a Plinian eruption, and why do some columns collapse?", "Explain soil carbon.",
             "Tell me about medieval trade routes between Venice and Alexandria, with one contract."]
STRATEGIES = [
    GenerationConfig(max_new_tokens=10, top_k=30, batch_size=3),  # seeded sampling, two chunks
    GenerationConfig(max_new_tokens=10, top_k=1),  # greedy
    GenerationConfig(strategy="contrastive", max_new_tokens=10, top_k=3, penalty_alpha=0.6, batch_size=3),
]


@pytest.fixture(scope="module")
def model(smol_tokenizer):
    return make_tiny_model(smol_tokenizer, seed=1, hidden=32, layers=3)


def frequent_tokens(outs) -> list[int]:
    """The 3 tokens a run produced most: used as stop tokens so that rows finish at different steps."""
    counts: dict[int, int] = {}
    for turn in outs:
        for ids, _, _ in turn:
            for t in ids:
                counts[t] = counts.get(t, 0) + 1
    return sorted(counts, key=lambda t: -counts[t])[:3]


def three_turns(model, tok, cfg, store, stops):
    """Each prompt, then the prompt re-rendered with the reply and a new user message, twice."""
    turns = [[(False, q)] for q in QUESTIONS]
    keys = [f"d{i}" for i in range(len(QUESTIONS))]
    outs = []
    for turn in range(3):
        prompts = [render_prompt(tok, "You are an expert.", t) for t in turns]
        out = generate(model, tok, prompts, cfg, stop_token_ids=stops, seed=turn, store=store, keys=keys,
                       keep=turn < 2)
        outs.append([(o.token_ids, o.finished, o.prompt_tokens) for o in out])
        for t, o in zip(turns, out):
            t += [(True, o.text), (False, f"Go on about point {turn}.")]
    return outs


@pytest.mark.parametrize("cfg", STRATEGIES, ids=["sample", "greedy", "contrastive"])
def test_prefix_caching_gives_the_same_tokens(model, smol_tokenizer, cfg):
    stops = frequent_tokens(three_turns(model, smol_tokenizer, cfg, None, [-5]))
    store = PrefixStore(cap_gb=1.0)
    cached = three_turns(model, smol_tokenizer, cfg, store, stops)
    plain = three_turns(model, smol_tokenizer, cfg, None, stops)
    assert cached == plain
    assert store.reused_tokens > 0 and not store.entries and store.nbytes == 0  # reused, freed after the last turn
    assert any(f for turn in plain for _, f, _ in turn)  # rows left the batch early


def test_a_prompt_that_does_not_extend_the_cache_is_matched_on_its_common_prefix(model, smol_tokenizer):
    cfg = GenerationConfig(max_new_tokens=6, top_k=1)
    first = render_prompt(smol_tokenizer, "You are an expert.", [(False, QUESTIONS[1])])
    store = PrefixStore(cap_gb=1.0)
    generate(model, smol_tokenizer, [first], cfg, store=store, keys=["d"])
    # the system message changes: only the tokens before the change can be reused
    second = render_prompt(smol_tokenizer, "You are a geologist.", [(False, QUESTIONS[1]), (True, "Magma."),
                                                                     (False, "More.")])
    reused = store.reused_tokens
    with_store = generate(model, smol_tokenizer, [second], cfg, store=store, keys=["d"])
    shared = store.reused_tokens - reused
    assert 0 < shared < len(smol_tokenizer(first, add_special_tokens=False)["input_ids"]) - 6
    assert with_store[0].token_ids == generate(model, smol_tokenizer, [second], cfg)[0].token_ids


def test_the_cap_refuses_entries_and_says_so_once(caplog):
    store = PrefixStore(cap_gb=1000 / 2**30)  # 1000 bytes
    small = Entry([1, 2], torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))  # 64 bytes
    big = Entry([1] * 20, torch.zeros(2, 1, 20, 4), torch.zeros(2, 1, 20, 4))  # 1280 bytes
    with caplog.at_level(logging.WARNING, logger="expertchat.engine.prefixcache"):
        assert store.put("a", small) and not store.put("b", big) and not store.put("c", big)
    assert store.refused == 2 and sum("prefix_cache_gb" in r.message for r in caplog.records) == 1
    assert store.match("a", [1, 2, 3], need_hidden=False) == (small, 2)
    assert store.match("a", [1, 2], need_hidden=False) == (small, 1)  # the last prompt token is always fed
    assert store.match("a", [1, 2, 3], need_hidden=True) == (None, 0)  # contrastive needs hidden states
    assert store.match("b", [1, 2, 3], need_hidden=False) == (None, 0)
    store.put("a", small)
    assert store.nbytes == small.nbytes
    store.drop("a")
    assert store.nbytes == 0 and not store.entries


def test_sliding_window_models_prefill_every_turn(smol_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    sliding = MistralForCausalLM(MistralConfig(vocab_size=len(smol_tokenizer), hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                               sliding_window=8)).eval()
    assert not cacheable(sliding)
    cfg = GenerationConfig(max_new_tokens=6, top_k=1)
    store = PrefixStore(cap_gb=1.0)
    assert three_turns(sliding, smol_tokenizer, cfg, store, [-5]) == three_turns(sliding, smol_tokenizer, cfg,
                                                                                 None, [-5])
    assert store.reused_tokens == 0
