"""What a job knows about where it runs: its CPU threads, its status file, and the table a sweep ends with.

Every job (a single run or one job of a multirun, on this machine or a Slurm node) writes ``status.json`` into its
run folder when it starts and when it ends, because the Slurm launcher reports a job that raised as completed and
the sweep driver re-raises only the first failure (../shared/DESIGN.md). The file (written whole, then renamed)::

    {"status": "running" | "done" | "failed" | "interrupted", "error": one line | null,
     "slurm_job_id": "A_i" | "A" | null, "host": str, "pid": int, "seconds": float, "threads": int, "restarts": int,
     "overrides": [str, ...], "stage": "round 0 dialogue" | null, "started": ISO time, "finished": ISO time | null}

``stage`` is the stage the job is in (or was in when it ended). A job stopped by a signal it could catch (SIGTERM,
SIGUSR1/2: :mod:`expertchat.runs.signals`) is ``interrupted``; one killed outside Python (OOM, SIGKILL, a node
failure) stays ``running``, and its run folder's lock (:mod:`expertchat.runs.lock`) tells the two apart. A requeued
job rewrites the file (``restarts`` counts Slurm's restarts).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


def cpu_threads(environ: dict[str, str] | None = None) -> int:
    """The threads this job uses: the CPUs it was given (``SLURM_CPUS_PER_TASK`` when Slurm set it, else the
    process's CPU affinity: what ``taskset``/cgroups allow, never the node's core count), or fewer when the user
    set ``OMP_NUM_THREADS`` lower (an explicit limit is honoured). :func:`threads_reason` says which.

    >>> cpu_threads({"SLURM_CPUS_PER_TASK": "3"}), cpu_threads({"SLURM_CPUS_PER_TASK": "3", "OMP_NUM_THREADS": "1"})
    (3, 1)
    """
    given, _ = _given(environ)
    limit = _explicit(environ)
    return min(given, limit) if limit else given


def threads_reason(environ: dict[str, str] | None = None) -> str:
    """Why :func:`cpu_threads` chose its number, for the console.

    >>> threads_reason({"SLURM_CPUS_PER_TASK": "4", "OMP_NUM_THREADS": "2"})
    'OMP_NUM_THREADS=2 (of 4 CPUs given by SLURM_CPUS_PER_TASK)'
    """
    given, source = _given(environ)
    limit = _explicit(environ)
    if limit and limit < given:
        return f"OMP_NUM_THREADS={limit} (of {given} CPUs given by {source})"
    return f"the CPUs given by {source}" + (f"; OMP_NUM_THREADS={limit} is not lower" if limit else "")


def _given(environ: dict[str, str] | None) -> tuple[int, str]:
    environ = os.environ if environ is None else environ
    given = environ.get("SLURM_CPUS_PER_TASK", "")
    if given.isdigit() and int(given) > 0:
        return int(given), "SLURM_CPUS_PER_TASK"
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)), "the CPU affinity"
    return os.cpu_count() or 1, "the core count"


# The user's own OMP_NUM_THREADS, read before set_threads overwrites it (later jobs of an in-process multirun)
_USER_OMP = os.environ.get("OMP_NUM_THREADS", "")


def _explicit(environ: dict[str, str] | None) -> int | None:
    """The user's own ``OMP_NUM_THREADS`` (a positive integer), else None."""
    value = (_USER_OMP if environ is None else environ.get("OMP_NUM_THREADS", "")).strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def set_threads(n: int, why: str | None = None) -> None:
    """Use ``n`` threads in torch (intra-op; inter-op only if not yet fixed) and in the libraries that read the
    environment when they start (OpenMP, MKL, tokenizers' Rust pool). Measured on a 2-core machine shared by two or
    three runs that each used torch's default: decode turns up to ~30x and DPO steps 7-14x slower (DESIGN.md).
    ``why`` (:func:`threads_reason`) is kept for :func:`threads_line`."""
    global _THREADS_LINE
    _THREADS_LINE = f"threads: {n}, {why}" if why else None
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[key] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # torch allows it once, before any parallel work; keep what is set
        pass


_THREADS_LINE: str | None = None  # what set_threads chose and why, for the console


def threads_line() -> str | None:
    """``threads: N, <why>`` as the job's :func:`set_threads` chose it (None outside a job)."""
    return _THREADS_LINE


def slurm_job_id(environ: dict[str, str] | None = None) -> str | None:
    """Slurm's id of this job: ``<array job>_<task>`` inside an array (a sweep is one array), else the job id.

    >>> slurm_job_id({"SLURM_JOB_ID": "17", "SLURM_ARRAY_JOB_ID": "15", "SLURM_ARRAY_TASK_ID": "2"})
    '15_2'
    >>> slurm_job_id({}) is None
    True
    """
    environ = os.environ if environ is None else environ
    if "SLURM_ARRAY_JOB_ID" in environ and "SLURM_ARRAY_TASK_ID" in environ:
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


class Job(NamedTuple):
    """This job as Hydra launched it: its run folder, its task overrides, its number in a multirun."""

    run_dir: str
    overrides: list[str]
    num: int
    multirun: bool


def current_job(default_dir: str | None = None) -> Job:
    """The current Hydra job; outside one (tests calling the app directly), a single run in ``default_dir``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return Job(default_dir or ".", [], 0, False)
    return Job(hc.runtime.output_dir, list(hc.overrides.task), hc.job.get("num", 0) or 0,
               hc.mode == RunMode.MULTIRUN)


class JobStatus:
    """The job's ``status.json``: :meth:`start` when the job begins, :meth:`end` when it returns or raises."""

    def __init__(self, run_dir: str | os.PathLike[str], overrides: list[str], threads: int) -> None:
        self.path = Path(run_dir) / STATUS_FILE
        self._t0 = time.perf_counter()
        self.fields: dict[str, Any] = {
            "status": "running", "error": None, "slurm_job_id": slurm_job_id(), "host": socket.gethostname(),
            "pid": os.getpid(),
            "seconds": 0.0, "threads": threads, "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "overrides": list(overrides), "stage": None, "started": _now(), "finished": None,
        }

    def start(self) -> None:
        global _CURRENT
        _CURRENT = self
        self._write()

    def at_stage(self, stage: str) -> None:
        """The job begins ``stage`` (e.g. ``round 0 dialogue``)."""
        self.fields["stage"] = stage
        self._write()

    def end(self, error: str | None = None, status: str | None = None) -> None:
        """Mark the job ``done`` (``error`` None) or ``failed`` with the one-line ``error`` (or ``status``, e.g.
        ``interrupted``)."""
        self.fields.update(status=status or ("failed" if error else "done"), error=error, finished=_now(),
                           seconds=round(time.perf_counter() - self._t0, 1))
        self._write()

    @property
    def stage(self) -> str | None:
        return self.fields["stage"]

    def _write(self) -> None:
        """Written whole, then renamed; a folder that cannot take it (full disk, read-only) costs one warning, not
        the run: the error that caused it is reported by the entrypoint."""
        tmp = self.path.with_suffix(".json.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.fields, indent=1) + "\n")
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("could not write %s: %s", self.path, exc.strerror or exc)


_CURRENT: JobStatus | None = None  # the status of the job this process runs, between start and end


def at_stage(stage: str) -> None:
    """Record in the running job's ``status.json`` that it begins ``stage`` (nothing outside a job)."""
    if _CURRENT is not None:
        _CURRENT.at_stage(stage)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------- the sweep's table


def sweep_jobs(sweep_dir: str | os.PathLike[str], ended: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each job of a multirun folder and its status, in job order: the expected jobs are the numbered folders
    Hydra made and any job number below the highest; a job without ``status.json`` (killed before it started, or
    written before status files existed) is ``missing``/``no status file``, never guessed.

    Yields:
        (job number, status dict as in the module docstring; ``status`` may also be ``missing``).
    """
    root = Path(sweep_dir)
    nums = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []
    for num in range(nums[-1] + 1 if nums else 0):
        status_file = root / str(num) / STATUS_FILE
        if status_file.exists():
            status = json.loads(status_file.read_text())
            if ended and status["status"] == "running":
                status.update(status="killed", error="ended without recording its end (out of memory, SIGKILL, "
                                                     "time limit or node failure?): see .submitit/<id>/*.err")
            yield num, status
        else:
            overrides_file = root / str(num) / ".hydra" / "overrides.yaml"
            overrides = _read_overrides(overrides_file)
            yield num, {"status": "missing" if not (root / str(num)).exists() else "no status file",
                        "overrides": overrides}


def _read_overrides(path: Path) -> list[str]:
    if not path.exists():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def sweep_lines(sweep_dir: str | os.PathLike[str], sweep_keys: list[str] | None = None,
                ended: bool = False) -> list[str]:
    """The table a sweep ends with: one line per job (number, the swept overrides, status, Slurm job id, host,
    seconds, threads, the error), then a count. ``sweep_keys``: which overrides to show (default: all);
    ``ended``: the sweep is over, so a job still ``running`` was killed before it could record its end."""
    rows = list(sweep_jobs(sweep_dir, ended))
    if not rows:
        return [f"no job folders in {sweep_dir}"]
    lines = [f"sweep {sweep_dir}: {len(rows)} job(s)",
             f"{'job':>3}  {'overrides':<40} {'status':<14} {'slurm id':<10} {'host':<12} {'s':>7} {'thr':>3}  error"]
    for num, st in rows:
        shown = [o for o in st.get("overrides", []) if sweep_keys is None or o.partition("=")[0] in sweep_keys]
        lines.append(f"{num:>3}  {' '.join(shown)[:40]:<40} {st['status']:<14} {st.get('slurm_job_id') or '-':<10} "
                     f"{(st.get('host') or '-')[:12]:<12} {st.get('seconds', '-'):>7} {st.get('threads', '-'):>3}  "
                     f"{st.get('error') or ''}")
    by_status: dict[str, int] = {}
    for _, st in rows:
        by_status[st["status"]] = by_status.get(st["status"], 0) + 1
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(by_status.items())))
    return lines


def sweep_failed(sweep_dir: str | os.PathLike[str]) -> list[int]:
    """Job numbers of the sweep that did not finish ``done``."""
    return [num for num, st in sweep_jobs(sweep_dir, ended=True) if st["status"] != "done"]


class JobFailed(CompactHydraException):
    """A job of a multirun failed with a one-line error: raised (not exited) so that Hydra records it and the
    sweep's other jobs run; the driver prints it as one line, then the sweep's table. Defined here, not in
    ``__main__``, so that it unpickles as the same class in the driver (Hydra prints only its own compact
    exceptions without a traceback)."""


class QuietSacct(logging.Filter):
    """Drops submitit's "Bypassing sacct error ... status may be inaccurate" warning, which a cluster without
    Slurm accounting (the local one) prints at every poll although results are read from the job folders."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Bypassing sacct error" not in record.getMessage()


class SweepCallback(Callback):
    """A Hydra callback (``hydra.callbacks.sweep`` in config.yaml) that remembers, in the driver process, the
    folder of the multirun it starts, so that the entrypoint can print :func:`sweep_lines` when the sweep ends
    (Hydra calls ``on_multirun_end`` only when no job failed)."""

    sweep_dir: str | None = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        SweepCallback.sweep_dir = str(config.hydra.sweep.dir)
