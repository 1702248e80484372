"""Trackers: ``none`` does nothing; ``wandb`` writes one offline run under the run folder, with explicit steps."""

from __future__ import annotations

from expertchat.config import TrackerConfig
from expertchat.tracking import Tracker, WandbTracker, make_tracker


def test_none_tracker_accepts_everything_and_writes_nothing(tmp_path):
    tracker = make_tracker(TrackerConfig(backend="none"), tmp_path, {"seed": 0})
    assert type(tracker) is Tracker
    tracker.log({"train/actor/loss": 0.5}, step=1)
    tracker.log_summary({"rounds": {"actor": 1.0}})
    tracker.finish()
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_run_lands_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest disables W&B everywhere else
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = TrackerConfig(backend="wandb", mode="offline", tags=["test"])
    tracker = make_tracker(cfg, tmp_path, {"training": {"steps": 2}})
    assert isinstance(tracker, WandbTracker)
    try:
        tracker.log({"train/actor/loss": 0.69, "train/actor/pairs/tied": 0.25, "note": "skipped: not a number"},
                    step=1)
        tracker.log({"train/judge/loss": 0.5}, step=1)
        tracker.log({"rounds/actor_reward_mean": 0.1}, step=0)  # another axis, lower step: kept, not dropped
        tracker.log_summary({"rewards": {"actor": 0.1}})
    finally:
        tracker.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    (record,) = runs[0].glob(f"run-{run_id}.wandb")
    data = record.read_bytes()
    for key in (b"train/actor/loss", b"train/actor/pairs/tied", b"train/judge/loss", b"train/step",
                b"rounds/actor_reward_mean", b"rounds/step"):
        assert key in data, key

    # a resumed job (same run folder) continues the same W&B run: same id, a second offline folder
    again = make_tracker(cfg, tmp_path, {})
    try:
        again.log({"train/actor/loss": 0.6}, step=2)
    finally:
        again.finish()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all((r / f"run-{run_id}.wandb").exists() for r in runs)
