"""The interaction stage: what the two speakers of each dialogue of a round did to each other, turn by turn.

For every turn of ``turns.jsonl`` it writes one record to ``interaction.jsonl``: the word measures of
:mod:`expertchat.interaction` (echo of the partner, agreement, questions, novelty, words introduced and taken up,
length ratio and vocabulary overlap with the partner's last turn), and two embedding measures from the reward's
sentence embedder (``reward.embedder``, all-MiniLM-L6-v2 by default):

- ``adherence``: cosine similarity of the turn and its dialogue's topic (a drift curve over turns: a dialogue that
  leaves its topic falls);
- ``partner_similarity``: cosine similarity of the turn and the partner's last turn (convergence in meaning).

It needs no model of the run (only the embedder), so ``mode=analyze`` measures any run folder again, older ones
included. The stage's summary (its marker) holds per-speaker means; the report aggregates the records by round,
speaker and topic with bootstrap CIs (:mod:`expertchat.report.interaction`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from expertchat.interaction import dialogue_measures, steering
from expertchat.judging.rewards import load_embedder
from expertchat.stages.dialogue import TURNS_FILE

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.config.schema import EmbedderConfig
    from expertchat.runs.store import RunStore
    from expertchat.stages.context import Run

log = logging.getLogger(__name__)

INTERACTION_FILE = "interaction.jsonl"
MEANS = ("echo", "agreement", "disagreement", "questions", "novelty", "adherence", "partner_similarity",
         "vocab_overlap", "length_ratio")  # what the summary averages per speaker


def measure(turns: list[dict[str, Any]], embedder_cfg: EmbedderConfig) -> list[dict[str, Any]]:
    """One interaction record per turn of ``turns`` (records of ``turns.jsonl``, any rounds), in dialogue and turn
    order.

    Returns:
        ``[N]`` dicts: the turn's ids (round, dialogue_id, turn, role, model, topic), the measures of
        :func:`expertchat.interaction.dialogue_measures`, ``adherence``, ``partner_similarity`` and ``steer``
        (the speaker's share of what was taken up in its dialogue: :func:`expertchat.interaction.steering`).
    """
    dialogues: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for t in turns:
        dialogues[(t["round"], str(t["dialogue_id"]))].append(t)
    rows, topic_pairs, partner_pairs = [], [], []
    for (round_idx, dialogue_id), ts in sorted(dialogues.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        ts.sort(key=lambda t: t["turn"])
        texts = [t.get("text") or "" for t in ts]
        measures = dialogue_measures(ts[0].get("topic") or "", texts)
        steer = steering(measures, [t["role"] for t in ts])
        opener = ts[0]["role"] if ts[0]["turn"] == 0 else None  # dialogue.counterbalance: the judge opens some
        for i, (t, m) in enumerate(zip(ts, measures, strict=True)):
            rows.append({"round": round_idx, "dialogue_id": dialogue_id, "turn": t["turn"], "role": t["role"],
                         "model": t.get("model"), "topic": t.get("topic"), "opener": opener, **m,
                         "steer": steer[t["role"]]})
            topic_pairs.append((texts[i], t.get("topic") or ""))
            if i:
                partner_pairs.append((len(rows) - 1, texts[i], texts[i - 1]))
    if rows:
        embedder = load_embedder(embedder_cfg)
        adherence = embedder.similarity([a for a, _ in topic_pairs], [b for _, b in topic_pairs])
        partner = embedder.similarity([a for _, a, _ in partner_pairs], [b for _, _, b in partner_pairs])
        for row, value in zip(rows, adherence, strict=True):
            row["adherence"] = round(value, 6)
            row["partner_similarity"] = None
        for (index, _, _), value in zip(partner_pairs, partner, strict=True):
            rows[index]["partner_similarity"] = round(value, 6)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per speaker (role): turns, the mean of each of :data:`MEANS` over its turns (booleans as rates; None when
    no turn has the measure), the drift (mean adherence of its last turns minus its first), its steer share."""
    out: dict[str, Any] = {"turns": len(rows), "dialogues": len({(r["round"], r["dialogue_id"]) for r in rows}),
                           "speakers": {}}
    for role in sorted({r["role"] for r in rows}):
        mine = [r for r in rows if r["role"] == role]
        stats: dict[str, Any] = {"turns": len(mine)}
        for key in (*MEANS, "steer"):
            values = [float(r[key]) for r in mine if r.get(key) is not None]
            stats[key] = round(sum(values) / len(values), 4) if values else None
        first, last = min(r["turn"] for r in mine), max(r["turn"] for r in mine)
        at = {turn: [r["adherence"] for r in mine if r["turn"] == turn] for turn in (first, last)}
        stats["drift"] = (round(sum(at[last]) / len(at[last]) - sum(at[first]) / len(at[first]), 4)
                          if last != first else None)
        out["speakers"][role] = stats
    return out


def measure_round(store: RunStore, round_idx: int, embedder_cfg: EmbedderConfig) -> dict[str, Any]:
    """Measure round ``round_idx``'s dialogues of the folder into ``interaction.jsonl``; return the summary."""
    rows = measure(store.read(TURNS_FILE, round=round_idx), embedder_cfg)
    for row in rows:
        store.append(INTERACTION_FILE, row)
    return summarize(rows)


def stage(run: Run, round_idx: int) -> dict[str, Any]:
    """The loop's interaction stage (after rating): :func:`measure_round` with the run's embedder."""
    return measure_round(run.store, round_idx, run.cfg.reward.embedder)


def describe(s: dict[str, Any]) -> list[str]:
    """The stage's log lines: per speaker, echo, agreement, questions per turn, novelty, adherence and drift."""
    def f(x: Any, spec: str = ".2f") -> str:
        return "-" if x is None else format(x, spec)

    return [f"{role}: echo {f(m['echo'], '.0%')}, agreement {f(m['agreement'], '.0%')}, {f(m['questions'])} "
            f"questions/turn, novelty {f(m['novelty'], '.0%')}, topic adherence {f(m['adherence'])} (drift "
            f"{f(m['drift'], '+.2f')}), steers {f(m['steer'], '.0%')}"
            for role, m in s.get("speakers", {}).items()]


def headlines(s: dict[str, Any]) -> dict[str, Any]:
    """What the tracker gets per round: ``interaction/<role>_<measure>``."""
    return {f"interaction/{role}_{k}": m.get(k) for role, m in s.get("speakers", {}).items()
            for k in ("echo", "agreement", "adherence", "drift", "novelty", "steer")}
