"""Pairwise verdicts (``expertchat.judging.pairwise``): the choice tokens, the batched verdict against a plain
forward pass, both orders asked, and how a verdict pair is counted."""

from __future__ import annotations

import pytest
import torch

from expertchat.config.evaluation import PairwiseConfig
from expertchat.config.schema import ModelConfig
from expertchat.engine.models import LoadedModel
from expertchat.errors import ExpertChatError
from expertchat.judging.pairwise import PairVerdict, PairwiseJudge, choice_token_ids
from tests.conftest import make_tiny_model

ITEMS = [("What is the capital of France?", "Paris.", "It is Paris, on the Seine, since the 10th century."),
         ("Why is the sky blue?", "Rayleigh scattering of short wavelengths.", "Because of the sea."),
         ("Name a prime.", "7", "Seven is prime: its only divisors are one and itself.")]


def test_choice_tokens_are_the_tokens_the_judge_would_emit_after_the_prefix(smol_tokenizer):
    a, b = choice_token_ids(smol_tokenizer, "Verdict: [[", ["A", "B"])
    ids = smol_tokenizer("Verdict: [[B]]", add_special_tokens=False)["input_ids"]
    prefix = smol_tokenizer("Verdict: [[", add_special_tokens=False)["input_ids"]
    assert ids[len(prefix)] == b != a
    with pytest.raises(ExpertChatError, match="merges with the end of the verdict prefix"):
        choice_token_ids(smol_tokenizer, "Verdict: ", ["A", "B"])  # " A" is one token with the space
    with pytest.raises(ExpertChatError, match="begin with the same token"):
        choice_token_ids(smol_tokenizer, "[[", ["A", "Aardvark"])


def test_pairwise_config_rejects_a_prompt_without_both_answers():
    with pytest.raises(ExpertChatError, match="evaluation.pairwise.prompt"):
        PairwiseConfig(prompt="{question} {answer_a}")
    with pytest.raises(ExpertChatError, match="evaluation.pairwise.prompt may only use"):
        PairwiseConfig(prompt="{question} {answer_a} {answer_b} {other}")
    with pytest.raises(ExpertChatError, match="evaluation.pairwise.choices"):
        PairwiseConfig(choices=["A", "A"])


def tiny(tok) -> PairwiseJudge:
    lm = LoadedModel("tiny", make_tiny_model(tok, dtype=torch.float32), tok, ModelConfig(name="tiny"))
    return PairwiseJudge(lm, PairwiseConfig(), batch_size=2)


@torch.no_grad()
def test_batched_verdicts_equal_a_plain_forward_of_each_prompt(smol_tokenizer):
    judge = tiny(smol_tokenizer)
    prompts = [judge.render(q, x, y) for q, x, y in ITEMS] + [judge.render(q, y, x) for q, x, y in ITEMS]
    assert len({len(p) for p in prompts}) > 1  # padded batches of different lengths
    got = judge.p_first(prompts)
    for ids, p in zip(prompts, got):
        logits = judge.lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        want = logits[judge.letters].softmax(-1)[0].item()
        assert p == pytest.approx(want, abs=1e-5)
    text = smol_tokenizer.decode(prompts[0])
    assert text.endswith("Verdict: [[") and ITEMS[0][1] in text and text.index(ITEMS[0][1]) < text.index(ITEMS[0][2])


def test_compare_asks_both_orders(smol_tokenizer):
    judge = tiny(smol_tokenizer)
    verdicts = judge.compare(ITEMS)
    for (q, x, y), v in zip(ITEMS, verdicts):
        assert v.p_x_first == pytest.approx(judge.p_first([judge.render(q, x, y)])[0], abs=1e-6)
        assert v.p_x_second == pytest.approx(1 - judge.p_first([judge.render(q, y, x)])[0], abs=1e-6)


def test_a_verdict_counts_only_when_both_orders_agree():
    assert PairVerdict(0.8, 0.6).outcome == 1.0 and PairVerdict(0.3, 0.1).outcome == 0.0
    slot = PairVerdict(0.9, 0.2)  # picks whatever is shown first
    assert not slot.consistent and slot.outcome == 0.5 and slot.prefers_first == (True, True)
    assert PairVerdict(0.5, 0.9).outcome == 0.5 and PairVerdict(0.5, 0.9).prefers_first == (None, False)
    assert PairVerdict(0.8, 0.6).p_x == pytest.approx(0.7)
