"""The held-out prompts of the evaluation, chosen once per run folder and kept in ``eval_prompts.json`` with the
settings they are answered with: by default ``evaluation.holdout`` topics drawn with the run's seed from the topics
source and left out of every dialogue, or the questions of a JSONL file (``evaluation.source=jsonl``)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from expertchat.config.schema import ExpertChatConfig
from expertchat.errors import ExpertChatError
from expertchat.stages.topics import from_jsonl, recorded_topics, source_topics

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.runs.store import RunStore

PROMPTS_FILE = "eval_prompts.json"
# Settings that change the answers or their scores: a folder's points must all share them (PROMPTS_FILE has them).
_FIXED = ("source", "holdout", "path", "question_field", "limit", "strategy", "samples", "temperature", "top_p",
          "max_new_tokens", "seed", "judge", "tie_tolerance", "bootstrap")


@dataclass
class EvalPrompt:
    """One held-out prompt: ``question`` (the user message answered) and ``topic`` (fills the persona)."""

    id: int
    topic: str
    question: str


# ------------------------------------------------------------------------------------------------- prompts


def held_out_topics(source: Sequence[str], holdout: int, seed: int, used: Sequence[str] = ()) -> list[str]:
    """``holdout`` distinct topics of ``source`` drawn with ``seed`` (in source order), none of them in ``used``.

    >>> held_out_topics(["a", "b", "c", "d", "b"], 2, seed=0)
    ['b', 'd']

    Raises:
        ExpertChatError: no topic would be left for the dialogues, or none is left to hold out.
    """
    distinct = list(dict.fromkeys(source))
    free = [t for t in distinct if t not in set(used)]
    if not distinct:  # nothing to hold out: the topics' own check says the source is empty
        return []
    if not used and len(distinct) <= holdout:
        raise ExpertChatError(f"evaluation.holdout={holdout} leaves no topic for the dialogues (the source has "
                              f"{len(distinct)}): lower evaluation.holdout or set evaluation.source=jsonl")
    if not free:
        raise ExpertChatError("evaluation: every topic of the source was used by a dialogue, none is left to hold "
                              "out: set evaluation.source=jsonl evaluation.path=FILE.jsonl")
    chosen = set(random.Random(seed).sample(free, min(holdout, len(free))))
    return [t for t in free if t in chosen]


def plan_prompts(cfg: ExpertChatConfig, store: RunStore) -> list[EvalPrompt]:
    """The folder's held-out prompts: those in ``eval_prompts.json``, else chosen now (not written; see
    :func:`record_prompts`). Topics that ``topics.json`` says a dialogue used are never held out.

    Raises:
        ExpertChatError: the settings differ from those the folder's prompts were answered with, a topics source
            that lists no topics (``generated``), a missing questions file, or nothing to hold out.
    """
    ev = cfg.evaluation
    if store.path(PROMPTS_FILE).exists():
        recorded = store.read_json_as(
            PROMPTS_FILE, _valid_record, "record of the held-out prompts (settings and prompts)",
            "restore it from a copy, or delete it with eval.jsonl and stages/*.evaluation.json to evaluate every "
            "point again")
        changed = [k for k in _FIXED if recorded["settings"].get(k) != settings(cfg)[k]]
        if changed:
            raise ExpertChatError(
                f"evaluation.{changed[0]} is {settings(cfg)[changed[0]]!r} but {store.path(PROMPTS_FILE)} was "
                f"answered with {recorded['settings'].get(changed[0])!r} (changed: {', '.join(changed)}): pass the "
                f"recorded value, or evaluate into a copy of the folder without eval.jsonl, {PROMPTS_FILE} and "
                f"stages/*.evaluation.json")
        return [EvalPrompt(**p) for p in recorded["prompts"]]
    if store.read("eval.jsonl"):
        raise ExpertChatError(f"{store.path(PROMPTS_FILE)} is gone but eval.jsonl holds answers to the prompts it "
                              f"listed: restore it from a copy, or delete eval.jsonl and stages/*.evaluation.json to "
                              f"evaluate every point again")
    if ev.source == "jsonl":
        questions = from_jsonl(ev.path, ev.question_field)[:ev.limit]
        return [EvalPrompt(i, q, q) for i, q in enumerate(questions)]
    if cfg.topics.source == "generated":
        raise ExpertChatError("evaluation.source=topics needs topics it can hold out before the dialogues; with "
                              "topics=generated set evaluation.source=jsonl evaluation.path=FILE.jsonl")
    used = recorded_topics(store)
    topics = held_out_topics(source_topics(cfg.topics)[0], ev.holdout, cfg.seed, used)
    return [EvalPrompt(i, t, cfg.dialogue.opening.format(topic=t)) for i, t in enumerate(topics)]


def _valid_record(obj: Any) -> bool:
    """Whether ``obj`` is what :func:`record_prompts` writes."""
    fields = {f.name for f in dataclasses.fields(EvalPrompt)}
    return (isinstance(obj, dict) and isinstance(obj.get("settings"), dict) and isinstance(obj.get("prompts"), list)
            and all(isinstance(p, dict) and set(p) == fields for p in obj["prompts"]))


def settings(cfg: ExpertChatConfig) -> dict[str, Any]:
    """The evaluation settings every point of a folder shares (``evaluation.*`` that change answers or scores)."""
    ev = asdict(cfg.evaluation)
    return {k: ev[k] for k in _FIXED}


def record_prompts(cfg: ExpertChatConfig, store: RunStore, prompts: list[EvalPrompt]) -> None:
    """Write ``eval_prompts.json`` once: the prompts and the settings they are answered with."""
    if not store.path(PROMPTS_FILE).exists():
        store.write_json(PROMPTS_FILE, {"settings": settings(cfg), "prompts": [asdict(p) for p in prompts]})


def held_out(cfg: ExpertChatConfig, prompts: list[EvalPrompt]) -> frozenset[str]:
    """The topics the dialogues must leave out (none when the prompts come from a JSONL file)."""
    return frozenset(p.topic for p in prompts) if cfg.evaluation.source == "topics" else frozenset()


# ------------------------------------------------------------------------------------------ answer and judge
