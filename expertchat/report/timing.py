"""The timing split of a run: where each stage's seconds went, per phase and per role, as OpenRLHF and verl report
theirs (generation, reward/judging and training time, tokens per second).

Every stage that computes records a :class:`Split` in its summary (``stages/<point>.<stage>.json`` under
``"timing"``); :func:`expertchat.stages.context.run_stage` adds the stage's wall seconds (``stage_seconds``) and
sends :func:`metrics` to the tracker (``timing/<stage>/<phase>/<role>/<figure>``). The closing summary
(:func:`summary_line`) and ``report.md`` (:func:`section`) read the same dicts.

Phases: ``generation`` (sampling new tokens: dialogue turns, training samples, evaluation answers), ``judging``
(a judge model rating turns, the reward's embedder included) and ``training`` (the optimizer's work: policy and
reference forwards, backward, optimizer step; a DPO step's sampling and judging are counted in the other two).
A role is the model that did the work: the speaker, the rater, the trained model; ``eval_judge`` is the
evaluation's frozen judge.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

PHASES = ("generation", "judging", "training")
STAGE_ORDER = ("dialogue", "rating", "interaction", "training", "evaluation")  # a round's stages, as they run


class Split:
    """Seconds and work per (phase, role), accumulated over a stage.

    >>> s = Split(); s.add("generation", "actor", 2.0, tokens=100); s.add("judging", "judge", 0.5, ratings=50)
    >>> s.to_json()["generation"]["actor"]["tok_per_s"], s.to_json()["judging"]["judge"]["s_per_1k_ratings"]
    (50.0, 10.0)
    """

    def __init__(self) -> None:
        self._cells: dict[tuple[str, str], dict[str, float]] = {}

    def add(self, phase: str, role: str, seconds: float, *, tokens: int = 0, ratings: int = 0) -> None:
        """Add ``seconds`` (wall-clock) of ``phase`` done by ``role``, with the ``tokens`` generated and the
        ``ratings`` made in them.

        Raises:
            ValueError: an unknown phase, or negative / non-finite seconds or counts.
        """
        if phase not in PHASES:
            raise ValueError(f"timing phase '{phase}' is not one of {', '.join(PHASES)}")
        if not math.isfinite(seconds) or seconds < 0 or tokens < 0 or ratings < 0:
            raise ValueError(f"timing of {phase}/{role}: seconds ({seconds}), tokens ({tokens}) and ratings "
                             f"({ratings}) must be finite and >= 0")
        cell = self._cells.setdefault((phase, role), {"seconds": 0.0, "tokens": 0, "ratings": 0})
        cell["seconds"] += seconds
        cell["tokens"] += tokens
        cell["ratings"] += ratings

    @contextlib.contextmanager
    def measure(self, phase: str, role: str) -> Iterator[dict[str, int]]:
        """Time the block as ``phase`` of ``role``; the block may set ``tokens`` / ``ratings`` in the dict it gets."""
        work = {"tokens": 0, "ratings": 0}
        start = time.perf_counter()
        try:
            yield work
        finally:
            self.add(phase, role, time.perf_counter() - start, **work)

    def to_json(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{phase: {role: {"seconds", and "tokens", "tok_per_s" for generation, "ratings", "s_per_1k_ratings"
        for judging}}}``, seconds rounded to ms; a rate is None when its seconds or count are 0."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (phase, role), c in self._cells.items():
            cell: dict[str, Any] = {"seconds": round(c["seconds"], 3)}
            if phase == "generation":
                cell["tokens"] = int(c["tokens"])
                cell["tok_per_s"] = round(c["tokens"] / c["seconds"], 1) if c["seconds"] > 0 else None
            if phase == "judging":
                cell["ratings"] = int(c["ratings"])
                cell["s_per_1k_ratings"] = round(1000 * c["seconds"] / c["ratings"], 2) if c["ratings"] else None
            out.setdefault(phase, {})[role] = cell
        return out


def merge(timings: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several stages' timing dicts (``Split.to_json`` form, ``stage_seconds`` too), rates recomputed."""
    total = Split()
    stage_seconds = 0.0
    for t in timings:
        stage_seconds += float((t or {}).get("stage_seconds") or 0.0)
        for phase in PHASES:
            for role, c in ((t or {}).get(phase) or {}).items():
                total.add(phase, role, float(c.get("seconds") or 0.0), tokens=int(c.get("tokens") or 0),
                          ratings=int(c.get("ratings") or 0))
    return {**total.to_json(), "stage_seconds": round(stage_seconds, 3)}


def metrics(stage: str, timing: dict[str, Any]) -> dict[str, float]:
    """Tracker keys of one stage's timing: ``timing/<stage>/<phase>/<role>/<figure>`` and
    ``timing/<stage>/stage_seconds``; rates that are None are left out.

    >>> metrics("rating", {"judging": {"judge": {"seconds": 1.5, "ratings": 3, "s_per_1k_ratings": 500.0}}})
    {'timing/rating/judging/judge/seconds': 1.5, 'timing/rating/judging/judge/ratings': 3, \
'timing/rating/judging/judge/s_per_1k_ratings': 500.0}
    """
    out: dict[str, float] = {}
    for phase in PHASES:
        for role, cell in (timing.get(phase) or {}).items():
            out.update({f"timing/{stage}/{phase}/{role}/{k}": v for k, v in cell.items() if v is not None})
    if timing.get("stage_seconds") is not None:
        out[f"timing/{stage}/stage_seconds"] = timing["stage_seconds"]
    return out


def _cell(phase: str, role: str, c: dict[str, Any]) -> str:
    rate = ""
    if phase == "generation" and c.get("tok_per_s") is not None:
        rate = f", {c['tok_per_s']:g} tok/s"
    if phase == "judging" and c.get("s_per_1k_ratings") is not None:
        rate = f", {c['s_per_1k_ratings']:g} s/1k ratings"
    return f"{role} {c.get('seconds', 0):.1f} s{rate}"


def summary_line(timing: dict[str, Any]) -> str:
    """One line of a timing dict: per phase its seconds and each role's share with its rate.

    >>> summary_line({"generation": {"actor": {"seconds": 2.0, "tokens": 100, "tok_per_s": 50.0}},
    ...               "stage_seconds": 3.0})
    'generation 2.0 s (actor 2.0 s, 50 tok/s); stages 3.0 s'
    """
    parts = []
    for phase in PHASES:
        cells = timing.get(phase) or {}
        if cells:
            seconds = sum(c.get("seconds") or 0.0 for c in cells.values())
            parts.append(f"{phase} {seconds:.1f} s ({'; '.join(_cell(phase, r, c) for r, c in cells.items())})")
    if timing.get("stage_seconds") is not None:
        parts.append(f"stages {timing['stage_seconds']:.1f} s")
    return "; ".join(parts) or "no timing recorded"


def rows(markers: dict[tuple[Any, str], dict[str, Any]]) -> list[list[Any]]:
    """Table rows ``[point, stage, phase, role, seconds, tokens, tok/s, ratings, s/1k ratings, stage seconds]``
    of the stage markers (``{(point, stage): summary}``) that hold a timing split, in run order (the base point
    first, then by round, each round's stages as they run)."""
    def order(key: tuple[Any, str]) -> tuple[int, int]:
        point, stage = key
        rank = STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)
        return (int(point) if str(point).isdigit() else -1, rank)

    out = []
    for point, stage in sorted(markers, key=order):
        summary = markers[(point, stage)]
        t = (summary or {}).get("timing") if isinstance(summary, dict) else None
        if not isinstance(t, dict):
            continue
        cells = [(phase, role, c) for phase in PHASES for role, c in (t.get(phase) or {}).items()]
        for phase, role, c in cells or [("-", "-", {})]:
            out.append([point, stage, phase, role, c.get("seconds"), c.get("tokens"), c.get("tok_per_s"),
                        c.get("ratings"), c.get("s_per_1k_ratings"), t.get("stage_seconds")])
    return out


def section(markers: dict[tuple[Any, str], dict[str, Any]], table: Any) -> list[str]:
    """``report.md``'s timing section (``table(headers, rows)`` renders Markdown), or nothing without timings."""
    found = rows(markers)
    if not found:
        return []
    cells = [[("n/a" if v is None else v) for v in row] for row in found]
    return ["", "## Timing", "",
            "Where each stage's seconds went (wall-clock): generation (new tokens sampled), judging (a judge rating, "
            "its embedder included) and training (policy and reference forwards, backward, optimizer), per model "
            "doing the work; the stage's own wall seconds beside them.", ""] + table(
        ["point", "stage", "phase", "role", "seconds", "tokens", "tok/s", "ratings", "s/1k ratings", "stage s"], cells)
