"""The ExpertChat loop (``mode=run``), top to bottom:

    topics ──> EVALUATION of the base ──> (DIALOGUE ──> RATING ──> TRAINING ──> EVALUATION) x rounds

Each stage is one line of the table :data:`STAGES`: :func:`run_stage` skips it when its marker says it is done,
else sets aside what an interrupted attempt left, runs it, marks it done with its summary, logs and tracks it.
Rerunning into the same folder therefore continues from the last completed stage.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from omegaconf import OmegaConf

from expertchat import dialogue, evaluation, evaluation_mode, rating, rewards, topics, training
from expertchat.adapters import Policies
from expertchat.config import RESUME_HARMLESS, ExpertChatConfig
from expertchat.console import fmt, summary_lines
from expertchat.models import check_model, load_pair
from expertchat.store import RunStore
from expertchat.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What every stage of a run reads: the config, the run folder, the tracker, the topics, each role's policy
    (``models``: views that every stage uses, ``policies``: their adapters) and the reward factory."""

    cfg: ExpertChatConfig
    store: RunStore
    tracker: Tracker
    topics: list[str]
    policies: Policies
    reward_for: Callable[[], training.RewardFactory]
    eval_prompts: list[evaluation.EvalPrompt] = dataclasses.field(default_factory=list)  # held out: never trained on
    eval_judge: Callable[[], Any] | None = None  # the evaluation's frozen judge (loaded on first need)

    @property
    def models(self) -> dict[str, Any]:
        return self.policies.models

    def topics_of(self, round_idx: int) -> list[str]:
        """The ``topics.n`` topics of round ``round_idx`` (one per dialogue)."""
        n = self.cfg.topics.n
        return self.topics[round_idx * n:(round_idx + 1) * n]


def check(cfg: ExpertChatConfig) -> tuple[list[str] | None, dict[str, list], list[evaluation.EvalPrompt]]:
    """What can be checked before any model loads or anything is written: the models' folders and GPU-only
    settings, the held-out evaluation prompts, the topics (when they can be read without the actor) and, in a
    folder an earlier run used, that the config did not change (``resume``).

    Returns:
        (the topics read, or None; the config differences that ``resume=force`` lets through; the held-out
        evaluation prompts, none when ``evaluation.enabled=false``).

    Raises:
        ExpertChatError: a missing model, a GPU-only setting without a GPU, bad topic input, or a changed config
            under ``resume=auto``.
    """
    store = RunStore(cfg.run_dir)
    check_model(cfg.actor, "actor")
    check_model(cfg.judge, "judge")
    held_out = evaluation.plan_prompts(cfg, store) if cfg.evaluation.enabled else []
    early = topics.read_before_models(cfg.topics, store, cfg.topics.n * cfg.rounds, seed=cfg.seed,
                                      exclude=evaluation.held_out(cfg, held_out))
    forced = store.check_resume(OmegaConf.to_container(OmegaConf.structured(cfg)), RESUME_HARMLESS,
                                force=cfg.resume == "force")
    return early, forced, held_out


def run(cfg: ExpertChatConfig, tracker: Tracker | None = None,
        checked: tuple[list[str] | None, dict[str, list], list[evaluation.EvalPrompt]] | None = None
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
        evaluation.record_prompts(cfg, store, held_out)  # before the topics: kept out of every dialogue
    if not _todo(cfg, store):
        log.info("nothing left to do: all %d round(s) of %s are complete", cfg.rounds, store.root)
        training.write_rewards_by_round(store, cfg.rounds)  # derived files: a kill may have come before them
        summary = {s.name: store.stage_summary(cfg.rounds - 1, s.name) for s in STAGES}
        _log_lines(summary_lines(store.root, cfg.rounds, summary, None))
        return summary
    if earlier:
        _resume(store, _todo(cfg, store)[0], leftovers)
    actor, judge = load_pair(cfg.actor, cfg.judge)
    run_topics = topics.run_topics(cfg.topics, store, cfg.topics.n * cfg.rounds, early, model=actor,
                                   generation=cfg.generation, seed=cfg.seed,
                                   exclude=evaluation.held_out(cfg, held_out))
    # Each role's policy: a LoRA adapter per role (one base + two adapters when both roles share the weights).
    # From here on every stage sees the models through these views; a resumed run reloads the last adapters.
    policies = Policies({"actor": actor, "judge": judge}, cfg.training)
    policies.restore(store, cfg.rounds)
    ctx = Run(cfg, store, tracker or Tracker(), run_topics, policies,
              functools.cache(lambda: rewards.reward_for(cfg.judging, cfg.reward)),  # built on first need
              held_out, functools.cache(lambda: evaluation_mode.frozen_judge(cfg, policies)))

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
    return (any(store.path("stages").glob("*.json"))
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


def dialogue_stage(run: Run, r: int) -> dict[str, Any]:
    """N dialogues of the round in lockstep -> ``turns.jsonl``, transcripts."""
    cfg = run.cfg
    return dialogue.summarize(dialogue.run_dialogues(run.models, run.topics_of(r), cfg.dialogue, cfg.generation,
                                                     run.store, round_idx=r, seed=cfg.seed, progress=cfg.progress))


def rating_stage(run: Run, r: int) -> dict[str, Any]:
    """Each model rates every turn of the other -> ``ratings.jsonl`` (scores, WIM, reward)."""
    cfg = run.cfg
    return rating.run_rating(run.models, dialogue.load_dialogues(run.store, r), cfg.dialogue, cfg.judging,
                             cfg.reward, run.store, round_idx=r, progress=cfg.progress)


def training_stage(run: Run, r: int) -> dict[str, Any]:
    """Online DPO of each model, its partner (frozen at round start) judging -> ``adapters/round_<r>/<role>/``."""
    cfg = run.cfg
    reward_for = run.reward_for() if cfg.training.steps > 0 else None
    about = {"reward": f"(1 - zeta) (score - 5) / 5 + zeta cos(turn, WIM), zeta {cfg.reward.zeta}, judging "
                       f"{', '.join(f'{n} {c.signal}' for n, c in cfg.judging.active().items())}"}
    return training.train_round(run.policies, r, dialogue.load_dialogues(run.store, r), reward_for, cfg.dialogue,
                                run.store, run.tracker, seed=cfg.seed, progress=cfg.progress, about=about)


class Stage(NamedTuple):
    """One stage of a round: its ``body``, the JSONL ``files`` it appends to, and how its summary is shown:
    ``describe`` (short log lines) and ``headlines`` (metrics for the tracker)."""

    name: str
    body: Callable[[Run, int], dict[str, Any]]
    files: list[str]
    describe: Callable[[dict[str, Any]], list[str]]
    headlines: Callable[[dict[str, Any]], dict[str, Any]]


def run_stage(run: Run, round_idx: int | str, s: Stage) -> dict[str, Any]:
    """Run stage ``s`` of round ``round_idx`` unless its marker says it is done; return its summary.

    Records that an interrupted attempt left in ``s.files`` move to ``<file>.incomplete.jsonl`` first
    (``RunStore.begin``), so no record is written twice; the summary is kept in ``stages/round_<r>.<name>.json``;
    its headline figures are logged and tracked at step ``round_idx``.

    Raises:
        ExpertChatError: the stage failed; its marker is not written, so a rerun runs it again.
    """
    ran = not run.store.done(round_idx, s.name)
    if ran:
        run.store.begin(round_idx, s.name, s.files)
        run.store.finish(round_idx, s.name, s.body(run, round_idx))
    summary = run.store.stage_summary(round_idx, s.name)
    for line in s.describe(summary):
        log.info("%s %s%s: %s", "base" if round_idx == "base" else f"round {round_idx}", s.name,
                 "" if ran else " (done before)", line)
    metrics = {k: v for k, v in s.headlines(summary).items() if v is not None}
    if ran and metrics:
        run.tracker.log(metrics, step=round_idx)
    return summary


# ---------------------------------------------------------------------------- each stage's summary, in short


def _dialogue_lines(s: dict[str, Any]) -> list[str]:
    return [f"{s['dialogues']} dialogues, {s['turns']} turns, {s['new_tokens']} new tokens in {s['seconds']} s "
            f"({s['tok_per_s']} tok/s); {s['cut_at_max_new_tokens']} cut at max_new_tokens, "
            f"{s['empty_turns']} empty"]


def _rating_lines(s: dict[str, Any]) -> list[str]:
    return [f"{role} rated by {m['rater']}: score {fmt(m['score_mean'], 2)}, reward {fmt(m['reward_mean'])} "
            f"({m['scored']}/{m['rated']} scored, {m['skipped']} skipped, {m['empty_wims']} empty WIMs)"
            for role, m in s.get("models", {}).items()]


def evaluation_stage(run: Run, r: int | str) -> dict[str, Any]:
    """Each role's current policy answers the held-out prompts; the frozen judge scores them -> ``eval.jsonl``.
    ``r``: ``"base"`` (before round 0) or the round just trained."""
    if not run.cfg.evaluation.enabled:
        return {"skipped": "evaluation.enabled=false"}
    later = [t for t in range(int(r) + 1, run.cfg.rounds) if run.store.done(t, "training")] if r != "base" else []
    if later:  # a folder from before the evaluation stage: the policy of round r is gone from memory
        return {"skipped": f"round {later[-1]} is trained already: evaluate round {r} with mode=eval"}
    return evaluation_mode.evaluate_point(run.cfg, run.store, run.models, run.eval_judge(), run.eval_prompts, r,
                                          run.tracker)


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
    Stage("dialogue", dialogue_stage, [dialogue.TURNS_FILE], _dialogue_lines,
          lambda s: {"dialogue/tok_per_s": s.get("tok_per_s"), "dialogue/new_tokens": s.get("new_tokens")}),
    Stage("rating", rating_stage, [rating.RATINGS_FILE], _rating_lines, _rating_headlines),
    # the trainer tracks every step and the round's mean rewards itself (training.py)
    Stage("training", training_stage, [training.TRAIN_METRICS_FILE], _training_lines, lambda s: {}),
    # held-out answers scored by a frozen judge; also run once before round 0 ("base"); tracked by evaluation.py
    Stage("evaluation", evaluation_stage, [evaluation.EVAL_FILE], evaluation.describe, lambda s: {}),
)
EVALUATION = STAGES[-1]
