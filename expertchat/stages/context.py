"""The run context every stage reads (:class:`Run`), a stage's entry in a loop's table (:class:`Stage`) and the one
way a stage is run (:func:`run_stage`): skipped when its marker says it is done, else what an interrupted attempt
left is set aside, the stage runs, its marker is written with its summary, and its headlines are logged and tracked.

``mode=run`` (``expertchat/modes/run.py``) and ``mode=eval`` (``expertchat/modes/eval.py``) both run their stages
through :func:`run_stage`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from expertchat.config.schema import ExpertChatConfig
from expertchat.engine.models import LoadedModel
from expertchat.judging.rewards import RewardFactory
from expertchat.policies.adapters import Policies
from expertchat.report import timing
from expertchat.report.tracking import Tracker
from expertchat.runs import jobs
from expertchat.runs.store import RunStore
from expertchat.stages.heldout import EvalPrompt

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What every stage of a run reads: the config, the run folder, the tracker, the topics, each role's policy
    (``models``: views that every stage uses, ``policies``: their adapters) and the reward factory."""

    cfg: ExpertChatConfig
    store: RunStore
    tracker: Tracker
    topics: list[str]
    policies: Policies | None  # None: a mode that loads no model of the run (mode=analyze)
    reward_for: Callable[[], RewardFactory] | None  # built on first need (loads the embedder); None: no training
    eval_prompts: list[EvalPrompt] = dataclasses.field(default_factory=list)  # held out: never trained on
    eval_judge: Callable[[], LoadedModel] | None = None  # the evaluation's frozen judge (loaded on first need)

    @property
    def models(self) -> dict[str, Any]:
        if self.policies is None:
            raise RuntimeError("this mode loaded no model")
        return self.policies.models

    def topics_of(self, round_idx: int) -> list[str]:
        """The ``topics.n`` topics of round ``round_idx`` (one per dialogue)."""
        n = self.cfg.topics.n
        return self.topics[round_idx * n:(round_idx + 1) * n]


class Stage(NamedTuple):
    """One stage of a round: its ``body``, the JSONL ``files`` it appends to, and how its summary is shown:
    ``describe`` (short log lines) and ``headlines`` (metrics for the tracker)."""

    name: str
    body: Callable[[Run, Any], dict[str, Any]]
    files: list[str]
    describe: Callable[[dict[str, Any]], list[str]]
    headlines: Callable[[dict[str, Any]], dict[str, Any]]


def run_stage(run: Run, round_idx: int | str, s: Stage) -> dict[str, Any]:
    """Run stage ``s`` of round ``round_idx`` unless its marker says it is done; return its summary.

    Records that an interrupted attempt left in ``s.files`` move to ``<file>.incomplete.jsonl`` first
    (``RunStore.begin``), so no record is written twice; the summary is kept in ``stages/round_<r>.<name>.json``
    with its timing split (``"timing"``: the body's :class:`~expertchat.report.timing.Split`, and the stage's wall
    seconds ``stage_seconds``); its headline figures and timing (``timing/<stage>/...``; the base point's as
    ``timing/base_<stage>/...``) are logged and tracked at step ``round_idx`` (0 for the base point).

    Raises:
        ExpertChatError: the stage failed; its marker is not written, so a rerun runs it again.
    """
    ran = not run.store.done(round_idx, s.name)
    if ran:
        jobs.at_stage(f"{'base' if round_idx == 'base' else f'round {round_idx}'} {s.name}")  # status.json says where
        run.store.begin(round_idx, s.name, s.files)
        start = time.perf_counter()
        body = s.body(run, round_idx)
        body["timing"] = {**(body.get("timing") or {}), "stage_seconds": round(time.perf_counter() - start, 3)}
        run.store.finish(round_idx, s.name, body)
    summary = run.store.stage_summary(round_idx, s.name)
    where = "base" if round_idx == "base" else f"round {round_idx}"
    for line in s.describe(summary):
        log.info("%s %s%s: %s", where, s.name, "" if ran else " (done before)", line)
    if ran and summary.get("timing"):
        log.info("%s %s timing: %s", where, s.name, timing.summary_line(summary["timing"]))
    metrics = {k: v for k, v in s.headlines(summary).items() if v is not None}
    if ran and metrics:
        run.tracker.log(metrics, step=round_idx)
    if ran and summary.get("timing"):
        name = f"base_{s.name}" if round_idx == "base" else s.name
        run.tracker.log(timing.metrics(name, summary["timing"]), step=0 if round_idx == "base" else round_idx)
    return summary
