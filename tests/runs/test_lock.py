"""lock.py: one writer per run folder; a live holder refuses in one line, a stale one is taken over and said."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from expertchat.errors import ExpertChatError
from expertchat.runs import lock
from expertchat.runs.lock import LOCK_FILE, RunLock, holder_state, peek, process_start


def _write_lock(folder, **holder):
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": 1, "process_start": None, "started": "2026-12-06T08:00:00+00:00",
              "command": "expertchat +experiment=smoke", "slurm_job_id": None, **holder}
    (folder / LOCK_FILE).write_text(json.dumps(record))
    return folder / LOCK_FILE


@pytest.fixture
def live_process():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_lock_is_taken_held_and_released(tmp_path):
    with RunLock([tmp_path / "run"]) as held:
        path = tmp_path / "run" / LOCK_FILE
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["process_start"] == process_start(os.getpid())
        assert held.taken_over == []
        with pytest.raises(ExpertChatError, match=r"^a run is in progress in .*run since .*: wait for it, or run "
                                                  r"into another folder"):
            RunLock([tmp_path / "run"]).acquire()  # a second writer, even in this process
    assert not path.exists()


def test_a_live_process_of_this_host_refuses_and_nothing_is_changed(tmp_path, live_process):
    path = _write_lock(tmp_path, pid=live_process.pid, process_start=process_start(live_process.pid))
    before = path.read_text()
    with pytest.raises(ExpertChatError) as err:
        RunLock([tmp_path], force=True).acquire()  # resume=force never takes a live lock of this host
    assert f"process {live_process.pid} on this host is alive" in str(err.value)
    assert "\n" not in str(err.value)
    assert path.read_text() == before
    assert peek(tmp_path) == str(err.value)


@pytest.mark.parametrize("holder, why", [
    ({"pid": 2**22 + 12345}, "has ended"),  # no such pid
    ({"pid": os.getpid(), "process_start": 1}, "has ended"),  # this pid, but another process started at tick 1
    ({"host": "node-that-died", "pid": 42}, "heartbeat on node-that-died stopped"),
])
def test_a_stale_lock_is_taken_over_and_said(tmp_path, holder, why):
    path = _write_lock(tmp_path, **holder)
    if holder.get("host"):
        old = time.time() - lock.STALE_AFTER_S - 60
        os.utime(path, (old, old))
    assert peek(tmp_path) is None
    with RunLock([tmp_path]) as held:
        assert len(held.taken_over) == 1 and why in held.taken_over[0]
        assert held.taken_over[0].startswith(f"took over the lock of {tmp_path} since 2026-12-06T08:00:00")
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_another_hosts_fresh_lock_refuses_unless_forced(tmp_path):
    _write_lock(tmp_path, host="other-node", pid=42)
    with pytest.raises(ExpertChatError, match="if that run was killed on other-node, pass resume=force"):
        RunLock([tmp_path]).acquire()
    with RunLock([tmp_path], force=True) as held:
        assert "resume=force says its run is gone" in held.taken_over[0]


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    _write_lock(tmp_path, host="other-node", pid=42, slurm_job_id="77_1")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    with RunLock([tmp_path]) as held:
        assert "taken by this Slurm job before it was requeued" in held.taken_over[0]


def test_an_unreadable_lock_is_stale(tmp_path):
    (tmp_path / LOCK_FILE).write_text('{"host": "x", "pi')  # cut by a kill while written
    with RunLock([tmp_path]) as held:
        assert "unreadable" in held.taken_over[0]


def test_all_or_none_of_several_folders(tmp_path, live_process):
    _write_lock(tmp_path / "b", pid=live_process.pid, process_start=process_start(live_process.pid))
    with pytest.raises(ExpertChatError):
        RunLock([tmp_path / "a", tmp_path / "b"]).acquire()
    assert not (tmp_path / "a" / LOCK_FILE).exists()  # the first one, taken, was released


def test_release_leaves_a_lock_taken_over_by_another_run(tmp_path):
    held = RunLock([tmp_path]).acquire()
    _write_lock(tmp_path, pid=os.getpid() + 1)  # e.g. resume=force from another host took it
    held.release()
    assert (tmp_path / LOCK_FILE).exists()


def test_the_heartbeat_touches_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    with RunLock([tmp_path]):
        path = tmp_path / LOCK_FILE
        os.utime(path, (0, 0))
        time.sleep(0.3)
        assert path.stat().st_mtime > time.time() - 5


def test_holder_state_in_words():
    assert holder_state({"host": "n1", "pid": 1}, mtime=100.0, now=130.0, host="n2", slurm_job="")[0] is True
    assert holder_state({"host": "n1", "pid": 1}, mtime=0.0, now=lock.STALE_AFTER_S + 1, host="n2",
                        slurm_job="")[0] is False


def test_written_folders_locks_the_run_that_eval_or_analyze_writes_into():
    from omegaconf import OmegaConf

    def config(mode, **keys):
        return OmegaConf.create({"mode": mode, "evaluation": {"run": keys.get("ev")},
                                 "analysis": {"run": keys.get("an")}})

    assert lock.written_folders("out/a", config("run", ev="out/b", an="out/c")) == ["out/a"]
    assert lock.written_folders("out/a", config("eval", ev="out/b")) == ["out/a", "out/b"]
    assert lock.written_folders("out/a", config("eval")) == ["out/a"]
    assert lock.written_folders("out/a", config("analyze", an="out/c")) == ["out/a", "out/c"]


def test_a_running_status_without_a_lock_refuses_when_it_may_be_alive(tmp_path, live_process):
    """A folder whose status.json says running but holds no lock: a run of a version without locks (the case
    concurrent-run-same-folder), or a folder copied without its .lock."""
    from datetime import datetime, timedelta, timezone

    def status(**fields):
        started = datetime.now(timezone.utc) - timedelta(seconds=fields.pop("age", 40))
        (tmp_path / "status.json").write_text(json.dumps({"status": "running", "host": socket.gethostname(),
                                                          "started": started.isoformat(timespec="seconds"),
                                                          **fields}))

    status()  # no pid: 40 s ago is recent
    with pytest.raises(ExpertChatError, match=r"status.json says it started 4\d s ago .* if it was killed, pass "
                                              r"resume=force$"):
        RunLock([tmp_path]).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    assert peek(tmp_path) is not None and peek(tmp_path, force=True) is None
    RunLock([tmp_path], force=True).acquire().release()
    status(age=lock.STALE_AFTER_S + 60)  # long ago, no pid: killed
    RunLock([tmp_path]).acquire().release()
    status(pid=live_process.pid, age=lock.STALE_AFTER_S + 60)  # its pid lives: alive however old
    with pytest.raises(ExpertChatError, match=f"process {live_process.pid} on this host is alive"):
        RunLock([tmp_path]).acquire()
    status(pid=2**22 + 12345)  # its pid is gone: killed
    RunLock([tmp_path]).acquire().release()
    (tmp_path / "status.json").write_text(json.dumps({"status": "done"}))
    RunLock([tmp_path]).acquire().release()


def test_a_sweep_into_a_folder_where_a_job_still_runs_submits_nothing(tmp_path, live_process, capsys):
    from omegaconf import OmegaConf

    _write_lock(tmp_path / "sweep" / "1", pid=live_process.pid, process_start=process_start(live_process.pid))
    (tmp_path / "sweep" / "0").mkdir()
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}, "resume": "auto"})
    with pytest.raises(SystemExit) as stop:
        lock.LockCheck().on_multirun_start(config)
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"expertchat: error: a run is in progress in {tmp_path / 'sweep' / '1'} since ")
    assert line.endswith("wait for that sweep, or sweep into another folder (hydra.sweep.dir=...); nothing was "
                         "submitted")
    lock.LockCheck().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "new")}}}))
