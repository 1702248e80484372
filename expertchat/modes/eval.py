"""``mode=eval``: evaluate the adapters of an existing run folder without training, each point through the same
:func:`~expertchat.stages.context.run_stage` as a run's evaluation stage.

    python -m expertchat mode=eval evaluation.run=outputs/my_run                 every trained round
    python -m expertchat mode=eval evaluation.run=outputs/my_run "evaluation.rounds=[0,2]"

The run's own config (``<run>/config.yaml``: models, personas, rubric, reward, LoRA) is used, with the command's
``evaluation.*``, ``progress`` and ``tracker``. Results go into the run folder as in a run (``eval.jsonl``,
``eval_prompts.json``, ``stages/base.evaluation.json``, ``stages/round_<r>.evaluation.json``); points already
there are kept. A run that saved no adapter is evaluated at its base point only, and one line says so.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from expertchat.config.schema import ExpertChatConfig, to_config
from expertchat.engine.models import check_model, load_pair
from expertchat.errors import ExpertChatError, first_line
from expertchat.modes.plan import device_maps
from expertchat.policies.adapters import Policies, adapter_dir, check_saved
from expertchat.report.tracking import Tracker
from expertchat.runs.store import CONFIG_FILE, STAGES_DIR, RunStore, marker_name, parse_marker
from expertchat.stages import evaluation, heldout
from expertchat.stages.context import Run, Stage, run_stage
from expertchat.stages.dialogue import ROLES

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ mode=eval


def completed_trainings(store: RunStore) -> list[int]:
    """The rounds whose training stage is complete (a marker says so)."""
    return sorted({int(marker[0]) for p in store.path(STAGES_DIR).glob("*.json")
                   if (marker := parse_marker(p.name)) and marker[0] != "base" and marker[1] == "training"})


def trained_rounds(store: RunStore) -> list[int]:
    """The rounds whose training stage is complete and saved at least one role's adapter (or weights)."""
    return [r for r in completed_trainings(store) if any(store.path(adapter_dir(r, role)).is_dir() for role in ROLES)]


def run_config(cfg: ExpertChatConfig, key: str = "evaluation.run", own: tuple[str, ...] = ("evaluation",)
               ) -> ExpertChatConfig:
    """The recorded config of the run folder ``key`` names (else ``run_dir``), with this command's ``own`` sections,
    ``progress``, ``tracker`` and ``mode`` (``mode=eval``: ``evaluation.run`` and its ``evaluation``; the league
    passes its own).

    Raises:
        ExpertChatError: no folder, no recorded config in it (not a run folder, or an empty one), or a config
            this version cannot read.
    """
    mine = OmegaConf.structured(cfg)
    folder = Path(OmegaConf.select(mine, key) or cfg.run_dir or ".").expanduser()
    if not folder.is_dir():
        raise ExpertChatError(f"{key}: no run folder at {folder} (set {key}=<a run folder>)")
    if not (folder / CONFIG_FILE).is_file():
        raise ExpertChatError(f"{key}: {folder} holds no run ({CONFIG_FILE} missing): give the folder of "
                              f"a run that `python -m expertchat` wrote ({key}=PATH)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExpertChatConfig), OmegaConf.load(folder / CONFIG_FILE),
                                 {**{k: mine[k] for k in own}, "progress": cfg.progress, "tracker": mine.tracker,
                                  "mode": cfg.mode, "run_dir": str(folder)})
    except OmegaConfBaseException as exc:
        raise ExpertChatError(f"{folder / CONFIG_FILE} cannot be read as a config of this version: "
                              f"{first_line(exc)}") from exc
    return to_config(merged)


def check(cfg: ExpertChatConfig) -> tuple[ExpertChatConfig, list[int], list[heldout.EvalPrompt]]:
    """Before any model loads: the run's config, the rounds to evaluate and the held-out prompts.

    Raises:
        ExpertChatError: as :func:`run_config`; a requested round that saved no adapter; a missing model;
            evaluation settings that differ from those of the folder's earlier points.
    """
    run_cfg = run_config(cfg)
    store = RunStore(run_cfg.run_dir)
    store.check_markers()
    check_saved(store, completed_trainings(store))
    trained = trained_rounds(store)
    wanted = trained if cfg.evaluation.rounds is None else list(cfg.evaluation.rounds)
    missing = [r for r in wanted if r not in trained]
    if missing:
        raise ExpertChatError(f"evaluation.rounds: round {missing[0]} saved no adapter in {store.root} (trained "
                              f"rounds: {', '.join(map(str, trained)) or 'none'})")
    for role in ROLES:
        check_model(getattr(run_cfg, role), role)
    if run_cfg.evaluation.judge is not None:
        check_model(run_cfg.evaluation.judge, "evaluation.judge")
    return run_cfg, wanted, heldout.plan_prompts(run_cfg, store)


def run(cfg: ExpertChatConfig, tracker: Tracker | None = None,
        checked: tuple[ExpertChatConfig, list[int], list[heldout.EvalPrompt]] | None = None) -> dict[str, Any]:
    """Evaluate the base models and each requested round's adapters of a run folder (what :func:`check` found);
    points already evaluated (their marker says so) are kept. Returns ``{point: summary}``."""
    run_cfg, rounds, prompts = checked if checked is not None else check(cfg)
    tracker = tracker or Tracker()
    store = RunStore(run_cfg.run_dir)
    if not rounds:
        log.info("%s saved no adapter (no trained round): evaluating the base models only", store.root)
    heldout.record_prompts(run_cfg, store, prompts)
    actor, judge = load_pair(run_cfg.actor, run_cfg.judge, device_maps(run_cfg))  # the plan's placement on GPUs
    policies = Policies({"actor": actor, "judge": judge}, run_cfg.training)
    ctx = Run(run_cfg, store, tracker, [], policies, reward_for=None, eval_prompts=prompts,
              eval_judge=functools.cache(lambda: evaluation.frozen_judge(run_cfg, policies)))
    out: dict[str, Any] = {}
    for point in ["base", *rounds]:
        _forget_skipped(store, point)
        out[point] = run_stage(ctx, point, EVALUATE)
    log.info("evaluated %d point(s) of %s: %s and %s", len(out), store.root, evaluation.EVAL_FILE,
             "stages/*.evaluation.json")
    return out


def _evaluate(run: Run, point: int | str) -> dict[str, Any]:
    """One point of ``mode=eval``: the round's saved adapters loaded (none for the base), then evaluated."""
    if point != "base":
        for role in ROLES:
            if run.store.path(adapter_dir(point, role)).is_dir():
                run.policies.load(run.store, point, role)
    return evaluation.evaluate_point(run.cfg, run.store, run.models, run.eval_judge(), run.eval_prompts, point,
                                     run.tracker)


# mode=eval's one stage: the evaluation of a point, its adapters loaded first
EVALUATE = Stage("evaluation", _evaluate, evaluation.FILES, evaluation.describe, lambda s: {})


def _forget_skipped(store: RunStore, point: int | str) -> None:
    """A run's ``skipped`` evaluation marker (its policy was gone from memory) is evaluated again here."""
    if store.done(point, "evaluation") and "skipped" in store.stage_summary(point, "evaluation"):
        store.path(marker_name(point, "evaluation")).unlink()
