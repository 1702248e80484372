"""Pairwise verdicts against the base and the judge audit at every evaluation point (``expertchat.stages.audit``):
what a run writes, that the summaries are the statistics of the rows, resume, and turning them off."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from expertchat.runs.store import RunStore
from expertchat.stages import audit
from tests.conftest import eval_cfg, read_rows, tiny_load_pair


@pytest.fixture
def finished(smol_tokenizer, tmp_path, monkeypatch):
    from expertchat.modes import run as pipeline

    monkeypatch.setattr(pipeline, "load_pair", tiny_load_pair(smol_tokenizer))
    cfg = eval_cfg(tmp_path, "rounds=1")
    pipeline.run(cfg)
    return cfg, pipeline


def test_a_run_judges_each_round_against_the_base_in_both_orders(finished, tmp_path):
    cfg, _ = finished
    rows = read_rows(tmp_path / audit.PAIRWISE_FILE)
    assert Counter((r["round"], r["role"]) for r in rows) == {(0, "actor"): 3, (0, "judge"): 3}
    evals = {(r["round"], r["role"], r["prompt_id"]): r for r in read_rows(tmp_path / "eval.jsonl")}
    for r in rows:
        assert (r["x"], r["y"]) == ("round 0", "base") and 0 <= r["p_x_first"] <= 1 and 0 <= r["p_x_second"] <= 1
        assert r["outcome"] == (0.5 if not r["consistent"] else float(r["p_x_first"] > 0.5))
        assert r["x_tokens"] == evals[(0, r["role"], r["prompt_id"])]["tokens"]
        assert r["y_tokens"] == evals[("base", r["role"], r["prompt_id"])]["tokens"]
    summary = json.loads((tmp_path / "stages/round_0.evaluation.json").read_text())
    assert "pairwise" not in json.loads((tmp_path / "stages/base.evaluation.json").read_text())
    for role, p in summary["pairwise"].items():
        mine = [r for r in rows if r["role"] == role]
        assert p == json.loads(json.dumps(audit.pairwise_figures(mine, cfg.evaluation.bootstrap, cfg.evaluation.seed)))
        assert p["win"] + p["tie"] + p["loss"] == p["n"] == 3
        assert p["win_rate"] == pytest.approx(sum(r["outcome"] for r in mine) / 3, abs=1e-4)


def test_every_point_audits_both_training_judges(finished, tmp_path):
    cfg, _ = finished
    rows = read_rows(tmp_path / audit.AUDIT_FILE)
    ratings = Counter((r["round"], r["rater"], r["content"], r["author"]) for r in rows if r["kind"] == "rating")
    # the base point rates the base answers; round 0 rates its own answers and the base answers again
    assert ratings == {**{("base", rater, "base", author): 3 for rater in ("actor", "judge")
                          for author in ("actor", "judge")},
                       **{(0, rater, content, author): 3 for rater in ("actor", "judge")
                          for content in (0, "base") for author in ("actor", "judge")}}
    pairs = Counter((r["round"], r["rater"]) for r in rows if r["kind"] == "pairwise")
    assert pairs == {(p, rater): 3 for p in ("base", 0) for rater in ("actor", "judge")}
    store = RunStore(tmp_path)
    for point in ("base", 0):
        summary = json.loads((tmp_path / f"stages/{'base' if point == 'base' else 'round_0'}.evaluation.json")
                             .read_text())
        a = summary["audit"]
        mine = [r for r in rows if r["round"] == point]
        want = audit.audit_figures(cfg, mine, [r for r in rows if r["round"] == "base"],
                                   audit._anchor(store, point), point, a["anchor"])
        assert json.loads(json.dumps(want)) == a
        assert a["anchor"] == "tiny (the judge's base)"
        assert (a["inflation"] is None) == (point == "base")
        # at the base one model plays both roles with no adapter yet: it cannot prefer "its own" answers
        if point == "base":
            assert a["self_preference"]["index"] == 0.0 and a["self_preference"]["n"] == 3
    lines = audit.describe(summary)
    assert any(line.startswith("actor vs base, pairwise") for line in lines)
    assert sum(line.startswith("audit, ") for line in lines) == 2 and lines[-1].startswith("audit: self-preference")


def test_a_resumed_evaluation_writes_its_verdicts_and_audit_once(finished, tmp_path):
    cfg, pipeline = finished
    before = {f: (tmp_path / f).read_text() for f in (audit.PAIRWISE_FILE, audit.AUDIT_FILE)}
    (tmp_path / "stages/round_0.evaluation.json").unlink()  # killed during round 0's evaluation
    pipeline.run(cfg)
    assert {f: (tmp_path / f).read_text() for f in before} == before  # the same rows, none twice
    assert len(read_rows(tmp_path / "pairwise.incomplete.jsonl")) == 6


def test_pairwise_and_audit_can_be_turned_off(smol_tokenizer, tmp_path, monkeypatch):
    from expertchat.modes import run as pipeline

    monkeypatch.setattr(pipeline, "load_pair", tiny_load_pair(smol_tokenizer))
    pipeline.run(eval_cfg(tmp_path, "evaluation.pairwise.enabled=false", "evaluation.audit.enabled=false"))
    assert not (tmp_path / audit.PAIRWISE_FILE).exists() and not (tmp_path / audit.AUDIT_FILE).exists()
    summary = json.loads((tmp_path / "stages/round_0.evaluation.json").read_text())
    assert "pairwise" not in summary and "audit" not in summary and summary["models"]["actor"]["n"] == 3


def test_another_frozen_judge_is_the_anchor_of_the_audit_and_judges_the_pairs(smol_tokenizer, tmp_path, monkeypatch):
    from expertchat.engine.models import LoadedModel
    from expertchat.modes import run as pipeline
    from expertchat.stages import evaluation
    from tests.conftest import make_tiny_model

    monkeypatch.setattr(pipeline, "load_pair", tiny_load_pair(smol_tokenizer))
    loaded = []

    def load_anchor(model_cfg):
        loaded.append(model_cfg.name)
        return LoadedModel("tiny_anchor", make_tiny_model(smol_tokenizer, seed=5), smol_tokenizer, model_cfg)

    monkeypatch.setattr(evaluation, "load_model", load_anchor)
    pipeline.run(eval_cfg(tmp_path, "rounds=1", "+model@evaluation.judge=smollm2_135m"))
    assert loaded == ["smollm2_135m"]  # loaded once, for every point
    summary = json.loads((tmp_path / "stages/round_0.evaluation.json").read_text())
    assert summary["judge"] == "tiny_anchor" and summary["audit"]["anchor"] == "tiny_anchor"
    assert {r["judge"] for r in read_rows(tmp_path / audit.PAIRWISE_FILE)} == {"tiny_anchor"}
    assert {r["rater_model"] for r in read_rows(tmp_path / audit.AUDIT_FILE)} == {"tiny"}  # the training judges
    assert set(summary["audit"]["agreement"]["anchor"]) == {"actor", "judge"}
