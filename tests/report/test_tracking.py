"""Trackers: ``none`` does nothing; ``wandb`` writes one offline run under the run folder, with explicit steps; the
offline run is read back from its ``.wandb`` log (config, metrics, tables, plots, the evaluation summary, the
sweep's group and name)."""

from __future__ import annotations

import json

import pytest
import yaml

from expertchat.config.schema import TrackerConfig
from expertchat.report import markdown as report
from expertchat.report.tracking import Tracker, WandbTracker, make_tracker
from tests.report_helpers import make_run


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

    # a resumed job (same run folder) is the run's next segment: a run of its own, in a second offline folder
    again = make_tracker(cfg, tmp_path, {})
    try:
        again.log({"train/actor/loss": 0.6}, step=2)
    finally:
        again.finish()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and (runs[0] / f"run-{run_id}.wandb").exists()
    assert (runs[1] / f"run-{run_id}-s1.wandb").exists()
    assert (tmp_path / "wandb" / "segments").read_text().split() == [run_id, f"{run_id}-s1"]


def test_two_segments_of_a_requeued_job_read_back_intact(tmp_path, monkeypatch):
    """A requeued job's second segment is a second W&B run: the first segment's offline log is untouched and both
    hold their own points (syncing them cannot replace one with the other)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = TrackerConfig(backend="wandb", mode="offline", tags=["requeue"])
    first = make_tracker(cfg, tmp_path, {"seed": 0})
    try:
        for step in range(3):
            first.log({"train/actor/loss": 1.0 - step / 10}, step=step)
        first.log_summary({"rounds": {"actor": 0.1}})
    finally:
        first.finish()
    (log_1,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    before = log_1.read_bytes()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    second = make_tracker(cfg, tmp_path, {"seed": 0})
    try:
        for step in range(3, 5):  # the requeued job goes on from the stage it resumes
            second.log({"train/actor/loss": 1.0 - step / 10}, step=step)
    finally:
        second.finish()
    assert log_1.read_bytes() == before
    (log_2,) = set(tmp_path.glob("wandb/offline-run-*/run-*.wandb")) - {log_1}
    segments = [wandb_points(path) for path in (log_1, log_2)]
    assert [s["steps"] for s in segments] == [[0, 1, 2], [3, 4]]
    assert segments[0]["loss"] == pytest.approx([1.0, 0.9, 0.8]) and segments[1]["loss"] == pytest.approx([0.7, 0.6])
    (one, two) = (s["run"] for s in segments)
    assert two.run_id == f"{one.run_id}-s1" and two.display_name == f"{one.display_name} (segment 2)"
    assert one.run_group == two.run_group and list(two.tags) == ["requeue"]
    assert segments[0]["summary"]["rounds/actor"] == 0.1 and segments[1]["config"]["segment"] == 1


def wandb_points(path):
    """The ``train/actor/loss`` points (with their ``train/step``), summary, config and run record of one offline log."""
    from tests.report_helpers import wandb_records

    out = {"steps": [], "loss": [], "summary": {}, "config": {}, "run": None}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
            out["config"].update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "history":
            item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/actor/loss" in item:
                out["steps"].append(item["train/step"])
                out["loss"].append(item["train/actor/loss"])
        elif kind == "summary":
            out["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                   for u in record.summary.update})
    return out


def test_live_sync_marks_the_offline_run_for_wandb_osh(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_OSH_COMMAND_DIR", str(tmp_path / "osh"))
    tracker = make_tracker(TrackerConfig(backend="wandb", mode="offline", live_sync=True), tmp_path / "run", {})
    try:
        tracker.log_summary({"rounds": {"actor": 0.1}})
        (command,) = (tmp_path / "osh").glob("*.command")  # what the login node's `wandb-osh` syncs
        assert command.read_text() == str(tracker.offline_dir.resolve())
        assert tracker.offline_dir.name.startswith("offline-run-") and tracker.offline_dir.parent == tmp_path / "run" / "wandb"
        command.unlink()  # wandb-osh deletes it once synced
        tracker.log({"train/actor/loss": 0.5}, step=1)
        assert not list((tmp_path / "osh").glob("*.command"))  # at most once a minute while logging
    finally:
        tracker.finish()
    assert len(list((tmp_path / "osh").glob("*.command"))) == 1  # and at the end


def read_back(run_dir):
    """The offline run's config, last history and summary values (W&B flattens a table or an image into
    ``<key>/_type``, ``<key>/nrows``, ...) and its run record, from its ``.wandb`` log."""
    from tests.report_helpers import wandb_records

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    config, history, summary, run = {}, {}, {}, None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            history.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.summary.update})
    return config, history, summary, run


def test_the_offline_run_holds_config_metrics_tables_plots_and_evaluation_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = make_run(tmp_path / "run", rounds=1)
    tracker = make_tracker(TrackerConfig(backend="wandb", mode="offline"), run_dir, {"training": {"steps": 3}})
    try:
        tracker.log({"train/actor/loss": 0.69, "train/actor/objective/scores": 0.1}, step=1)  # as MetricsCallback
        tracker.log({"rating/actor_reward_mean": 0.1}, step=0)  # as run_stage
        assert report.after_run(run_dir, tracker) == run_dir / "report.md"
    finally:
        tracker.finish()
    config, history, summary, _ = read_back(run_dir)
    assert config["training"] == {"steps": 3}
    assert {"train/actor/loss", "train/step", "rating/actor_reward_mean", "rating/step"} <= set(history)
    turns = len((run_dir / "turns.jsonl").read_text().splitlines())
    assert history["tables/dialogues/_type"] == "table-file" and history["tables/dialogues/nrows"] == turns
    assert history["tables/evaluation/nrows"] == len((run_dir / "eval.jsonl").read_text().splitlines())
    for plot in ("eval_reward", "training", "length", "similarity_vs_score"):
        assert history[f"plots/{plot}/_type"] == "image-file" and history[f"plots/{plot}/format"] == "png"
    evaluation = json.loads((run_dir / "stages" / "round_0.evaluation.json").read_text())["models"]["actor"]
    assert summary["evaluation/0/actor/reward_mean"] == evaluation["reward_mean"]
    assert summary["evaluation/0/actor/delta_vs_base/ci_lo"] == evaluation["delta_vs_base"]["ci"][0]
    assert summary["evaluation/base/judge/win"] == 0
    assert summary["final/round"] == "0" and summary["final/actor/delta_vs_base/mean"] == (
        evaluation["delta_vs_base"]["mean"])
    (dialogues,) = run_dir.glob("wandb/offline-run-*/files/media/table/tables/dialogues_*.table.json")
    table = json.loads(dialogues.read_text())
    assert len(table["data"]) == turns and {"text", "reward", "wim"} <= set(table["columns"])
    (answers,) = run_dir.glob("wandb/offline-run-*/files/media/table/tables/evaluation_*.table.json")
    assert len(json.loads(answers.read_text())["data"]) == len((run_dir / "eval.jsonl").read_text().splitlines())


def test_a_multirun_job_is_grouped_by_its_sweep_and_named_by_its_swept_overrides(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from expertchat.__main__ import CONF_DIR
    from expertchat.report.tracking import sweep_job

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sweep_dir = tmp_path / "multirun" / "2026-11-30" / "20-00-00"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"task": ["+experiment=smoke", "reward.zeta=0.0,0.4"]}}}))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=smoke", "reward.zeta=0.4"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode, cfg.hydra.sweep.dir, cfg.hydra.job.num = RunMode.MULTIRUN, str(sweep_dir), 1
    assert sweep_job() is None  # outside a Hydra job
    HydraConfig.instance().set_config(cfg)
    try:
        job = sweep_job()
        assert job["group"] == "smoke/2026-11-30_20-00-00" and job["swept"] == ["reward.zeta=0.4"] and job["job"] == 1
        assert job["swept_keys"] == ["reward.zeta"]
        tracker = make_tracker(TrackerConfig(backend="wandb", mode="offline"), sweep_dir / "1", {"seed": 0})
        tracker.finish()
    finally:
        HydraConfig.instance().cfg = None
    config, _, _, run = read_back(sweep_dir / "1")
    assert run.display_name == "reward.zeta=0.4" and run.run_group == "smoke/2026-11-30_20-00-00"
    assert list(run.tags) == ["reward.zeta"]
    assert config["sweep"]["overrides"] == ["+experiment=smoke", "reward.zeta=0.4"]


def test_wandb_folders_under_an_unwritable_home_move_into_the_run_folder(tmp_path, monkeypatch):
    """The case wandb-home-unwritable: W&B's data/cache/config folders under a $HOME that cannot be written lost the
    run's tables and plots; a default folder moves into the run folder, and the tracked run holds everything."""
    from expertchat.report.tracking import WANDB_DIRS

    for var in WANDB_DIRS:
        monkeypatch.delenv(var, raising=False)
    for xdg in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(xdg, f"/proc/no-{xdg.lower()}")  # cannot be created, even by root
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = make_run(tmp_path / "run", rounds=1)
    tracker = make_tracker(TrackerConfig(backend="wandb", mode="offline"), run_dir, {})
    try:
        import os

        assert {os.environ[v] for v in WANDB_DIRS} == {str(run_dir / "wandb" / n) for n in ("data", "cache", "config")}
        assert report.after_run(run_dir, tracker) == run_dir / "report.md"
    finally:
        tracker.finish()
    assert list(run_dir.glob("wandb/offline-run-*/files/media/table/tables/dialogues_*.table.json"))
    assert list(run_dir.glob("wandb/offline-run-*/files/media/images/plots/*.png"))


def test_a_wandb_folder_the_user_set_that_cannot_be_written_is_one_line(monkeypatch):
    import pytest

    from expertchat.errors import ExpertChatError
    from expertchat.report.tracking import wandb_dirs

    monkeypatch.setenv("WANDB_DATA_DIR", "/proc/wandb-data")
    with pytest.raises(ExpertChatError, match=r"^WANDB_DATA_DIR=/proc/wandb-data cannot be written \(.*\): .* set "
                                              r"WANDB_DATA_DIR to a writable folder"):
        wandb_dirs()


def test_a_tracker_that_fails_is_blamed_not_the_report(tmp_path, caplog):
    class Broken(Tracker):
        def log_table(self, name, columns, rows):
            raise PermissionError("Unable to write staging files to /proc/wandb-data/artifacts/staging")

    run_dir = make_run(tmp_path / "run", rounds=1)
    assert report.after_run(run_dir, Broken()) == run_dir / "report.md"
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert line.startswith("the tracked run lacks the tables, plots and evaluation summary of") and \
        "PermissionError: Unable to write staging files" in line and "report.md and plots/ are complete" in line
