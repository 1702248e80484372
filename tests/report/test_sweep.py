"""The sweep report: one row per expected job (the cartesian product of multirun.yaml's swept overrides), a failed,
unfinished or missing job listed as such with no number, the numbers taken from each job's files as written."""

from __future__ import annotations

import json

import pytest

from expertchat.errors import ExpertChatError
from expertchat.report import markdown as report
from expertchat.report import sweep
from expertchat.runs.reader import sweep_overrides
from tests.report_helpers import make_sweep

TASK = ["+experiment=smoke", "reward.zeta=0.0,0.4,1.0", "seed=1"]


def rows_of(text: str) -> dict[str, str]:
    """Table rows of sweep.md by job number."""
    return {line.split("|")[1].strip(): line for line in text.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()}


def test_expected_jobs_are_hydras_cartesian_product():
    swept, jobs = sweep_overrides(["a=1,2", "+b=x", "c=3,4"])
    assert swept == ["a", "c"]
    assert jobs == [["a=1", "+b=x", "c=3"], ["a=1", "+b=x", "c=4"], ["a=2", "+b=x", "c=3"], ["a=2", "+b=x", "c=4"]]
    with pytest.raises(ExpertChatError, match="cannot read the sweep's overrides"):
        sweep_overrides(["a=[1,"])


def test_failed_unfinished_and_missing_jobs_are_listed_never_dropped(tmp_path):
    failed = {"status": "failed", "error": "ran out of memory", "started": "2026-11-30T20:00:00",
              "overrides": ["+experiment=smoke", "reward.zeta=0.4", "seed=1"]}
    root = make_sweep(tmp_path / "sweep", TASK, {0: {}, 1: {"stop_after": (0, "rating"), "status": failed}, 2: None})
    text = sweep.write_sweep_report(root).read_text()
    rows = rows_of(text)
    assert set(rows) == {"0", "1", "2"}
    delta = json.loads((root / "0" / "stages" / "round_0.evaluation.json").read_text())["models"]["judge"]
    d = delta["delta_vs_base"]
    assert "reward.zeta=0.0" in rows["0"] and "**done**" in rows["0"]
    assert f"{d['mean']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]" in rows["0"]
    assert "**failed**" in rows["1"] and "ran out of memory" in rows["1"] and "no evaluation" in rows["1"]
    assert "differ" not in rows["1"]
    assert "**missing**" in rows["2"] and "reward.zeta=1.0" in rows["2"] and "no folder 2/" in rows["2"]
    for job in ("1", "2"):  # no number invented for a job that has none
        cells = [c.strip() for c in rows[job].split("|")[5:17]]
        assert all(c == "n/a" for c in cells), cells
    assert "3 jobs: 1 done, 1 failed, 1 missing" in text
    assert (root / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_job_without_status_file_is_judged_by_its_stage_markers(tmp_path):
    root = make_sweep(tmp_path / "sweep", TASK, {0: {"evaluation": False}, 1: {"stop_after": (0, "dialogue")},
                                                 2: {"overrides": ["+experiment=smoke", "reward.zeta=9", "seed=1"]}})
    rows = rows_of(sweep.write_sweep_report(root).read_text())
    assert "**done**" in rows["0"] and "no status file; every stage marker present" in rows["0"]
    assert "no evaluation" in rows["0"]
    assert "**incomplete**" in rows["1"] and "first: round 0 rating" in rows["1"]
    assert "differ from the sweep's" in rows["2"]


def test_an_unexpected_job_folder_is_listed_too(tmp_path):
    root = make_sweep(tmp_path / "sweep", ["+experiment=smoke", "seed=1,2"], {0: {}, 1: {}, 2: {}})
    rows = rows_of(sweep.write_sweep_report(root).read_text())
    assert set(rows) == {"0", "1", "2"} and "not one of the sweep's expected jobs" in rows["2"]


def test_the_command_writes_every_jobs_report_and_links_it(tmp_path, capsys):
    root = make_sweep(tmp_path / "sweep", TASK, {0: {}, 1: {"evaluation": False}, 2: None})
    assert report.main([str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(root / "sweep.md")
    rows = rows_of((root / "sweep.md").read_text())
    assert (root / "0" / "report.md").exists() and "[report](0/report.md)" in rows["0"]
    assert "[report]" not in rows["2"]


def test_a_sweep_with_nothing_to_report_exits_2(tmp_path, capsys):
    root = make_sweep(tmp_path / "sweep", TASK, {})
    assert report.main([str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of the sweep's 3 job folders" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "multirun.yaml").write_text("hydra: {}\n")
    assert report.main([str(tmp_path / "bad")]) == 2
    assert "cannot read the sweep's overrides" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_real_multirun_gets_its_sweep_report(tmp_path):
    """The CLI's own multirun (two smoke jobs, no training), then its report; a job folder removed since is
    listed as missing."""
    import shutil

    from tests.conftest import run_cli

    root = tmp_path / "sweep"
    proc = run_cli("-m", "+experiment=smoke", "training.steps=0", "seed=0,1,2", f"hydra.sweep.dir={root}",
                   "tracker=wandb", env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all((root / str(i) / "report.md").exists() for i in range(3))  # each job ended with its report
    assert f"Job 1 of the multirun in `{root}`" in (root / "1" / "report.md").read_text()
    shutil.rmtree(root / "2")
    assert report.main([str(root)]) == 0
    rows = rows_of((root / "sweep.md").read_text())
    assert "seed=0" in rows["0"] and "**done**" in rows["0"] and "[report](0/report.md)" in rows["0"]
    assert "**done**" in rows["1"] and "**missing**" in rows["2"] and "seed=2" in rows["2"]
    assert "3 jobs: 2 done, 1 missing" in (root / "sweep.md").read_text()
