"""Sweeps on a real Slurm (the `slurm` tier): the local single-node cluster of launchers/local_slurm.sh, which
.ci/run starts. Jobs go through sbatch (one array per sweep), write their status files, resume after a requeue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


@pytest.fixture(scope="module", autouse=True)
def local_slurm():
    if shutil.which("sinfo") is None or subprocess.run([str(ROOT / "launchers" / "local_slurm.sh"), "status"],
                                                        capture_output=True).returncode:
        pytest.fail("the local Slurm is not running: launchers/local_slurm.sh start (.ci/run starts it)")


def sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "expertchat", "-m", "+experiment=smoke", "hydra/launcher=slurm_local",
               f"hydra.sweep.dir={out}", *overrides]
    proc = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "HYDRA_FULL_ERROR": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=900)
    return proc.returncode, stdout, stderr


def status(job: Path) -> dict:
    return json.loads((job / "status.json").read_text())


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_zeta_sweep_runs_three_slurm_jobs_to_completion(tmp_path):
    rc, stdout, stderr = finish(sweep(tmp_path, "reward.zeta=0.0,0.4,1.0")[0])
    out = tmp_path / "sweep"
    assert rc == 0, stderr[-3000:]
    array_ids = set()
    for num, zeta in enumerate(("0.0", "0.4", "1.0")):
        job = out / str(num)
        st = status(job)
        assert st["status"] == "done" and st["error"] is None
        assert f"reward.zeta={zeta}" in st["overrides"]
        array_id, _, task = st["slurm_job_id"].partition("_")  # went through sbatch: one array, a task per job
        assert task == str(num)
        array_ids.add(array_id)
        assert st["threads"] == 1  # the profile's cpus_per_task, not the node's cores
        assert len(lines(job / "turns.jsonl")) == 4 and (job / "stages" / "round_0.training.json").exists()
        assert (out / ".submitit" / st["slurm_job_id"]).is_dir()
    assert len(array_ids) == 1
    table = stdout.splitlines()
    assert any(line.startswith(f"sweep {out}: 3 job(s)") for line in table)
    assert table[-2] == "3 done" and table[-1] == f"sweep report: {out / 'sweep.md'}"
    report = (out / "sweep.md").read_text()
    assert all(f"reward.zeta={z}" in report for z in ("0.0", "0.4", "1.0")) and "3 jobs: 3 done" in report
    assert "Bypassing sacct error" not in stderr


def test_a_failing_job_leaves_the_others_intact_and_the_sweep_exits_non_zero(tmp_path):
    # the first value is valid (the entrypoint checks the first job before submitting); 7 fails in its job
    rc, stdout, stderr = finish(sweep(tmp_path, "reward.zeta=0.4,7", "training.steps=0",
                                              "evaluation.enabled=false")[0])
    out = tmp_path / "sweep"
    assert rc == 1
    ok, bad = status(out / "0"), status(out / "1")
    assert ok["status"] == "done" and len(lines(out / "0" / "turns.jsonl")) == 4
    assert bad["status"] == "failed" and bad["error"] == "config error: reward.zeta is 7.0; it must be in [0, 1]"
    assert bad["slurm_job_id"].split("_")[0] == ok["slurm_job_id"].split("_")[0]
    assert "1 done, 1 failed" in stdout and "failed" in (out / "sweep.md").read_text()
    assert stderr.strip().splitlines()[-1].startswith("expertchat: error: 1 sweep job(s) did not finish: job 1")


def test_a_requeued_job_resumes_without_losing_or_duplicating_records(tmp_path):
    # long enough (~1.5 min on an idle 2-core machine) that Slurm's KillWait (30 s) ends it before it finishes:
    # submitit ignores the SIGTERM of a requeue, so a shorter job completes and is never rerun
    proc, out = sweep(tmp_path, "topics.n=6", "dialogue.turns=6", "generation.max_new_tokens=32")
    turns = out / "0" / "turns.jsonl"
    deadline = time.time() + 300
    while not (turns.exists() and turns.stat().st_size) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    job_id = status(out / "0")["slurm_job_id"]
    subprocess.run(["scontrol", "requeue", job_id], check=True)  # as a preemption does
    rc, stdout, stderr = finish(proc)  # Slurm makes the requeued job eligible ~120 s later (DESIGN.md)
    assert rc == 0, stderr[-3000:]
    st = status(out / "0")
    assert st["status"] == "done" and st["restarts"] >= 1, f"the job was not rerun after the requeue: {st}"
    records = lines(turns)
    keys = [(r["dialogue_id"], r["turn"]) for r in records]
    assert len(keys) == len(set(keys)) == 6 * 6  # every turn once
    rated = [(r["dialogue_id"], r["turn"], r["rater"]) for r in lines(out / "0" / "ratings.jsonl")]
    assert len(rated) == len(set(rated)) == 6 * 6
    answers = [(r["round"], r["role"], r["prompt_id"], r["sample"]) for r in lines(out / "0" / "eval.jsonl")]
    assert len(answers) == len(set(answers)) == 2 * 2 * 2  # base and round 0, both roles, 2 held-out prompts
    log = (out / "0" / "expertchat.log").read_text()
    assert "resuming" in log or "nothing left to do" in log
