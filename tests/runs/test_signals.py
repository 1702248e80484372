"""signals.py: SIGTERM/USR1/USR2 are reported, then raise (default action) or go to the handler that was there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from expertchat.runs import signals


def test_a_signal_is_reported_then_unwinds_the_job():
    said = []
    with pytest.raises(signals.Interrupted) as caught:
        with signals.Guard(said.append, stage=lambda: "round 0 rating"):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert caught.value.signum == signal.SIGTERM
    assert said == [caught.value.message]
    assert said[0].startswith("interrupted by SIGTERM (scancel, the time limit or preemption) at round 0 rating: "
                              "rerun into the same folder to resume")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_another_handler_gets_the_signal_after_it_is_reported():
    got, said = [], []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: got.append(signum))  # e.g. submitit's requeue
    try:
        with signals.Guard(said.append, stage=lambda: None) as guard:
            os.kill(os.getpid(), signal.SIGUSR2)
            for _ in range(1000):
                pass
        assert got == [signal.SIGUSR2] and guard.caught == signal.SIGUSR2
        assert said[0].startswith("interrupted by SIGUSR2 (the time limit is near or preemption")
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_an_ignored_signal_stays_ignored():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with signals.Guard(lambda m: None, stage=lambda: None):
            assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_die_by_ends_the_process_as_the_signal_would():
    code = "from expertchat.runs import signals; import signal; signals.die_by(signal.SIGTERM)"
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGTERM  # a shell shows 143
