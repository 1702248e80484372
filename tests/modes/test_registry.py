"""Modes: each mode's input checked before its tracker opens, and the tracker finished in every case."""

from __future__ import annotations

import pytest

from expertchat.config.schema import ExpertChatConfig, RateConfig
from expertchat.errors import ExpertChatError
from expertchat.modes import registry as modes
from expertchat.modes import run as pipeline
from expertchat.report import tracking
from tests.conftest import smollm2_config


class RecordingTracker(tracking.Tracker):
    def __init__(self) -> None:
        self.finished: list[int] = []

    def finish(self, exit_code: int = 0) -> None:
        self.finished.append(exit_code)


@pytest.fixture
def recorder(monkeypatch):
    tracker = RecordingTracker()
    monkeypatch.setattr(tracking, "make_tracker", lambda *args: tracker)
    return tracker


def test_a_mode_that_returns_finishes_its_tracker(recorder, monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "check", lambda cfg: (None, {}))
    monkeypatch.setattr(pipeline, "run",
                        lambda cfg, tracker, checked: {"ok": tracker is recorder and checked == (None, {})})
    assert modes.run(ExpertChatConfig(run_dir=str(tmp_path))) == {"ok": True}
    assert recorder.finished == [0]


def test_a_finished_run_ends_with_its_report_and_a_failed_report_fails_nothing(recorder, monkeypatch, tmp_path):
    from tests.report_helpers import make_run

    run_dir = make_run(tmp_path / "run", rounds=1)
    monkeypatch.setattr(pipeline, "check", lambda cfg: (None, {}))
    monkeypatch.setattr(pipeline, "run", lambda cfg, tracker, checked: {"ok": True})
    assert modes.run(ExpertChatConfig(run_dir=str(run_dir))) == {"ok": True}
    assert "**State: done**" in (run_dir / "report.md").read_text() and recorder.finished == [0]
    monkeypatch.setattr("expertchat.report.plots.draw", lambda data: 1 / 0)  # a broken report: the run still succeeds
    assert modes.run(ExpertChatConfig(run_dir=str(run_dir))) == {"ok": True} and recorder.finished == [0, 0]


def test_a_mode_that_fails_marks_its_tracker_failed(recorder, monkeypatch, tmp_path):
    def boom(cfg, tracker, checked):
        raise ExpertChatError("the judge failed")

    monkeypatch.setattr(pipeline, "check", lambda cfg: (None, {}))
    monkeypatch.setattr(pipeline, "run", boom)
    with pytest.raises(ExpertChatError, match="the judge failed"):
        modes.run(ExpertChatConfig(run_dir=str(tmp_path)))
    assert recorder.finished == [1]


def test_bad_rate_input_stops_before_a_tracker_exists(recorder, tmp_path):
    cfg = ExpertChatConfig(mode="rate", judge=smollm2_config(),
                           rate=RateConfig(input=str(tmp_path / "missing.jsonl")), run_dir=str(tmp_path))
    with pytest.raises(ExpertChatError, match="rate.input not found"):
        modes.run(cfg)
    assert recorder.finished == []  # never opened, so never marked failed


def test_every_mode_has_a_module_with_check_and_run():
    import importlib

    from expertchat.config.schema import MODES

    for module in MODES.values():
        assert callable(importlib.import_module(module).check) and callable(importlib.import_module(module).run)
