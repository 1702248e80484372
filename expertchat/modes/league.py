"""``mode=league``: the cross-play league of a trained run. Does the actor of round 2 beat the actor of round 0
against the same partner?

    python -m expertchat mode=league league.run=outputs/my_run league.topics=4 league.turns=4

Every actor checkpoint (``base``, then each trained round) holds ``league.topics`` short dialogues with every judge
checkpoint, on the run's first held-out topics (``eval_prompts.json``: never trained on); the frozen judge (the
judge role's base, as in the evaluation) rates the actor's turns (:mod:`expertchat.stages.league`). The mean reward
of each pairing fills a matrix (actor x judge checkpoint); two actor checkpoints that met the same judge checkpoint
on the same topic are one comparison, and their Bradley-Terry ratings (:func:`expertchat.stats.bradley_terry`,
``base`` fixed at 0) come with 95% bootstrap CIs over topics. The result is ``league.json`` in the run folder and
the league part of its report (a heatmap of the matrix). Pairings already played are kept on a rerun.
"""

from __future__ import annotations

import logging
from typing import Any

from expertchat.config.schema import ExpertChatConfig
from expertchat.engine.models import check_model, load_pair
from expertchat.errors import ExpertChatError
from expertchat.modes.eval import run_config, trained_rounds
from expertchat.policies.adapters import Policies, check_saved
from expertchat.report import markdown as report
from expertchat.report.tracking import Tracker
from expertchat.runs.store import RunStore
from expertchat.stages import heldout, league
from expertchat.stages.dialogue import ROLES
from expertchat.stages.evaluation import frozen_judge
from expertchat.stats import bradley_terry

log = logging.getLogger(__name__)

LEAGUE_FILE = "league.json"


def check(cfg: ExpertChatConfig) -> tuple[ExpertChatConfig, list[int | str], list[str]]:
    """The run's config (its recorded one with this command's ``league``), its checkpoints and the league's topics.

    Raises:
        ExpertChatError: no run folder or config (:func:`expertchat.modes.eval.run_config`), no trained round, a
            method without a base to go back to, no held-out prompts, a missing model.
    """
    run_cfg = run_config(cfg, "league.run", own=("league",))
    store = RunStore(run_cfg.run_dir)
    store.check_markers()
    rounds = trained_rounds(store)
    check_saved(store, rounds)
    if not rounds:
        raise ExpertChatError(f"league.run: {store.root} holds no trained round (adapters/round_<r>/): a league "
                              f"compares the checkpoints of a run that trained")
    if run_cfg.training.method != "lora":
        raise ExpertChatError(f"league.run: {store.root} was trained with training.method={run_cfg.training.method}, "
                              f"which keeps no base model apart from the trained weights; the league needs lora")
    if not store.path(heldout.PROMPTS_FILE).exists():
        raise ExpertChatError(f"league.run: {store.root} has no {heldout.PROMPTS_FILE} (held-out topics): run it with "
                              f"evaluation.enabled=true, or mode=eval first")
    prompts = heldout.plan_prompts(run_cfg, store)
    topics = list(dict.fromkeys(p.topic for p in prompts))[:cfg.league.topics]
    for role in ROLES:
        check_model(getattr(run_cfg, role), role)
    return run_cfg, ["base", *rounds], topics


def run(cfg: ExpertChatConfig, tracker: Tracker | None = None,
        checked: tuple[ExpertChatConfig, list[int | str], list[str]] | None = None) -> dict[str, Any]:
    """Play every pairing not played yet, then rate the actor checkpoints; returns what ``league.json`` holds."""
    run_cfg, points, topics = checked if checked is not None else check(cfg)
    store = RunStore(run_cfg.run_dir)
    actor, judge = load_pair(run_cfg.actor, run_cfg.judge)
    policies = Policies({"actor": actor, "judge": judge}, run_cfg.training)
    frozen = frozen_judge(run_cfg, policies)
    results = []
    for a in points:
        for j in points:
            done = store.path(league.pairing_file(a, j))
            if done.exists():
                results.append(store.read_json(league.pairing_file(a, j)))
                continue
            for role, point in (("actor", a), ("judge", j)):
                policies.use_base(role) if point == "base" else policies.load(store, int(point), role)
            results.append(league.play(run_cfg, store, policies.models, frozen, topics, a, j))
            log.info("league: actor %s vs judge %s: mean reward %s", league.point_label(a), league.point_label(j),
                     _mean(results[-1]["reward"]))
    summary = summarize(results, points, run_cfg.league.bootstrap, run_cfg.seed)
    store.write_json(LEAGUE_FILE, summary)
    for line in describe(summary):
        log.info("%s", line)
    path = report.after_run(store.root, tracker or Tracker())
    log.info("league of %s: %s; report: %s", store.root, LEAGUE_FILE, path)
    return summary


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(sum(kept) / len(kept), 6) if kept else None


def summarize(results: list[dict[str, Any]], points: list[int | str], resamples: int, seed: int) -> dict[str, Any]:
    """``league.json``: the checkpoints, the matrix of mean rewards (``matrix[a][j]``: actor checkpoint ``a`` with
    judge checkpoint ``j``), the comparisons and each actor checkpoint's Bradley-Terry rating with its CI."""
    labels = [league.point_label(p) for p in points]
    matrix = [[None] * len(points) for _ in points]
    index = {str(p): i for i, p in enumerate(points)}
    for r in results:
        matrix[index[str(r["actor"])]][index[str(r["judge"])]] = _mean(r["reward"])
    comps = league.comparisons(results, points)
    ratings, cis = bradley_terry(len(points), comps, resamples=resamples, seed=seed) if comps else (
        [None] * len(points), [None] * len(points))
    return {"points": labels, "topics": results[0]["topics"] if results else [], "matrix": matrix,
            "comparisons": len(comps), "ratings": ratings, "ratings_ci": cis,
            "wins": [sum(w == i for w, _, _ in comps) for i in range(len(points))]}


def describe(s: dict[str, Any]) -> list[str]:
    """One line per actor checkpoint: its rating and CI, wins, and its mean reward against each judge checkpoint."""
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:+.2f}"

    return [f"league: actor {p}: Bradley-Terry {f(s['ratings'][i])} "
            f"{'[' + f(ci[0]) + ', ' + f(ci[1]) + ']' if (ci := s['ratings_ci'][i]) else ''} ({s['wins'][i]} wins "
            f"of {s['comparisons']} comparisons); reward vs judge "
            + ", ".join(f"{q} {f(s['matrix'][i][k])}" for k, q in enumerate(s["points"]))
            for i, p in enumerate(s["points"])]
