"""The rating stage: each model rates every turn of the other, and each rated turn gets its reward.

    dialogues --(dialogue_items)--> RatingItems --(Judge.rate)--> Judgements --(rewards.rewards)--> RewardParts
              --(rating_record)--> ratings.jsonl, and the stage summary (summarize)

The judge is the partner model as it is in this round (``judging/judge.py``); the reward is
``(1 - zeta) * (score - 5) / 5 + zeta * cos(embed(turn), embed(WIM))`` (``judging/rewards.py``). This is the only
judging code that needs dialogues and rewards: ``judging`` imports neither, ``rewards`` imports ``judging``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from expertchat.config.schema import JudgingConfig
from expertchat.judging.judge import Judge, Judgement, RatingItem, turn_context
from expertchat.judging.rewards import load_embedder, rewards, wants_wim
from expertchat.report.timing import Split
from expertchat.stages.dialogue import ROLES, context, load_dialogues

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.config.schema import DialogueConfig, RewardConfig
    from expertchat.engine.models import LoadedModel
    from expertchat.judging.rewards import RewardParts
    from expertchat.runs.store import RunStore
    from expertchat.stages.context import Run

log = logging.getLogger(__name__)

RATINGS_FILE = "ratings.jsonl"


def dialogue_items(dialogues: list, ratee: str, dialogue_cfg: DialogueConfig,
                   judging: JudgingConfig) -> list[RatingItem]:
    """One :class:`RatingItem` per turn ``ratee`` spoke: the preceding context (opening question included) and
    the turn."""
    items = []
    for d in dialogues:
        for t in d.turns:
            if t["role"] == ratee:
                ctx = turn_context(context(d, ratee, t["turn"], dialogue_cfg), judging.context_turns)
                items.append(RatingItem(ctx, t["text"], {"dialogue_id": d.id, "turn": t["turn"], "topic": d.topic,
                                                         "ratee_model": t["model"]}))
    return items


def rating_record(item: RatingItem, j: Judgement, parts: RewardParts, mode: str, **extra: Any) -> dict[str, Any]:
    """One line of ``ratings.jsonl``: every component of the rating, not just the reward."""
    return {
        **extra, **item.meta, "mode": mode, "status": j.status, "score": _r(j.score),
        "categories": {name: cs.to_json() for name, cs in j.categories.items()},
        "pmi": _r(j.pmi), "answer_tokens": j.answer_tokens, "answer_total_tokens": j.answer_total_tokens,
        "judge_saw_whole": j.judge_saw_whole, "embedder_saw_whole": parts.embedder_saw_whole,
        "wim": j.wim, "wim_status": j.wim_status,
        "similarity": _r(parts.similarity), "similarity_status": parts.similarity_status,
        "rating": _r(parts.rating), "reward": _r(parts.reward),
    }


def _r(x: float | None, nd: int = 5) -> float | None:
    return None if x is None else round(float(x), nd)


def summarize(records: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Means of score, each category, similarity and reward over rated records, and the counts of every case."""
    def mean(values):
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 4) if values else None

    return {
        "rated": len(records), "scored": sum(r["score"] is not None for r in records),
        "score_mean": mean(r["score"] for r in records),
        "category_means": {n: mean(r["categories"][n]["score"] for r in records) for n in names},
        "similarity_mean": mean(r["similarity"] for r in records),
        "reward_mean": mean(r["reward"] for r in records),
        "parse_failures": sum(c.get("status") == "parse_failure" for r in records for c in r["categories"].values()),
        "skipped": sum(r["status"] == "skipped" for r in records),
        "neutral": sum(r["status"] == "neutral" for r in records),
        "empty_answers": sum(r["status"] == "empty_answer" for r in records),
        "empty_wims": sum(r["wim_status"] == "empty" for r in records),
        **cut_counts(records),
    }


def cut_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """How many rated answers the judge (``judging.max_answer_tokens``) or the embedder (its window) saw cut."""
    return {"judge_cut": sum(r.get("judge_saw_whole") is False for r in records),
            "embedder_cut": sum(r.get("embedder_saw_whole") is False for r in records)}


def warn_cut(counts: dict[str, int], rated: int, where: str) -> None:
    """One warning line when answers were cut for the judge or the embedder (the rows say which)."""
    if counts["judge_cut"] or counts["embedder_cut"]:
        log.warning("%s: of %d rated answers the judge saw %d cut (judging.max_answer_tokens: first and last halves "
                    "kept) and the embedder %d (its window: the start kept); the rows say which "
                    "(judge_saw_whole, embedder_saw_whole)", where, rated, counts["judge_cut"], counts["embedder_cut"])


def run_rating(models: dict[str, LoadedModel], dialogues: list, dialogue_cfg: DialogueConfig, judging: JudgingConfig,
               reward: RewardConfig, store: RunStore, *, round_idx: int = 0, progress: bool = True) -> dict[str, Any]:
    """The rating stage: each model rates every turn of the other; one ``ratings.jsonl`` line per rated turn.

    Args:
        models: ``{"actor": ..., "judge": ...}``; the rater of the actor's turns is the judge and vice versa.
        dialogues: the round's dialogues (``dialogue.run_dialogues`` / ``dialogue.load_dialogues``).
        reward: the :class:`~expertchat.config.schema.RewardConfig` (zeta, empty-WIM similarity, embedder).
        store: the run folder; records are appended and flushed per rater.

    Returns:
        The stage summary: per rated model (``ratee``) the means and counts of :func:`summarize`, and seconds;
        ``timing``: each rater's seconds and ratings as ``judging`` (:class:`~expertchat.report.timing.Split`).
    """
    embedder = load_embedder(reward.embedder) if wants_wim(judging, reward) else None
    summary: dict[str, Any] = {"mode": judging.mode, "zeta": reward.zeta, "models": {}}
    split = Split()
    for ratee in ROLES:
        rater = ROLES[1 - ROLES.index(ratee)]
        items = dialogue_items(dialogues, ratee, dialogue_cfg, judging)
        start = time.perf_counter()
        judge = Judge(models[rater], judging)
        judgements = judge.rate(items, wim=wants_wim(judging, reward), progress=progress,
                                desc=f"round {round_idx} rating of the {ratee} by the {rater}")
        parts = rewards(judgements, [it.answer for it in items], reward, embedder)
        seconds = time.perf_counter() - start
        split.add("judging", rater, seconds, ratings=len(items))
        records = [rating_record(it, j, p, judging.mode, round=round_idx, rater=rater, ratee=ratee,
                                 rater_model=models[rater].name)
                   for it, j, p in zip(items, judgements, parts)]
        for rec in records:
            store.append(RATINGS_FILE, rec)
        s = summarize(records, list(judging.active()))
        s.update(rater=rater, rater_model=models[rater].name, ratee_model=models[ratee].name,
                 seconds=round(seconds, 2))
        summary["models"][ratee] = s
        warn_cut(s, s["rated"], f"round {round_idx} rating of the {ratee}")
    summary["timing"] = split.to_json()
    return summary


def stage(run: Run, r: int) -> dict[str, Any]:
    """The rating stage of round ``r``: each model rates every turn of the other -> ``ratings.jsonl``."""
    cfg = run.cfg
    return run_rating(run.models, load_dialogues(run.store, r), cfg.dialogue, cfg.judging, cfg.reward, run.store,
                      round_idx=r, progress=cfg.progress)
