"""Merged copies: views of a trained adapter compute what the unmerged path computes (logits, greedy and seeded
sampled tokens), copies follow the adapters through rounds, and 'auto' falls back to the unmerged path in one line."""

from __future__ import annotations

import logging

import pytest
import torch

from expertchat.config.schema import GenerationConfig, LoraSettings
from expertchat.engine.generation import generate
from expertchat.errors import ExpertChatError
from expertchat.policies.adapters import Policies
from expertchat.policies.merging import MergedCopies
from expertchat.runs.store import RunStore
from expertchat.stages.training import train_round
from tests.training_helpers import DCFG, IDS, cfg, fake_dialogues, length_reward, logits, tiny_pair

PROMPTS = ["What drives plate tectonics?", "Name one hotspot.", "Why do oceans differ in salinity?"]


def trained(tokenizer, tmp_path, rounds: int = 1, mode: str = "auto") -> Policies:
    policies = Policies(tiny_pair(tokenizer), cfg(lora=LoraSettings(merged_copies=mode)))
    for r in range(rounds):
        train_round(policies, r, fake_dialogues(), length_reward, DCFG, RunStore(tmp_path))
    return policies


def unmerged(policies: Policies):
    """Run ``policies``' views unmerged from now on (what training.lora.merged_copies=never computes)."""
    policies.merged = MergedCopies("never")


def test_merged_views_compute_what_the_adapters_compute(smol_tokenizer, tmp_path):
    policies = trained(smol_tokenizer, tmp_path)
    merged = {role: logits(policies.models[role], IDS) for role in ("actor", "judge")}
    assert policies.merged.built == 2 and len(policies.merged) == 2
    unmerged(policies)
    for role in ("actor", "judge"):
        plain = logits(policies.models[role], IDS)
        assert torch.allclose(merged[role], plain, atol=1e-5)
        assert torch.equal(merged[role].argmax(-1), plain.argmax(-1))
    assert not torch.allclose(merged["actor"], merged["judge"], atol=1e-3)  # each role its own adapter


@pytest.mark.parametrize("top_k", [1, 0])  # greedy, seeded sampling
def test_merged_decoding_gives_the_unmerged_tokens(smol_tokenizer, tmp_path, top_k):
    policies = trained(smol_tokenizer, tmp_path)
    gen = GenerationConfig(max_new_tokens=12, top_k=top_k)

    def tokens(role):
        return [g.token_ids for g in generate(policies.models[role].model, smol_tokenizer, PROMPTS, gen, seed=3)]

    merged = {role: tokens(role) for role in ("actor", "judge")}
    assert policies.merged.built == 2
    unmerged(policies)
    assert {role: tokens(role) for role in ("actor", "judge")} == merged


def test_copies_follow_the_adapters_through_rounds(smol_tokenizer, tmp_path):
    store = RunStore(tmp_path)
    policies = Policies(tiny_pair(smol_tokenizer), cfg())
    train_round(policies, 0, fake_dialogues(), length_reward, DCFG, store)
    round0 = logits(policies.models["actor"], IDS)
    sizes = []

    def reward_for(judge):
        def reward(prompts, completions, **kwargs):
            logits(judge, IDS)  # the judge computes on its round-start copy
            sizes.append(len(policies.merged))
            return [float(len(c[0]["content"])) for c in completions]

        return reward

    train_round(policies, 1, fake_dialogues(), reward_for, DCFG, store)
    assert max(sizes) <= 2 and len(policies.merged) == 0  # the snapshots' copies go with the stage
    round1 = logits(policies.models["actor"], IDS)  # a new copy: the adapter trained in round 1
    assert not torch.allclose(round0, round1, atol=1e-4)
    unmerged(policies)
    assert torch.allclose(logits(policies.models["actor"], IDS), round1, atol=1e-5)


def test_resumed_policies_merge_the_loaded_adapters(smol_tokenizer, tmp_path):
    store = RunStore(tmp_path)
    policies = trained(smol_tokenizer, tmp_path, mode="never")
    store.finish(0, "training", {})
    expected = logits(policies.models["judge"], IDS)
    resumed = Policies(tiny_pair(smol_tokenizer), cfg())
    resumed.restore(store, rounds=2)
    assert torch.allclose(logits(resumed.models["judge"], IDS), expected, atol=1e-5)
    assert resumed.merged.built == 1


def test_never_keeps_the_unmerged_path(smol_tokenizer, tmp_path):
    policies = trained(smol_tokenizer, tmp_path, mode="never")
    logits(policies.models["actor"], IDS)
    assert policies.merged.built == 0


def test_auto_falls_back_in_one_line_and_always_refuses(smol_tokenizer, tmp_path, monkeypatch, caplog):
    policies = trained(smol_tokenizer, tmp_path, mode="never")
    peft = next(iter(policies._peft.values()))
    monkeypatch.setattr("expertchat.policies.merging.free_bytes", lambda device: 1000)
    copies = MergedCopies("auto")
    with caplog.at_level(logging.INFO, logger="expertchat.policies.merging"):
        assert copies.get(peft, "actor") is None and copies.get(peft, "judge") is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "adapters run unmerged" in lines[0] and "GB free" in lines[0]
    with pytest.raises(ExpertChatError, match="merged_copies=always: cannot copy adapter 'actor'"):
        MergedCopies("always").get(peft, "actor")
    monkeypatch.undo()
    monkeypatch.setattr("expertchat.policies.merging.is_quantized", lambda model: True)
    with pytest.raises(ExpertChatError, match="the base is quantized"):
        MergedCopies("always").get(peft, "actor")


def test_an_unknown_mode_is_a_config_error():
    with pytest.raises(ExpertChatError, match="config error: training.lora.merged_copies is 'sometimes'"):
        LoraSettings(merged_copies="sometimes")
