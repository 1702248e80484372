"""The signal registry: each signal scores a hand-made measurement as its formula says; what a category needs follows
from the registry; the configurable signals are the registry's; a new signal is one entry."""

from __future__ import annotations

import math

import pytest
import torch

from expertchat.config import judging as judging_config
from expertchat.config.schema import JudgingConfig, RubricCategory
from expertchat.judging import signals
from expertchat.judging.scoring import likelihood_score
from expertchat.judging.signals import SIGNALS, CategoryScore, Measured, needs, resolve


def measured(**kw) -> Measured:
    """One item: two phrasings of 'knowledge' (all mass on 8, and on 8 and 10 half each), a PMI of 20 nats."""
    p8 = torch.zeros(10).index_fill_(0, torch.tensor([7]), 1.0)
    p8_10 = torch.zeros(10).index_fill_(0, torch.tensor([7, 9]), 0.5)
    base = dict(answer_tokens=12, answer_total_tokens=12, dists={("knowledge", 0): (p8, 0.9),
                                                                  ("knowledge", 1): (p8_10, 0.7)}, pmi=20.0)
    return Measured(**{**base, **kw})


def test_rubric_is_the_expected_score_of_the_averaged_phrasings():
    cs = SIGNALS["rubric"].score(measured(), "knowledge", JudgingConfig())
    assert cs.signal == "rubric" and cs.score == pytest.approx(0.75 * 8 + 0.25 * 10)
    assert cs.argmax == 8 and cs.mass == pytest.approx(0.8) and sum(cs.dist) == pytest.approx(1)
    assert cs.entropy == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_rubric_calibration_divides_by_the_content_free_distribution():
    uniform = torch.full((10,), 0.1)
    favours_10 = torch.full((10,), 0.05).index_fill_(0, torch.tensor([9]), 0.55)
    m = measured(calibrate=True, cf_dists={("knowledge", 0): uniform, ("knowledge", 1): favours_10})
    second = torch.zeros(10).index_fill_(0, torch.tensor([7, 9]), 0.5) / favours_10
    second = second / second.sum()
    expected = 0.5 * 8 + 0.5 * float((second * torch.arange(1, 11)).sum())
    assert SIGNALS["rubric"].score(m, "knowledge", JudgingConfig()).score == pytest.approx(expected)


def test_parse_reads_the_rating_and_marks_a_failure():
    m = measured(replies={"knowledge": "Fine. Rating: [[7]]", "depth": "no number here"})
    assert SIGNALS["parse"].score(m, "knowledge", JudgingConfig(mode="parse")).score == 7
    failed = SIGNALS["parse"].score(m, "depth", JudgingConfig(mode="parse"))
    assert failed.score is None and failed.status == "parse_failure" and failed.raw == "no number here"
    neutral = SIGNALS["parse"].score(m, "depth", JudgingConfig(mode="parse", on_parse_failure="neutral"))
    assert neutral.score == 5.0 and neutral.status == "parse_failure"


def test_likelihood_and_blend():
    cfg = JudgingConfig()
    like = likelihood_score(20.0, cfg, 12)
    assert like == pytest.approx(5.5)  # likelihood_center maps to the middle of the scale
    cs = SIGNALS["likelihood"].score(measured(), "knowledge", cfg)
    assert cs.score == cs.likelihood == pytest.approx(like) and cs.signal == "likelihood"
    b = SIGNALS["blend"].score(measured(), "knowledge", cfg)
    assert b.signal == "blend" and b.rubric == pytest.approx(8.5) and b.score == pytest.approx((8.5 + like) / 2)
    in_parse = SIGNALS["blend"].score(measured(replies={"knowledge": "[[3]]"}), "knowledge",
                                      JudgingConfig(mode="parse"))
    assert in_parse.rubric == 3 and in_parse.score == pytest.approx((3 + like) / 2)


@pytest.mark.parametrize("orders, p", [([(0.8, 0.9), (0.6, 0.5)], 0.7), ([(0.0, 1.0), (0.0, 1.0)], 0.0),
                                      ([(1.0, 0.2), (1.0, 0.4)], 1.0), ([(0.9, 0.5), (0.1, 0.5)], 0.5)])
def test_turing_is_one_plus_nine_p_human_averaged_over_both_letter_orders(orders, p):
    """p(human expert) is the mean of the two orders (a judge that always answers A is 0.9 and 0.1: p = 0.5)."""
    cs = SIGNALS["turing"].score(measured(turing=orders), "human_expert_likeness", JudgingConfig())
    assert cs.signal == "turing" and cs.p_human == pytest.approx(p) and cs.score == pytest.approx(1 + 9 * p)
    assert 1 <= cs.score <= 10 and cs.mass == pytest.approx(sum(m for _, m in orders) / 2)
    assert cs.to_json()["p_human"] == pytest.approx(p)


def test_what_each_signal_needs_under_each_mode():
    assert resolve("rubric", "expected") == "rubric" and resolve("rubric", "parse") == "parse"
    assert needs("rubric", "expected") == {"distributions"} and needs("likelihood", "parse") == {"logprobs"}
    assert needs("blend", "expected") == {"distributions", "logprobs"}
    assert needs("blend", "parse") == {"replies", "logprobs"}
    assert needs("turing", "expected") == needs("turing", "parse") == {"turing"}
    assert resolve("turing", "parse") == "turing"


def test_the_configurable_signals_are_the_registrys():
    assert set(judging_config.SIGNALS) == set(SIGNALS) - {"parse"}


def test_a_new_signal_is_one_entry(monkeypatch, smol_tokenizer):
    """Registering a signal (and naming it in the schema's list) is all a rubric category needs to use it."""
    from expertchat.config.schema import ModelConfig
    from expertchat.engine.models import LoadedModel
    from expertchat.judging.judge import Judge, RatingItem
    from tests.conftest import make_tiny_model

    def answer_length(m: Measured, name: str, cfg: JudgingConfig) -> CategoryScore:
        return CategoryScore(score=min(10.0, 1.0 + m.answer_tokens), signal="answer_length")

    monkeypatch.setitem(signals.SIGNALS, "answer_length", signals.Signal(frozenset(), answer_length))
    monkeypatch.setattr(judging_config, "SIGNALS", (*judging_config.SIGNALS, "answer_length"))
    cfg = JudgingConfig(rubric={"brevity": RubricCategory("Short?", 1.0, "answer_length")}, wim=False)
    lm = LoadedModel("tiny", make_tiny_model(smol_tokenizer), smol_tokenizer, ModelConfig(name="tiny"))
    [j] = Judge(lm, cfg).rate([RatingItem("Why is the sky blue?", "Rayleigh scattering.")])
    assert j.categories["brevity"].signal == "answer_length"
    assert j.score == j.categories["brevity"].score == min(10.0, 1.0 + j.answer_tokens) and j.answer_tokens > 0
