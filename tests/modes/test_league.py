"""mode=league: every actor checkpoint against every judge checkpoint of a finished 2-round run (tiny models),
rated by the frozen judge; the matrix, the comparisons and the Bradley-Terry ratings; a rerun keeps what was played;
bad input is one line."""

from __future__ import annotations

import json

import pytest

from expertchat.errors import ExpertChatError
from expertchat.modes import league as league_mode
from expertchat.modes import run as pipeline
from tests.conftest import compose_cfg, eval_cfg, tiny_load_pair


def league_cfg(folder, *overrides):
    cfg = compose_cfg("mode=league", f"league.run={folder}", "league.topics=2", "league.turns=3",
                      "league.bootstrap=50", "progress=false", *overrides)
    cfg.run_dir = str(folder.parent / "job")
    return cfg


def test_the_league_of_a_two_round_run(smol_tokenizer, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(pipeline, "load_pair", tiny_load_pair(smol_tokenizer))
    pipeline.run(eval_cfg(run, "rounds=2", "evaluation.holdout=2"))
    monkeypatch.setattr(league_mode, "load_pair", tiny_load_pair(smol_tokenizer))
    cfg = league_cfg(run)
    run_cfg, points, topics = league_mode.check(cfg)
    assert points == ["base", 0, 1] and len(topics) == 2 and run_cfg.league.turns == 3
    held_out = [p["topic"] for p in json.loads((run / "eval_prompts.json").read_text())["prompts"]]
    assert topics == held_out[:2]  # never a topic the run trained on
    summary = league_mode.run(cfg, checked=(run_cfg, points, topics))
    assert summary["points"] == ["base", "round_0", "round_1"] and len(summary["matrix"]) == 3
    assert all(v is not None for row in summary["matrix"] for v in row)
    assert summary["ratings"][0] == 0.0 and len(summary["ratings_ci"]) == 3
    assert sum(summary["wins"]) == summary["comparisons"] <= 3 * 3 * 2  # 3 pairs of actors x 3 judges x 2 topics
    assert sorted(p.name for p in (run / "league").glob("*.json")) == sorted(
        f"{a}_vs_{j}.json" for a in summary["points"] for j in summary["points"])
    pairing = json.loads((run / "league" / "round_1_vs_base.json").read_text())
    assert pairing["topics"] == topics and pairing["turns"] == [2, 2]  # the actor speaks turns 0 and 2
    assert (run / "league" / "round_1_vs_base" / "turns.jsonl").exists()
    report = (run / "report.md").read_text()
    assert "### Cross-play league" in report and "| round_1 |" in report and (run / "plots" / "league.png").exists()
    before = {p.name: p.read_bytes() for p in (run / "league").glob("*.json")}
    assert league_mode.run(cfg) == summary  # a rerun plays nothing again
    assert {p.name: p.read_bytes() for p in (run / "league").glob("*.json")} == before


def test_summarize_crafted_results():
    results = [{"actor": a, "judge": j, "topics": ["t1", "t2"], "reward": rewards}
               for a, j, rewards in [("base", "base", [0.1, 0.2]), (0, "base", [0.3, 0.4]),
                                     ("base", 0, [0.0, None]), (0, 0, [0.5, 0.1])]]
    s = league_mode.summarize(results, ["base", 0], resamples=0, seed=0)
    assert s["matrix"] == [[0.15, 0.0], [0.35, 0.3]]
    assert s["comparisons"] == 3 and s["wins"] == [0, 3]  # t2 against judge 0: no reward for base, no comparison
    assert s["ratings"][0] == 0.0 and s["ratings"][1] > 0
    (base, r0) = league_mode.describe(s)
    assert base.startswith("league: actor base: Bradley-Terry +0.00") and "reward vs judge base +0.15" in base
    assert r0.endswith("(3 wins of 3 comparisons); reward vs judge base +0.35, round_0 +0.30")


def test_bad_input_is_one_line(tmp_path, smol_tokenizer, monkeypatch):
    with pytest.raises(ExpertChatError, match="league.run: no run folder at"):
        league_mode.check(league_cfg(tmp_path / "nowhere"))
    run = tmp_path / "untrained"
    monkeypatch.setattr(pipeline, "load_pair", tiny_load_pair(smol_tokenizer))
    pipeline.run(eval_cfg(run, "training.steps=0", "evaluation.enabled=false"))
    with pytest.raises(ExpertChatError, match="holds no trained round"):
        league_mode.check(league_cfg(run))
    with pytest.raises(Exception, match="league.turns"):
        league_cfg(run, "league.turns=2")
