"""``mode=eval``: a finished run folder's adapters evaluated without training (every round or some), a run
without adapters evaluated at its base, bad folders in one line; the optional lm-evaluation-harness hook."""

from __future__ import annotations

import json
import logging

import pytest

from expertchat.errors import ExpertChatError
from expertchat.modes import eval as evaluation_mode
from tests.conftest import eval_cfg, read_rows, tiny_load_pair


def finished_run(tokenizer, folder, monkeypatch, *overrides: str):
    """A tiny finished run without evaluation (as a run from before the evaluation stage)."""
    from expertchat.modes import run as pipeline

    monkeypatch.setattr(pipeline, "load_pair", tiny_load_pair(tokenizer))
    pipeline.run(eval_cfg(folder, "evaluation.enabled=false", *overrides))


def eval_mode_cfg(folder, *overrides: str):
    from tests.conftest import compose_cfg

    return compose_cfg("mode=eval", f"evaluation.run={folder}", "progress=false", "evaluation.holdout=3",
                       "evaluation.max_new_tokens=4", "evaluation.bootstrap=200", *overrides)


def test_every_trained_round_is_evaluated_against_the_base(smol_tokenizer, tmp_path, monkeypatch):
    run = tmp_path / "run"
    finished_run(smol_tokenizer, run, monkeypatch, "rounds=2")
    monkeypatch.setattr(evaluation_mode, "load_pair", tiny_load_pair(smol_tokenizer))
    with pytest.raises(ExpertChatError, match=r"evaluation\.rounds: round 3 saved no adapter .*trained rounds: 0, 1"):
        evaluation_mode.check(eval_mode_cfg(run, "evaluation.rounds=[1,3]"))
    cfg = eval_mode_cfg(run, "evaluation.rounds=[1]")
    out = evaluation_mode.run(cfg, checked=evaluation_mode.check(cfg))
    assert list(out) == ["base", 1]
    rows = read_rows(run / "eval.jsonl")
    assert {r["round"] for r in rows} == {"base", 1} and len(rows) == 2 * 2 * 3
    assert out[1]["models"]["actor"]["delta_vs_base"]["pairs"] == 3
    # the held-out topics avoid every topic the run's dialogues used
    used = set(json.loads((run / "topics.json").read_text()))
    assert not {p["topic"] for p in json.loads((run / "eval_prompts.json").read_text())["prompts"]} & used
    # a second call adds round 0 and keeps what is there
    before = (run / "eval.jsonl").read_text()
    out = evaluation_mode.run(eval_mode_cfg(run))
    assert list(out) == ["base", 0, 1] and (run / "eval.jsonl").read_text().startswith(before)
    assert (run / "stages/round_0.evaluation.json").exists()


def test_a_run_without_adapters_evaluates_the_base_and_says_so(smol_tokenizer, tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    finished_run(smol_tokenizer, run, monkeypatch, "training.steps=0")
    monkeypatch.setattr(evaluation_mode, "load_pair", tiny_load_pair(smol_tokenizer))
    with caplog.at_level(logging.INFO, logger="expertchat"):
        out = evaluation_mode.run(eval_mode_cfg(run))
    assert list(out) == ["base"]
    assert sum("saved no adapter (no trained round): evaluating the base models only" in r.message
               for r in caplog.records) == 1


def test_a_missing_or_empty_folder_is_one_line(tmp_path):
    with pytest.raises(ExpertChatError, match="no run folder at") as info:
        evaluation_mode.check(eval_mode_cfg(tmp_path / "nowhere"))
    assert "\n" not in str(info.value)
    with pytest.raises(ExpertChatError, match=r"holds no run \(config\.yaml missing\)"):
        evaluation_mode.check(eval_mode_cfg(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------------------------------------------------- lm-eval hook


def test_a_deleted_adapter_stops_mode_eval_instead_of_evaluating_the_base(smol_tokenizer, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    finished_run(smol_tokenizer, run, monkeypatch)
    shutil.rmtree(run / "adapters/round_0/actor")  # a quota, a partial copy; the marker still says it was saved
    with pytest.raises(ExpertChatError, match=r"adapters/round_0/actor is missing, but stages/round_0\.training"):
        evaluation_mode.check(eval_mode_cfg(run))
