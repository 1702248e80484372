"""The judge audit's statistics (``expertchat.audit``) on crafted rows whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from expertchat import audit
from tests.audit_helpers import crafted_ratings, verdict

ROLES = ("actor", "judge")


def test_position_a_judge_that_always_picks_the_first_slot_is_never_consistent():
    # P(x better) is 0.9 when x is shown first and 0.1 when shown second: it picks the first answer every time
    slot = [verdict(0.9, 0.1) for _ in range(20)]
    p = audit.position(slot, 200, 0)
    assert p["consistency"]["value"] == 0.0 and p["first_chosen"]["value"] == 1.0 and p["first_chosen"]["n"] == 40
    fair = [verdict(0.8, 0.7) for _ in range(10)] + [verdict(0.2, 0.3) for _ in range(10)]
    p = audit.position(fair, 200, 0)
    assert p["consistency"]["value"] == 1.0 and p["first_chosen"]["value"] == 0.5
    mixed = slot[:5] + fair[:15]
    assert audit.position(mixed, 200, 0)["consistency"]["value"] == 0.75


def test_verbosity_counts_consistent_verdicts_on_answers_of_different_lengths():
    rows = ([verdict(0.8, 0.7, 30, 10)] * 6  # x longer, x wins: prefers longer
            + [verdict(0.2, 0.3, 30, 10)] * 2  # x longer, y wins: prefers shorter
            + [verdict(0.9, 0.1, 30, 10)] * 5  # inconsistent: not counted
            + [verdict(0.8, 0.7, 10, 10)] * 5)  # equal lengths: not counted
    v = audit.verbosity(rows, 200, 0)
    assert v["n"] == 8 and v["value"] == 0.75


def test_self_preference_cancels_quality_and_finds_a_self_bonus():
    # the actor's answers are much better and both judges say so: no self-preference
    none = audit.self_preference(crafted_ratings(8, 4), 0, ROLES, 500, 0)
    assert none["index"] == pytest.approx(0.0, abs=1e-9) and none["gap"]["actor"] > 3 and none["n"] == 30
    # the actor adds 1 point to its own answers: index 0.5 (half the sum of the two self-bonuses)
    one = audit.self_preference(crafted_ratings(5, 5, bias_actor=1.0), 0, ROLES, 500, 0)
    assert one["index"] == pytest.approx(0.5) and tuple(one["ci"]) == (0.5, 0.5)
    both = audit.self_preference(crafted_ratings(5, 5, 1.0, 1.0), 0, ROLES, 500, 0)
    assert both["index"] == pytest.approx(1.0)
    assert audit.self_preference(crafted_ratings(5, 5), 1, ROLES, 500, 0)["n"] == 0  # another point: no rows


def test_agreement_is_the_rank_correlation_of_the_same_answers():
    rows = crafted_ratings(6, 5)
    a = audit.agreement(rows, 0, None, ROLES, 300, 0)
    assert a["mutual"]["n"] == 60 and a["mutual"]["rho"] == 1.0 and a["anchor"] == {}  # same scores, no bias
    anchor = {(r["author"], r["prompt_id"], r["sample"]): -r["score"] for r in rows if r["rater"] == "judge"}
    a = audit.agreement(rows, 0, anchor, ROLES, 300, 0)
    assert a["anchor"]["judge"]["rho"] == -1.0 and a["anchor"]["actor"]["n"] == 60


def test_inflation_is_the_paired_drift_at_fixed_content():
    before = crafted_ratings(5, 5, content="base")
    now = [{**r, "score": r["score"] + (0.5 if r["rater"] == "actor" else 0.0)} for r in before]
    out = audit.inflation(now, before, "base", 300, 0)
    assert out["actor"]["delta"] == pytest.approx(0.5) and out["judge"]["delta"] == 0.0 and out["actor"]["n"] == 60


def test_flat_categories_flag_a_category_that_barely_varies():
    rng = np.random.default_rng(1)
    scores = {"flat": (4.85 + rng.normal(0, 0.05, 50)).tolist(), "lively": rng.uniform(1, 10, 50).tolist(),
              "one": [5.0]}
    out = audit.flat_categories(scores, 0.25, 300, 0)
    assert out["flat"]["flat"] and out["flat"]["modal_share"] == 1.0 and out["flat"]["sd"] < 0.1
    assert out["flat"]["sd_ci"][0] < out["flat"]["sd"] < out["flat"]["sd_ci"][1]
    assert not out["lively"]["flat"] and out["lively"]["sd"] > 2
    assert out["one"]["flat"] is None and out["one"]["sd"] is None


def test_category_scores_reads_both_row_shapes():
    rows = [{"categories": {"a": {"score": 3.0}, "b": {"score": None}}}, {"categories": {"a": {"score": 4.0}}}]
    assert audit.category_scores(rows) == {"a": [3.0, 4.0]}
    assert audit.category_scores([{"scores": {"a": 2.0, "b": None}}], "scores") == {"a": [2.0]}
