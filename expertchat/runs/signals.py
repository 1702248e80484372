"""The signals a scheduler sends a job, caught so that the run folder says how the job ended.

Slurm sends SIGTERM on ``scancel``, at the time limit and on preemption (SIGKILL follows after ``KillWait``, 30 s by
default); ``timeout(1)`` and Kubernetes send it too. ``sbatch --signal=[B:]USR1@T`` (or USR2) warns a job ``T``
seconds before its time limit; submitit asks for SIGUSR2 and requeues the job on it (../shared/DESIGN.md). Left to
their default action these signals end Python at once: ``status.json`` would say ``running`` forever and the log
would stop mid-stage.

:class:`Guard` catches them while a job runs. On a signal it first reports it (the caller's ``on_signal``: the log
and ``status.json``, ``interrupted`` with the stage), then

- where a handler of someone else's was installed (submitit's, in a Slurm job it launched), hands the signal to it:
  submitit requeues on SIGUSR2 and lets the job run on after SIGTERM;
- else raises :class:`Interrupted`, which unwinds the job like Ctrl-C (``finally`` blocks run, the tracker is
  finished, the lock released); the entrypoint then ends the process by the same signal
  (:func:`die_by`), so the exit status is what a scheduler expects (143 for SIGTERM in a shell).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

CAUGHT = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
WHY = {
    signal.SIGTERM: "scancel, the time limit or preemption",
    signal.SIGUSR1: "the time limit is near (sbatch --signal)",
    signal.SIGUSR2: "the time limit is near or preemption (sbatch --signal; submitit requeues on it)",
}


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt: ``except Exception`` lets it through
    """The job received ``signum`` (one of :data:`CAUGHT`) and stops; ``message`` says so in one line."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.message = signum, message


def message(signum: int, stage: str | None) -> str:
    """The one line a caught signal leaves in the log and ``status.json``.

    >>> message(signal.SIGTERM, "round 0 dialogue").split(":")[0]
    'interrupted by SIGTERM (scancel, the time limit or preemption) at round 0 dialogue'
    """
    where = f" at {stage}" if stage else ""
    return (f"interrupted by {signal.Signals(signum).name} ({WHY.get(signum, 'a signal')}){where}: rerun into "
            f"the same folder to resume from the last completed stage")


class Guard:
    """Catches :data:`CAUGHT` inside a ``with`` block (main thread only; a signal the process ignores stays
    ignored). ``on_signal(message)`` is called first; ``stage()`` says where the job is (None before any stage).
    ``caught``: the last signal received, or None."""

    def __init__(self, on_signal: Callable[[str], None], stage: Callable[[], str | None]) -> None:
        self.on_signal, self.stage = on_signal, stage
        self.previous: dict[int, Any] = {}
        self.caught: int | None = None
        self.message: str | None = None

    def __enter__(self) -> Guard:
        if threading.current_thread() is threading.main_thread():
            for signum in CAUGHT:
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:
                    self.previous[signum] = previous
                    signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.caught, self.message = signum, message(signum, self.stage())
        self.on_signal(self.message)
        previous = self.previous.get(signum)
        if callable(previous):  # e.g. submitit's: it requeues (SIGUSR2) or lets the job run on (SIGTERM)
            previous(signum, frame)
            return
        raise Interrupted(signum, self.message)

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous = {}


def die_by(signum: int) -> None:
    """End this process by ``signum`` with its default action (after the job has cleaned up), so that the parent
    sees the same end as without the guard: a shell's ``$?`` is 128 + ``signum``; Slurm records the signal."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    signal.pause()  # not reached: the default action of every signal in CAUGHT ends the process
