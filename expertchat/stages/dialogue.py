"""The dialogue stage: N expert dialogues on N topics, stepped in lockstep with batched generation.

Turn 0 is the actor's, turn 1 the judge's, and so on. At each turn every dialogue's speaker is the same
model, so one batched :func:`~expertchat.engine.generation.generate` call writes that turn for all dialogues. Each
model sees the dialogue from its own side (its turns as ``assistant``, the partner's as ``user``) rendered
with its own chat template; the actor's first user message is the opening question on the topic.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from expertchat.config.schema import ROLES, DialogueConfig, GenerationConfig
from expertchat.engine.generation import generate
from expertchat.engine.models import LoadedModel, render_prompt
from expertchat.engine.prefixcache import PrefixStore
from expertchat.report.console import progress_bar
from expertchat.report.timing import Split
from expertchat.runs.store import RunStore

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.stages.context import Run

log = logging.getLogger(__name__)

TURNS_FILE = "turns.jsonl"


@dataclass
class Dialogue:
    """One dialogue: its topic and turns (role, text) in order."""

    id: str
    topic: str
    turns: list[dict[str, Any]] = field(default_factory=list)
    first: str = "actor"  # who opens (answers the opening question); "judge" in a counterbalanced copy
    step_seconds: dict[int, float] = field(default_factory=dict)  # turn -> seconds of its batched step (not a record)
    reused_tokens: dict[int, int] = field(default_factory=dict)  # turn -> prompt tokens from the prefix cache

    def view(self, role: str, opening: str) -> list[tuple[bool, str]]:
        """The dialogue as ``role`` sees it: (is_own_turn, text), starting with the partner's message."""
        turns = [(t["role"] == role, t["text"]) for t in self.turns]
        if role == self.first:  # the opener answers the opening question
            turns.insert(0, (False, opening))
        return turns

    def speaker(self, turn: int) -> str:
        """Who speaks turn ``turn``: the opener at even turns, the other role at odd ones."""
        return speaker(turn, self.first)


def speaker(turn: int, first: str = "actor") -> str:
    """Who speaks turn ``turn`` of a dialogue that ``first`` opens.

    >>> speaker(0), speaker(1), speaker(0, "judge"), speaker(3, "judge")
    ('actor', 'judge', 'judge', 'actor')
    """
    return ROLES[(turn + ROLES.index(first)) % 2]


def context(dialogue: Dialogue, role: str, upto: int, cfg: DialogueConfig) -> list[tuple[bool, str]]:
    """What ``role`` had seen before turn ``upto``: the view used for that turn's prompt."""
    partial = Dialogue(dialogue.id, dialogue.topic, dialogue.turns[:upto], first=dialogue.first)
    return partial.view(role, cfg.opening.format(topic=dialogue.topic))


def run_dialogues(models: dict[str, LoadedModel], topics: list[str], cfg: DialogueConfig,
                  generation: GenerationConfig, store: RunStore, *, round_idx: int = 0, seed: int = 0,
                  progress: bool = True, split: Split | None = None) -> list[Dialogue]:
    """Hold ``len(topics)`` dialogues of ``cfg.turns`` turns; append each turn to ``turns.jsonl`` as it is made.

    Args:
        models: ``{"actor": ..., "judge": ...}`` (may share one model object).
        topics: one topic per dialogue; with ``cfg.counterbalance`` each is also played with the judge opening
            (dialogue ``<id>-j``), so that who speaks first is not confused with who is better.
        store: the run folder; each turn is flushed to ``turns.jsonl`` and each finished dialogue gets a
            transcript ``dialogues/<id>.md``.
        split: receives each batched turn's seconds and new tokens as ``generation`` of its speaker.
    """
    dialogues = [Dialogue(f"r{round_idx}-d{i:03d}", topic) for i, topic in enumerate(topics)]
    if cfg.counterbalance:
        dialogues += [Dialogue(f"{d.id}-j", d.topic, first="judge") for d in list(dialogues)]
    # Each role's KV cache of every dialogue, kept between its turns (prefix caching); freed at the end.
    caches = {role: PrefixStore(generation.prefix_cache_gb) for role in ROLES} if generation.prefix_cache_gb else {}
    try:
        with progress_bar(cfg.turns * len(dialogues), progress, f"round {round_idx} dialogues", unit="turn") as bar:
            for turn in range(cfg.turns):
                for role in ROLES:  # one batched call per speaker (two when counterbalanced dialogues mix openers)
                    speaking = [d for d in dialogues if d.speaker(turn) == role]
                    if speaking:
                        _turn(speaking, turn, role, models, cfg, generation, store, round_idx, seed,
                              caches.get(role), split)
                bar.update(len(dialogues))
    finally:
        for cache in caches.values():
            cache.clear()
    for d in dialogues:
        store.write_text(f"dialogues/{d.id}.md", transcript(d, cfg))
    return dialogues


def _turn(dialogues: list[Dialogue], turn: int, role: str, models: dict[str, LoadedModel], cfg: DialogueConfig,
          generation: GenerationConfig, store: RunStore, round_idx: int, seed: int,
          cache: PrefixStore | None = None, split: Split | None = None) -> None:
    """Generate turn ``turn`` of ``dialogues`` (all spoken by ``role`` at this turn) in one batched call; append
    each to ``turns.jsonl``.

    ``cache``: the speaker's prefix store (reused between its turns; nothing kept after its last turn)."""
    lm = models[role]
    prompts = [render_prompt(lm.tokenizer, cfg.persona(role, d.topic), context(d, role, turn, cfg))
               for d in dialogues]
    start = time.perf_counter()
    outputs = generate(lm.model, lm.tokenizer, prompts, generation, stop_token_ids=lm.stop_token_ids,
                       seed=seed + 1000 * round_idx + turn, max_prompt_tokens=lm.cfg.max_length,
                       store=cache, keys=[d.id for d in dialogues], keep=turn + 2 < cfg.turns)
    seconds = time.perf_counter() - start
    for d, out in zip(dialogues, outputs):
        record = {
            "dialogue_id": d.id, "round": round_idx, "turn": turn, "role": role, "model": lm.name,
            "topic": d.topic, "text": out.text, "prompt_tokens": out.prompt_tokens,
            "new_tokens": out.new_tokens, "finished": out.finished,
        }
        d.step_seconds[turn] = round(seconds, 4)  # wall-clock: kept out of the records (deterministic)
        d.reused_tokens[turn] = out.reused_tokens
        d.turns.append(record)
        store.append(TURNS_FILE, record)
    new = sum(o.new_tokens for o in outputs)
    if split is not None:
        split.add("generation", role, seconds, tokens=new)
    log.debug("round %d turn %d (%s): %d tokens in %.1fs (%.0f tok/s)", round_idx, turn, lm.name, new,
             seconds, new / max(seconds, 1e-9))


def load_dialogues(store: RunStore, round_idx: int) -> list[Dialogue]:
    """Rebuild a round's dialogues from ``turns.jsonl`` (used when resuming after the dialogue stage)."""
    by_id: dict[str, Dialogue] = {}
    for r in sorted(store.read(TURNS_FILE, round=round_idx), key=lambda r: (r["dialogue_id"], r["turn"])):
        by_id.setdefault(r["dialogue_id"], Dialogue(r["dialogue_id"], r["topic"])).turns.append(r)
    for d in by_id.values():
        d.first = d.turns[0]["role"] if d.turns and d.turns[0]["turn"] == 0 else "actor"
    return list(by_id.values())


def transcript(d: Dialogue, cfg: DialogueConfig) -> str:
    """A readable Markdown transcript of one dialogue."""
    lines = [f"# {d.id}", "", f"**Topic:** {d.topic}", "", f"*Opening:* {cfg.opening.format(topic=d.topic)}", ""]
    for t in d.turns:
        end = "" if t["finished"] else " *(cut at max_new_tokens)*"
        lines += [f"### Turn {t['turn']} — {t['role']} ({t['model']})", "", t["text"] or "*(empty)*", end, ""]
    return "\n".join(lines)


def summarize(dialogues: list[Dialogue]) -> dict[str, Any]:
    turns = [t for d in dialogues for t in d.turns]
    steps: dict[int, float] = {}
    for d in dialogues:  # one batched step per turn index, shared by the dialogues
        steps.update(d.step_seconds)
    seconds = sum(steps.values())
    tokens = sum(t["new_tokens"] for t in turns)
    prompt_tokens = sum(t["prompt_tokens"] for t in turns)
    return {
        "dialogues": len(dialogues), "turns": len(turns), "new_tokens": tokens,
        "seconds": round(seconds, 3), "tok_per_s": round(tokens / max(seconds, 1e-9), 1),
        "step_seconds": [steps[t] for t in sorted(steps)],
        # prompt tokens fed to the model (prefix caching reuses the rest)
        "prompt_tokens": prompt_tokens, "prefilled_tokens": prompt_tokens - sum(sum(d.reused_tokens.values())
                                                                                for d in dialogues),
        "cut_at_max_new_tokens": sum(not t["finished"] for t in turns),
        "empty_turns": sum(not t["text"] for t in turns),
    }


def stage(run: Run, r: int) -> dict[str, Any]:
    """The dialogue stage of round ``r``: N dialogues in lockstep -> ``turns.jsonl``, transcripts; its summary."""
    cfg = run.cfg
    split = Split()
    dialogues = run_dialogues(run.models, run.topics_of(r), cfg.dialogue, cfg.generation, run.store, round_idx=r,
                              seed=cfg.seed, progress=cfg.progress, split=split)
    return {**summarize(dialogues), "timing": split.to_json()}
