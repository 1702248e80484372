"""What the benchmark scripts share: alternating the compared paths, medians, the machine's load.

A shared machine's load changes within a run. Each path is run once per repeat, in the order A, B, C, A, B, C,
...; a change in load then hits every path, and the ratio of the medians stays meaningful.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def alternate(paths: dict[str, Callable[[], dict[str, Any]]], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Run every path once per repeat, in turn; each call returns a dict of figures. Progress goes to stderr."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    for rep in range(repeats):
        for name, run in paths.items():
            start = time.perf_counter()
            out = run()
            out.setdefault("seconds", time.perf_counter() - start)
            results[name].append(out)
            note(repeat=rep, path=name, load1=load(), **{k: v for k, v in out.items() if not isinstance(v, list)})
    return results


def median(runs: list[dict[str, Any]], key: str) -> float:
    """Median of ``key`` over the runs of one path."""
    return statistics.median(r[key] for r in runs)


def median_list(runs: list[dict[str, Any]], key: str) -> list[float]:
    """Element-wise median of a list figure (e.g. per-turn step times) over the runs of one path."""
    return [round(statistics.median(values), 3) for values in zip(*(r[key] for r in runs))]


def load() -> float:
    """The 1-minute load average (``uptime``)."""
    return round(os.getloadavg()[0], 2)


def note(**kwargs: Any) -> None:
    print(json.dumps(kwargs, default=str), file=sys.stderr, flush=True)
