"""One pairing of the cross-play league: an actor checkpoint talks with a judge checkpoint on fixed held-out topics,
and the FROZEN judge (the evaluation's: the judge role's base) rates the actor's turns.

A pairing's dialogues go to ``league/<actor point>_vs_<judge point>/`` (its ``turns.jsonl`` and transcripts, like a
round's) and its result to ``league/<actor>_vs_<judge>.json``, written whole once the pairing is rated: a rerun
skips the pairings that have one. :func:`comparisons` turns the results into Bradley-Terry comparisons: two actor
checkpoints against the SAME judge checkpoint on the SAME topic, the higher mean reward wins (ties dropped).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from expertchat.judging.judge import Judge
from expertchat.judging.rewards import load_embedder, rewards, wants_wim
from expertchat.runs.store import RunStore
from expertchat.stages.dialogue import run_dialogues
from expertchat.stages.rating import dialogue_items

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.config.schema import ExpertChatConfig
    from expertchat.engine.models import LoadedModel

LEAGUE_DIR = "league"


def point_label(point: int | str) -> str:
    """``base`` or ``round_<r>`` (a checkpoint's name in files and tables)."""
    return "base" if point == "base" else f"round_{point}"


def pairing_file(actor: int | str, judge: int | str) -> str:
    """The result file of a pairing, relative to the run folder."""
    return f"{LEAGUE_DIR}/{point_label(actor)}_vs_{point_label(judge)}.json"


def play(cfg: ExpertChatConfig, store: RunStore, models: dict[str, LoadedModel], frozen: LoadedModel,
         topics: Sequence[str], actor: int | str, judge: int | str) -> dict[str, Any]:
    """Hold ``len(topics)`` dialogues of ``cfg.league.turns`` turns between ``models`` (set to the two checkpoints
    by the caller), rate the actor's turns with ``frozen`` (the rubric and reward of the run), write the result.

    Returns:
        ``{"actor", "judge", "topics": [T], "reward": [T] the mean reward of the actor's turns per topic (None
        where no turn was scored), "turns": [T] turns rated}``.
    """
    sub = RunStore(store.path(pairing_file(actor, judge)).with_suffix(""))
    dialogue_cfg = dataclasses.replace(cfg.dialogue, turns=cfg.league.turns)
    dialogues = run_dialogues(models, list(topics), dialogue_cfg, cfg.generation, sub, round_idx=0, seed=cfg.seed,
                              progress=cfg.progress)
    items = dialogue_items(dialogues, "actor", dialogue_cfg, cfg.judging)
    wim = wants_wim(cfg.judging, cfg.reward)
    judgements = Judge(frozen, cfg.judging).rate(items, wim=wim, progress=cfg.progress,
                                                 desc=f"league: {point_label(actor)} vs {point_label(judge)}")
    parts = rewards(judgements, [it.answer for it in items], cfg.reward,
                    load_embedder(cfg.reward.embedder) if wim else None)
    per_topic: dict[str, list[float]] = {t: [] for t in topics}
    for item, part in zip(items, parts, strict=True):
        if part.reward is not None:
            per_topic[item.meta["topic"]].append(part.reward)
    result = {"actor": actor, "judge": judge, "topics": list(topics),
              "reward": [round(sum(v) / len(v), 6) if v else None for v in per_topic.values()],
              "turns": [len(v) for v in per_topic.values()]}
    store.write_json(pairing_file(actor, judge), result)
    return result


def comparisons(results: Sequence[dict[str, Any]], points: Sequence[int | str]) -> list[tuple[int, int, str]]:
    """``(winner, loser, topic)`` between actor checkpoints (indices into ``points``) that met the same judge
    checkpoint on the same topic; equal rewards are no comparison.

    >>> r = [{"actor": "base", "judge": "base", "topics": ["t"], "reward": [0.1]},
    ...      {"actor": 0, "judge": "base", "topics": ["t"], "reward": [0.3]}]
    >>> comparisons(r, ["base", 0])
    [(1, 0, 't')]
    """
    index = {str(p): i for i, p in enumerate(points)}
    by_judge: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_judge.setdefault(str(r["judge"]), []).append(r)
    out = []
    for group in by_judge.values():
        for a, b in itertools.combinations(group, 2):
            for topic, ra, rb in zip(a["topics"], a["reward"], b["reward"], strict=True):
                if ra is None or rb is None or ra == rb:
                    continue
                winner, loser = (a, b) if ra > rb else (b, a)
                out.append((index[str(winner["actor"])], index[str(loser["actor"])], topic))
    return out
