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
    # every job's config, models and memory plan are checked before queueing; a missing topics file is found only by
    # the job that reads it
    topics, missing = tmp_path / "topics.jsonl", tmp_path / "missing.jsonl"
    topics.write_text("".join(json.dumps({"topic": t}) + "\n" for t in ("dark matter", "bread", "tides")))
    rc, stdout, stderr = finish(sweep(tmp_path, "topics=jsonl", f"topics.path={topics},{missing}", "training.steps=0",
                                      "evaluation.enabled=false")[0])
    out = tmp_path / "sweep"
    assert rc == 1
    ok, bad = status(out / "0"), status(out / "1")
    assert ok["status"] == "done" and len(lines(out / "0" / "turns.jsonl")) == 4
    assert bad["status"] == "failed" and bad["error"] == f"topics file not found: {missing} (set topics.path=FILE.jsonl)"
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


def test_a_sweep_whose_job_cannot_fit_is_refused_before_anything_reaches_sbatch(tmp_path):
    # sbatch on PATH is the real one behind a recorder: the refusal must come before the first call
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/sbatch_calls\nexec {shutil.which("sbatch")} "$@"\n')
    (bin_dir / "sbatch").chmod(0o755)
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], check=True, capture_output=True, text=True).stdout
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "expertchat", "-m", "+experiment=smoke", "hydra/launcher=slurm_local",
                           "hardware.memory_gb=64,1", f"hydra.sweep.dir={out}"], cwd=tmp_path, check=False,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("expertchat: error: sweep refused before queueing: job 1 (hardware.memory_gb=1) "
                                  "does not fit hardware=cpu: the plan needs ")
    assert not (tmp_path / "sbatch_calls").exists() and not out.exists()
    assert subprocess.run(["squeue", "-h", "-o", "%i"], check=True, capture_output=True, text=True).stdout == queued


def test_run_sbatch_runs_one_job_into_its_run_folder_with_its_log(tmp_path):
    # launchers/alliance/run.sbatch as submitted on a cluster, with the local node's resources instead of a GPU node's
    script = (ROOT / "launchers" / "alliance" / "run.sbatch").read_text()
    for option, local in (("--gpus-per-node=h100:4", None), ("--cpus-per-task=64", "--cpus-per-task=1"),
                          ("--mem=498G", "--mem=4G"), ("--time=24:00:00", "--time=00:20:00")):
        script = script.replace(f"#SBATCH {option}\n", f"#SBATCH {local}\n" if local else "")
    (tmp_path / "run.sbatch").write_text(script)
    venv = Path(sys.executable).parents[1]
    env = {**os.environ, "EXPERTCHAT_HOME": str(ROOT), "EXPERTCHAT_MODULES": "", "EXPERTCHAT_VENV": str(venv),
           "EXPERTCHAT_OUTPUTS": str(tmp_path / "outputs"), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(["sbatch", "--wait", "--parsable", "run.sbatch", "+experiment=smoke", "training.steps=0",
                           "evaluation.enabled=false"], cwd=tmp_path, env=env, check=False, capture_output=True,
                          text=True, timeout=900)
    job = proc.stdout.strip().split(";")[0]
    log = tmp_path / f"expertchat-{job}.out"
    assert proc.returncode == 0, (proc.stderr, log.read_text() if log.exists() else "no log")
    run = tmp_path / "outputs" / f"slurm-{job}"
    assert status(run)["status"] == "done" and status(run)["slurm_job_id"] == job
    assert (run / "slurm.out").resolve() == log.resolve() and "expertchat" in log.read_text()
    assert len(lines(run / "turns.jsonl")) == 4
