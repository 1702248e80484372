"""One writer per run folder: ``<run folder>/.lock``, taken before anything is written, released in every exit path.

Two runs writing into one folder at once (a ``${now:}`` folder name shared by two runs started in the same second,
a sweep rerun into its folder while it still runs) would set aside each other's records and delete each other's
scratch folder. The lock file is created with ``O_CREAT | O_EXCL`` (exactly one process can create it) and holds::

    {"host": str, "pid": int, "process_start": clock ticks after boot (Linux) | null, "started": ISO time,
     "command": str, "slurm_job_id": "A_i" | "A" | null}

While the run lives, a daemon thread touches the file every :data:`HEARTBEAT_S` seconds. A lock found in a folder
is *stale* (its run is gone) and is taken over, with one log line, when

- it was taken on this host by a process that no longer exists (its pid is gone, or now belongs to a process
  started at another time: the pid was reused);
- it was taken by this same Slurm job: a requeued job runs again after its first run ended (Slurm runs one
  instance of a job at a time);
- it was taken on another host and its heartbeat stopped more than :data:`STALE_AFTER_S` seconds ago.

Any other lock refuses the run in one line (:class:`~expertchat.errors.ExpertChatError`); ``resume=force`` takes
over a lock of another host whose heartbeat is fresh (the user says that run is gone), never a live one of this
host.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from expertchat.errors import ExpertChatError

LOCK_FILE = ".lock"
HEARTBEAT_S = 60.0  # how often a live run touches its lock
STALE_AFTER_S = 30 * 60.0  # a lock of another host untouched for this long is stale (its run is gone)


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks after boot (field 22 of ``/proc/<pid>/stat``), which
    tells a live process from a later one that reuses its pid; None where ``/proc`` is not readable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])  # the command name may hold spaces and ')': split after it


def _alive(pid: int, started: int | None) -> bool:
    """Whether process ``pid`` of this host exists and, where both are known, started at ``started``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    now = process_start(pid)
    return started is None or now is None or now == started


def holder_state(holder: dict[str, Any], mtime: float, now: float | None = None,
                 host: str | None = None, slurm_job: str | None = None) -> tuple[bool, str]:
    """Whether the run that wrote lock ``holder`` (last touched at ``mtime``, seconds since the epoch) is alive,
    and why, in words.

    >>> holder_state({"host": "n1", "pid": 1, "slurm_job_id": "7"}, mtime=0.0, now=10.0, host="n2", slurm_job="7")
    (False, 'it was taken by this Slurm job before it was requeued')
    >>> holder_state({"host": "n1", "pid": 1}, mtime=0.0, now=7200.0, host="n2")[1]
    'its heartbeat on n1 stopped 120 min ago'
    """
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    slurm_job = _slurm_job() if slurm_job is None else slurm_job
    if slurm_job and holder.get("slurm_job_id") == slurm_job:
        return False, "it was taken by this Slurm job before it was requeued"
    if holder.get("host") == host:
        pid = int(holder.get("pid") or 0)
        if pid > 0 and _alive(pid, holder.get("process_start")):
            return True, f"process {pid} on this host is alive"
        return False, f"process {pid} on this host has ended"
    age = now - mtime
    if age > STALE_AFTER_S:
        return False, f"its heartbeat on {holder.get('host')} stopped {age / 60:.0f} min ago"
    return True, f"its heartbeat on {holder.get('host')} is {age:.0f} s old"


def command() -> str:
    """This process's command line as typed (``python -m expertchat`` for the module's ``__main__.py``)."""
    name = "python -m expertchat" if sys.argv[0].endswith("__main__.py") else Path(sys.argv[0]).name
    return " ".join([name, *map(shlex.quote, sys.argv[1:])])


def _slurm_job() -> str | None:
    from expertchat.runs.jobs import slurm_job_id

    return slurm_job_id()


class RunLock:
    """The locks of the run folders a job writes, held from :meth:`acquire` to :meth:`release` (a context
    manager). ``force``: ``resume=force`` (takes over another host's fresh lock, see the module docstring)."""

    def __init__(self, folders: list[str | os.PathLike[str]], force: bool = False) -> None:
        self.paths = list(dict.fromkeys(Path(f).expanduser().resolve() / LOCK_FILE for f in folders))
        self.force = force
        self.held: list[Path] = []
        self.taken_over: list[str] = []  # one line per stale lock taken over (the caller logs them)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take every folder's lock (creating the folder), or none.

        Raises:
            ExpertChatError: a folder is locked by a live run: which, since when, and the ways on.
        """
        try:
            for path in self.paths:
                self._take(path)
        except BaseException:
            self.release()
            raise
        self._thread = threading.Thread(target=self._beat, name="expertchat-lock", daemon=True)
        self._thread.start()
        return self

    def _take(self, path: Path) -> None:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": process_start(os.getpid()),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": command(), "slurm_job_id": _slurm_job()}
        if not path.exists() and not self.force:
            unlocked = running_without_lock(path.parent)
            if unlocked is not None:
                raise ExpertChatError(unlocked)
        for _ in range(3):  # a stale lock removed, then created anew; a race with another taker is retried
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check(path)  # raises when live; else removed it
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record) + "\n")
            self.held.append(path)
            return
        raise ExpertChatError(f"{path.parent}: could not take its lock {path} (another run keeps taking it)")

    def _check(self, path: Path, remove: bool = True) -> None:
        """A lock exists at ``path``: raise if its run lives, else (``remove``) remove it and note the takeover."""
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
            mtime = path.stat().st_mtime
            if not isinstance(holder, dict):
                raise ValueError("not an object")
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError) as exc:  # cut or emptied (a kill while it was written): nobody holds it
            holder, alive, why = {}, False, f"it is unreadable ({type(exc).__name__})"
        else:
            alive, why = holder_state(holder, mtime)
        since = f"since {holder.get('started')}" if holder else ""
        if alive and not (self.force and holder.get("host") != socket.gethostname()):
            ways = ("wait for it, or run into another folder (hydra.run.dir=...)" +
                    (f"; if that run was killed on {holder.get('host')}, pass resume=force"
                     if holder.get("host") != socket.gethostname() else ""))
            raise ExpertChatError(f"a run is in progress in {path.parent} {since} ({why}; command: "
                                  f"{holder.get('command')}): {ways}")
        if not remove:
            return
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.taken_over.append(f"took over the lock of {path.parent}{' ' + since if since else ''}: "
                               f"{'resume=force says its run is gone' if alive else why}")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for path in self.held:
                with contextlib.suppress(OSError):
                    os.utime(path)

    def release(self) -> None:
        """Remove the locks this run holds (only those that are still its own)."""
        self._stop.set()
        for path in self.held:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                    path.unlink()
        self.held = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def running_without_lock(folder: Path, now: float | None = None) -> str | None:
    """The refusal for a folder whose ``status.json`` says a job is ``running`` although no lock is held there
    (a run of a version without locks, or a folder copied without its ``.lock``): the job is taken to be alive
    when its pid on this host is, or, where ``status.json`` names no pid, when it started less than
    :data:`STALE_AFTER_S` ago. None when nothing says a job runs there."""
    from expertchat.runs.jobs import STATUS_FILE

    try:
        status = json.loads((folder / STATUS_FILE).read_text(encoding="utf-8"))
        if not isinstance(status, dict) or status.get("status") != "running":
            return None
        started = datetime.fromisoformat(str(status.get("started"))).timestamp()
    except (OSError, ValueError, TypeError):
        return None
    now = time.time() if now is None else now
    here = status.get("host") == socket.gethostname()
    if here and status.get("pid"):
        if not _alive(int(status["pid"]), status.get("process_start")):
            return None
        why = f"process {status['pid']} on this host is alive"
    elif now - started < STALE_AFTER_S:
        why = f"status.json says it started {now - started:.0f} s ago on {status.get('host')} and has not ended"
    else:
        return None
    return (f"a run is in progress in {folder} since {status.get('started')} ({why}; it holds no lock: a run of an "
            f"earlier version?): wait for it, or run into another folder (hydra.run.dir=...); if it was killed, "
            f"pass resume=force")


# modes that write into another run's folder -> the key that names it
OTHER_FOLDER = {"eval": "evaluation.run", "analyze": "analysis.run", "league": "league.run"}


def written_folders(run_dir: str, config: Any) -> list[str]:
    """The run folders a job writes into, each locked while it runs: its own, and the run folder that ``mode=eval``
    (``evaluation.run``) or ``mode=analyze`` (``analysis.run``) writes its results into. ``config``: the job's
    (Hydra) config."""
    from omegaconf import OmegaConf

    key = OTHER_FOLDER.get(str(OmegaConf.select(config, "mode")))
    other = OmegaConf.select(config, key) if key else None
    return [run_dir, *([str(other)] if other else [])]


class LockCheck(Callback):
    """A Hydra callback (``hydra.callbacks.lock`` in config.yaml): before Hydra writes anything into a single run's
    folder (its ``.hydra/`` files, the log), a folder locked by a live run stops the command in one line, so that
    the running job's files stay untouched; before a sweep submits anything, so does a sweep folder one of whose
    jobs still runs (a sweep rerun into its folder). (Each job then takes its lock itself: :class:`RunLock`.)"""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        sweep = Path(str(config.hydra.sweep.dir))
        force = OmegaConf.select(config, "resume") == "force"
        jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)) \
            if sweep.is_dir() else []
        for folder in jobs:
            refusal = peek(folder, force=force)
            if refusal is not None:
                print(f"expertchat: error: {refusal.split(': wait for it')[0]}: wait for that sweep, or sweep into "
                      f"another folder (hydra.sweep.dir=...); nothing was submitted", file=sys.stderr)
                raise SystemExit(2)

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        run_dir = str(config.hydra.run.dir)  # the same ${now:} value the job gets (Hydra caches the resolver)
        for folder in written_folders(run_dir, config):
            refusal = peek(folder, force=OmegaConf.select(config, "resume") == "force")
            if refusal is not None:
                print(f"expertchat: error: {refusal}", file=sys.stderr)
                raise SystemExit(2)


def peek(folder: str | os.PathLike[str], force: bool = False) -> str | None:
    """The one-line refusal :meth:`RunLock.acquire` would give for ``folder`` now, or None when it is free (no
    lock, or a stale one); reads only, so that a refused command writes nothing anywhere."""
    path = Path(folder).expanduser().resolve() / LOCK_FILE
    if not path.exists():
        return None if force else running_without_lock(path.parent)
    try:
        RunLock([folder], force=force)._check(path, remove=False)
    except ExpertChatError as exc:
        return str(exc)
    return None
