"""The ExpertChat loop (``mode=run``), top to bottom:

    topics ──> EVALUATION of the base ──> (DIALOGUE ──> RATING ──> INTERACTION ──> TRAINING ──> EVALUATION) x rounds

Each stage is one line of the table :data:`STAGES` (its body in its module of ``expertchat/stages/``, a function of
the run context): :func:`~expertchat.stages.context.run_stage` skips it when its marker says it is done,
else sets aside what an interrupted attempt left, runs it, marks it done with its summary, logs and tracks it.
Rerunning into the same folder therefore continues from the last completed stage.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from omegaconf import OmegaConf

from expertchat.config.schema import RESUME_HARMLESS, ExpertChatConfig
from expertchat.engine.models import check_model, load_pair
from expertchat.judging import rewards
from expertchat.modes.plan import device_maps
from expertchat.policies.adapters import Policies, check_saved
from expertchat.report.console import summary_lines
from expertchat.report.tracking import Tracker
from expertchat.runs.store import STAGES_DIR, RunStore
from expertchat.stages import dialogue, evaluation, heldout, interaction, rating, topics, training
from expertchat.stages.context import Run, Stage, run_stage
from expertchat.stats import fmt

log = logging.getLogger(__name__)


def check(cfg: ExpertChatConfig) -> tuple[list[str] | None, dict[str, list], list[heldout.EvalPrompt]]:
    """What can be checked before any model loads or anything is written: the models' folders and GPU-only
    settings, the held-out evaluation prompts, the topics (when they can be read without the actor) and, in a
    folder an earlier run used, that the config did not change (``resume``).

    Returns:
        (the topics read, or None; the config differences that ``resume=force`` lets through; the held-out
        evaluation prompts, none when ``evaluation.enabled=false``).

    Raises:
        ExpertChatError: an unreadable stage marker, a saved policy whose folder is gone, a missing model, a
            GPU-only setting without a GPU, a GPU plan that does not fit (``plan.device_maps``), bad topic input,
            or a changed config under ``resume=auto``.
    """
    store = RunStore(cfg.run_dir)
    store.check_markers()
    check_saved(store, range(cfg.rounds))
    check_model(cfg.actor, "actor")
    check_model(cfg.judge, "judge")
    device_maps(cfg)  # on GPUs: a plan that does not fit, or GPUs missing, stops here with the plan's verdict
    held_out = heldout.plan_prompts(cfg, store) if cfg.evaluation.enabled else []
    early = topics.read_before_models(cfg.topics, store, cfg.topics.n * cfg.rounds, seed=cfg.seed,
                                      exclude=heldout.held_out(cfg, held_out))
    forced = store.check_resume(OmegaConf.to_container(OmegaConf.structured(cfg)), RESUME_HARMLESS,
                                force=cfg.resume == "force")
    return early, forced, held_out


def run(cfg: ExpertChatConfig, tracker: Tracker | None = None,
        checked: tuple[list[str] | None, dict[str, list], list[heldout.EvalPrompt]] | None = None
        ) -> dict[str, Any]:
    """Run the experiment described by ``cfg`` in ``cfg.run_dir``; return the last round's stage summaries.
    ``checked``: what :func:`check` returned (``modes.run`` checks first); ``None`` checks here.

    Raises:
        ExpertChatError: bad input (before anything is written) or a stage that failed (earlier stages' files
            and markers are kept).
    """
    start = time.perf_counter()
    store = RunStore(cfg.run_dir)
    early, forced, held_out = checked if checked is not None else check(cfg)
    earlier = _earlier_work(store)
    leftovers = store.clean_leftovers()  # before anything is written: a killed run's temporary files
    store.record_config(OmegaConf.to_container(OmegaConf.structured(cfg)), forced)
    if cfg.evaluation.enabled:
        heldout.record_prompts(cfg, store, held_out)  # before the topics: kept out of every dialogue
    if not _todo(cfg, store):
        log.info("nothing left to do: all %d round(s) of %s are complete", cfg.rounds, store.root)
        training.write_rewards_by_round(store, cfg.rounds)  # derived files: a kill may have come before them
        summary = {s.name: store.stage_summary(cfg.rounds - 1, s.name) for s in STAGES}
        _log_lines(summary_lines(store.root, cfg.rounds, summary, None))
        return summary
    if earlier:
        _resume(store, _todo(cfg, store)[0], leftovers)
    actor, judge = load_pair(cfg.actor, cfg.judge, device_maps(cfg))  # the plan's placement on GPUs
    run_topics = topics.run_topics(cfg.topics, store, cfg.topics.n * cfg.rounds, early, model=actor,
                                   generation=cfg.generation, seed=cfg.seed,
                                   exclude=heldout.held_out(cfg, held_out))
    # Each role's policy: a LoRA adapter per role (one base + two adapters when both roles share the weights).
    # From here on every stage sees the models through these views; a resumed run reloads the last adapters.
    policies = Policies({"actor": actor, "judge": judge}, cfg.training)
    policies.restore(store, cfg.rounds)
    ctx = Run(cfg, store, tracker or Tracker(), run_topics, policies,
              functools.cache(lambda: rewards.reward_for(cfg.judging, cfg.reward)),  # built on first need
              held_out, functools.cache(lambda: evaluation.frozen_judge(cfg, policies)))

    summary: dict[str, Any] = {}
    if cfg.evaluation.enabled:  # the base models, before round 0: what every round is compared with
        summary["base"] = run_stage(ctx, "base", EVALUATION)
    for r in range(cfg.rounds):
        for s in STAGES:
            summary[s.name] = run_stage(ctx, r, s)
        training.write_rewards_by_round(store, cfg.rounds)
    _log_lines(summary_lines(store.root, cfg.rounds, summary, time.perf_counter() - start))
    return summary


def _todo(cfg: ExpertChatConfig, store: RunStore) -> list[tuple[int | str, Stage]]:
    """The (round, stage) pairs not done yet, in order: the base evaluation, then each round's stages."""
    points = [("base", EVALUATION)] if cfg.evaluation.enabled else []
    return [(r, s) for r, s in points + [(r, s) for r in range(cfg.rounds) for s in STAGES]
            if not store.done(r, s.name)]


def _earlier_work(store: RunStore) -> bool:
    """Whether an earlier run into the folder left stage markers or records: this run then resumes it."""
    return (any(store.path(STAGES_DIR).glob("*.json"))
            or any(store.path(name).exists() for s in STAGES for name in s.files))


def _resume(store: RunStore, first: tuple[int | str, Stage], leftovers: list[str]) -> None:
    """Log, in one line, where a rerun resumes (``first``: the first stage not done) and what the interrupted
    stage left: its records move aside now (``RunStore.begin``; :func:`run_stage` then finds none), counted per
    file."""
    r, s = first
    moved = store.begin(r, s.name, s.files)
    aside = "; ".join(f"{n} record{'s' if n != 1 else ''} of {name} set aside into "
                      f"{name.removesuffix('.jsonl')}.incomplete.jsonl" for name, n in moved.items())
    log.info("resuming %s at round %s %s (the stages before it are complete): %s%s", store.root, r, s.name,
             aside or "no record of an interrupted attempt to set aside",
             f"; removed {len(leftovers)} leftover temporary file(s)/folder(s)" if leftovers else "")


def _log_lines(lines: list[str]) -> None:
    for line in lines:
        log.info("%s", line)


# ------------------------------------------------------------------------------------------------ the stages


# ---------------------------------------------------------------------------- each stage's summary, in short


def _dialogue_lines(s: dict[str, Any]) -> list[str]:
    return [f"{s['dialogues']} dialogues, {s['turns']} turns, {s['new_tokens']} new tokens in {s['seconds']} s "
            f"({s['tok_per_s']} tok/s); {s['cut_at_max_new_tokens']} cut at max_new_tokens, "
            f"{s['empty_turns']} empty"]


def _rating_lines(s: dict[str, Any]) -> list[str]:
    return [f"{role} rated by {m['rater']}: score {fmt(m['score_mean'], 2)}, reward {fmt(m['reward_mean'])} "
            f"({m['scored']}/{m['rated']} scored, {m['skipped']} skipped, {m['empty_wims']} empty WIMs)"
            for role, m in s.get("models", {}).items()]


def _training_lines(s: dict[str, Any]) -> list[str]:
    if "skipped" in s:
        return [f"skipped ({s['skipped']})"]
    return [f"{role}: {m['skipped']}" if "skipped" in m else
            f"{role}: {m['steps']} steps, {m['seconds_per_step']} s/step, reward {fmt(m['reward_mean'])} "
            f"(first batch {fmt(m['reward_first_batch'])}, last {fmt(m['reward_last_batch'])}), "
            f"{m['masked_fraction']:.0%} of pairs masked"
            for role, m in s.get("roles", {}).items()]


def _rating_headlines(s: dict[str, Any]) -> dict[str, Any]:
    return {f"rating/{role}_{k}": m[k] for role, m in s.get("models", {}).items()
            for k in ("score_mean", "reward_mean")}


# The loop's table: a new stage (evaluation, ...) is one more line.
STAGES = (
    Stage("dialogue", dialogue.stage, [dialogue.TURNS_FILE], _dialogue_lines,
          lambda s: {"dialogue/tok_per_s": s.get("tok_per_s"), "dialogue/new_tokens": s.get("new_tokens")}),
    Stage("rating", rating.stage, [rating.RATINGS_FILE], _rating_lines, _rating_headlines),
    # what the two speakers did to each other (echo, agreement, drift, ...): words and the reward's embedder only
    Stage("interaction", interaction.stage, [interaction.INTERACTION_FILE], interaction.describe,
          interaction.headlines),
    # the trainer tracks every step and the round's mean rewards itself (training.py)
    Stage("training", training.stage, [training.TRAIN_METRICS_FILE], _training_lines, lambda s: {}),
    # held-out answers scored by a frozen judge; also run once before round 0 ("base"); tracked by evaluation.py
    Stage("evaluation", evaluation.stage, evaluation.FILES, evaluation.describe, lambda s: {}),
)
EVALUATION = STAGES[-1]
