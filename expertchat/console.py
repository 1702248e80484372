"""What the user sees while a run works: progress of the long stages.

:func:`progress_bar` is a tqdm bar where stderr is a terminal, and plain log lines (at most ``lines`` per bar,
with the rate) where it is not, e.g. in a Slurm job's log file, where a redrawn bar would be thousands of
carriage returns.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

log = logging.getLogger("expertchat")


class _LogProgress:
    """A progress counter that logs ``desc: n/total unit (rate/s)`` every ``total / lines`` units."""

    def __init__(self, total: int, desc: str, unit: str, lines: int) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.every = max(1, -(-total // max(lines, 1)))
        self.next_at = self.every
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self.next_at or self.n >= self.total:
            rate = self.n / max(time.perf_counter() - self.start, 1e-9)
            log.info("%s: %d/%d %ss (%.2f/s)", self.desc, self.n, self.total, self.unit, rate)
            while self.next_at <= self.n:
                self.next_at += self.every

    def set_postfix(self, **values: object) -> None:  # the terminal bar's extra figures; logged lines omit them
        pass


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: object) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool, desc: str, unit: str = "it", lines: int = 4) -> Iterator[object]:
    """A progress counter with ``update(n)`` and ``set_postfix(**values)``, closed on exit.

    Args:
        total: units of work expected.
        enabled: False (``progress=false``) or ``total == 0`` gives a counter that shows nothing.
        desc: what is counted, e.g. ``"round 0 dialogues"``.
        unit: the unit's name, e.g. ``"turn"``.
        lines: without a terminal, the most log lines one bar writes.
    """
    if not enabled or total <= 0:
        yield _NoProgress()
        return
    if not sys.stderr.isatty():
        yield _LogProgress(total, desc, unit, lines)
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit)
    try:
        yield bar
    finally:
        bar.close()
