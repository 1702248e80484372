"""jobs.py: CPU threads from what the job was given, status files, the sweep's table; the launcher checks of the
entrypoint (a Slurm profile without Slurm is one line)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from expertchat.runs import jobs

ROOT = Path(__file__).resolve().parents[2]


def test_threads_come_from_slurm_then_the_affinity_never_the_node():
    assert jobs.cpu_threads({"SLURM_CPUS_PER_TASK": "3"}) == 3
    affinity = len(os.sched_getaffinity(0))
    assert jobs.cpu_threads({}) == affinity
    assert jobs.cpu_threads({"SLURM_CPUS_PER_TASK": "junk"}) == affinity
    if affinity > 1:  # a process pinned to one core reports one thread, not the node's count
        pid = os.getpid()
        before = os.sched_getaffinity(pid)
        os.sched_setaffinity(pid, {min(before)})
        try:
            assert jobs.cpu_threads({}) == 1
        finally:
            os.sched_setaffinity(pid, before)


def test_an_explicit_omp_num_threads_is_honoured_and_said():
    affinity = len(os.sched_getaffinity(0))
    assert jobs.cpu_threads({"OMP_NUM_THREADS": "1"}) == 1
    assert jobs.cpu_threads({"SLURM_CPUS_PER_TASK": "4", "OMP_NUM_THREADS": "2"}) == 2
    assert jobs.cpu_threads({"SLURM_CPUS_PER_TASK": "2", "OMP_NUM_THREADS": "8"}) == 2  # never more than given
    assert jobs.cpu_threads({"OMP_NUM_THREADS": "0"}) == jobs.cpu_threads({"OMP_NUM_THREADS": "x"}) == affinity
    if affinity > 1:
        assert jobs.threads_reason({"OMP_NUM_THREADS": "1"}) == f"OMP_NUM_THREADS=1 (of {affinity} CPUs given by the " \
            "CPU affinity)"
    assert jobs.threads_reason({"SLURM_CPUS_PER_TASK": "2", "OMP_NUM_THREADS": "8"}) == \
        "the CPUs given by SLURM_CPUS_PER_TASK; OMP_NUM_THREADS=8 is not lower"
    assert jobs.threads_reason({"SLURM_CPUS_PER_TASK": "2"}) == "the CPUs given by SLURM_CPUS_PER_TASK"


def test_set_threads_sets_torch_and_the_environment(monkeypatch):
    import torch

    before = torch.get_num_threads()
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    try:
        jobs.set_threads(1)
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == os.environ["RAYON_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_status_file_running_then_done_or_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    status = jobs.JobStatus(tmp_path / "job", ["reward.zeta=0.4"], threads=2)
    status.start()
    first = json.loads((tmp_path / "job" / "status.json").read_text())
    assert first["status"] == "running" and first["finished"] is None
    assert (first["slurm_job_id"], first["threads"], first["restarts"]) == ("41_3", 2, 1)
    status.end("config error: reward.zeta is 7.0; it must be in [0, 1]")
    last = json.loads((tmp_path / "job" / "status.json").read_text())
    assert last["status"] == "failed" and last["error"].startswith("config error: reward.zeta")
    assert last["overrides"] == ["reward.zeta=0.4"] and last["finished"] and last["seconds"] >= 0
    assert not list((tmp_path / "job").glob("*.tmp"))  # written whole, then renamed
    jobs.JobStatus(tmp_path / "ok", [], threads=1).end()
    assert json.loads((tmp_path / "ok" / "status.json").read_text())["status"] == "done"


def _job(root: Path, num: int, status: str | None, overrides: list[str]) -> None:
    folder = root / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if status:
        (folder / "status.json").write_text(json.dumps({
            "status": status, "error": "boom: one line" if status == "failed" else None, "slurm_job_id": f"7_{num}",
            "host": "node1", "seconds": 12.5, "threads": 1, "overrides": overrides}))


def test_sweep_table_lists_every_job_and_invents_nothing(tmp_path):
    _job(tmp_path, 0, "done", ["+experiment=smoke", "reward.zeta=0.0"])
    _job(tmp_path, 1, "failed", ["+experiment=smoke", "reward.zeta=0.4"])
    _job(tmp_path, 3, None, ["+experiment=smoke", "reward.zeta=9"])  # job 2 never got a folder
    rows = dict(jobs.sweep_jobs(tmp_path))
    assert [rows[n]["status"] for n in range(4)] == ["done", "failed", "missing", "no status file"]
    assert rows[3]["overrides"] == ["+experiment=smoke", "reward.zeta=9"] and "seconds" not in rows[3]
    lines = jobs.sweep_lines(tmp_path, ["reward.zeta"])
    assert "+experiment" not in "\n".join(lines[2:])  # only the swept keys are shown
    assert "reward.zeta=0.4" in lines[3] and "failed" in lines[3] and "boom: one line" in lines[3]
    assert lines[-1] == "1 done, 1 failed, 1 missing, 1 no status file"
    assert jobs.sweep_failed(tmp_path) == [1, 2, 3]
    _job(tmp_path, 4, "running", ["+experiment=smoke", "reward.zeta=1.0"])  # killed by SIGKILL: no end recorded
    assert dict(jobs.sweep_jobs(tmp_path))[4]["status"] == "running"  # maybe still running: nothing guessed
    assert "killed" in jobs.sweep_lines(tmp_path, ["reward.zeta"], ended=True)[6]
    assert jobs.sweep_failed(tmp_path) == [1, 2, 3, 4]
    assert jobs.sweep_lines(tmp_path / "nothing") == [f"no job folders in {tmp_path / 'nothing'}"]


def test_the_sacct_warning_of_a_cluster_without_accounting_is_dropped():
    keep = logging.LogRecord("submitit", logging.WARNING, "", 0, "Job 3 failed", None, None)
    drop = logging.LogRecord("submitit", logging.WARNING, "", 0, "Call #4 - Bypassing sacct error "
                             "Command '['sacct']' returned non-zero exit status 1., status may be inaccurate.", None,
                             None)
    assert jobs.QuietSacct().filter(keep) and not jobs.QuietSacct().filter(drop)


def test_first_job_of_a_sweep_is_checked_before_submitting():
    from expertchat.__main__ import first_job

    assert first_job(["-m", "+experiment=smoke", "reward.zeta=0.0,0.4", "topics.n=range(2,4)"]) == (
        ["+experiment=smoke", "reward.zeta=0.0", "topics.n=2"], ["reward.zeta", "topics.n"])
    assert first_job(["-m", "'+experiment=glob(*)'"]) is None  # Hydra expands it; nothing to check here


def _cli(*args: str, path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "expertchat", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_slurm_profile_without_slurm_is_one_line(tmp_path):
    proc = _cli("-m", "+experiment=smoke", "reward.zeta=0.0,1.0", "hydra/launcher=slurm_local",
                f"hydra.sweep.dir={tmp_path}/sweep", path=str(tmp_path / "empty"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "expertchat: error: hydra/launcher=slurm_local needs Slurm, but sbatch is not on PATH: start the local "
        "cluster (launchers/local_slurm.sh start), or drop hydra/launcher=... to run the sweep's jobs here one "
        "after another"]
    assert not (tmp_path / "sweep").exists()


def test_a_slurm_that_does_not_answer_is_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"sbatch": "exit 0", "squeue": "echo 'slurm_load_jobs error: Unable to contact slurm "
                                                      "controller (connect failure)' >&2; exit 1"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    proc = _cli("-m", "+experiment=smoke", "reward.zeta=0.0,1.0", "hydra/launcher=slurm_local",
                f"hydra.sweep.dir={tmp_path}/sweep", path=f"{bin_dir}:/usr/bin:/bin")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "expertchat: error: hydra/launcher=slurm_local: Slurm does not answer (squeue: slurm_load_jobs error: "
        "Unable to contact slurm controller (connect failure)): start the local cluster "
        "(launchers/local_slurm.sh start), or drop hydra/launcher=... to run the sweep's jobs here one after another"]


def test_an_unknown_launcher_profile_is_one_line(tmp_path):
    proc = _cli("-m", "+experiment=smoke", "reward.zeta=0.0,1.0", "hydra/launcher=slurm_locl",
                f"hydra.sweep.dir={tmp_path}/sweep", path=os.environ["PATH"])
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("expertchat: error: unknown option 'slurm_locl' for config group 'hydra/launcher' "
                           "(choose from:") and "slurm_local" in line and "beluga" in line


def test_a_bad_value_in_one_job_of_the_first_sweep_point_is_caught_before_submitting(tmp_path):
    proc = _cli("-m", "+experiment=smoke", "reward.zeta=7,0.4", f"hydra.sweep.dir={tmp_path}/sweep",
                path=os.environ["PATH"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "expertchat: error: config error: reward.zeta is 7.0; it must be in [0, 1]"


def test_a_status_file_that_cannot_be_written_costs_a_warning_not_the_run(tmp_path, caplog):
    (tmp_path / "a_file").write_text("")
    status = jobs.JobStatus(tmp_path / "a_file" / "job", [], threads=1)  # its folder cannot exist
    with caplog.at_level(logging.WARNING, logger="expertchat.runs.jobs"):
        status.start()
        status.end("cannot write ...")
    assert [r.getMessage().startswith("could not write") for r in caplog.records] == [True, True]
