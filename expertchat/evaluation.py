"""The evaluation stage: does a round of self-play make either model better on prompts it never trained on?

    held-out prompts --(answer: each role, in its persona, fixed decoding)--> answers
        --(a FROZEN judge: Judge.rate + rewards.rewards, the training rubric and reward)--> eval.jsonl rows
        --(summarize: 95% bootstrap CIs, paired deltas vs the base, guards)--> stages/<point>.evaluation.json

An evaluation *point* is ``"base"`` (the base models, before round 0) or a round ``r`` (after round r's training).
The prompts are chosen once per run folder and kept in ``eval_prompts.json`` (with the settings they were answered
with): by default ``evaluation.holdout`` topics drawn with the run's seed from the topics source and left out of
every dialogue (``topics.load_topics(exclude=...)``), or the questions of a JSONL file. Every point decodes the same
way (greedy, or sampling seeded by ``evaluation.seed + sample``), so the base and round r answers to the same
prompt and sample are paired. The judge is frozen: the judge role's round-0 base (adapters disabled) unless
``evaluation.judge`` names another model, so its scale does not drift while the partners train.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from expertchat.config import ExpertChatConfig, GenerationConfig
from expertchat.console import fmt, progress_bar
from expertchat.dialogue import ROLES
from expertchat.errors import ExpertChatError
from expertchat.generation import generate
from expertchat.judging import Judge, RatingItem
from expertchat.models import render_prompt
from expertchat.rewards import load_embedder, rewards, wants_wim
from expertchat.scoring import copied_mask
from expertchat.topics import TOPICS_FILE, from_jsonl, source_topics

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.generation import Generated
    from expertchat.models import LoadedModel
    from expertchat.store import RunStore
    from expertchat.tracking import Tracker

log = logging.getLogger(__name__)

EVAL_FILE = "eval.jsonl"
PROMPTS_FILE = "eval_prompts.json"
COPY_NGRAM = 3  # an answer token inside a 3-gram of the prompt's tokens counts as copied (as the likelihood does)
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
        recorded = store.read_json(PROMPTS_FILE)
        changed = [k for k in _FIXED if recorded["settings"].get(k) != settings(cfg)[k]]
        if changed:
            raise ExpertChatError(
                f"evaluation.{changed[0]} is {settings(cfg)[changed[0]]!r} but {store.path(PROMPTS_FILE)} was "
                f"answered with {recorded['settings'].get(changed[0])!r} (changed: {', '.join(changed)}): pass the "
                f"recorded value, or evaluate into a copy of the folder without eval.jsonl, {PROMPTS_FILE} and "
                f"stages/*.evaluation.json")
        return [EvalPrompt(**p) for p in recorded["prompts"]]
    if ev.source == "jsonl":
        questions = from_jsonl(ev.path, ev.question_field)[:ev.limit]
        return [EvalPrompt(i, q, q) for i, q in enumerate(questions)]
    if cfg.topics.source == "generated":
        raise ExpertChatError("evaluation.source=topics needs topics it can hold out before the dialogues; with "
                              "topics=generated set evaluation.source=jsonl evaluation.path=FILE.jsonl")
    used = store.read_json(TOPICS_FILE) if store.path(TOPICS_FILE).exists() else []
    topics = held_out_topics(source_topics(cfg.topics)[0], ev.holdout, cfg.seed, used)
    return [EvalPrompt(i, t, cfg.dialogue.opening.format(topic=t)) for i, t in enumerate(topics)]


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


def decoding(cfg: ExpertChatConfig) -> GenerationConfig:
    """The fixed decoding of every point: greedy (top-k 1), or sampling at ``evaluation.temperature``/``top_p``."""
    ev, greedy = cfg.evaluation, cfg.evaluation.strategy == "greedy"
    return GenerationConfig(strategy="sample", max_new_tokens=ev.max_new_tokens, top_k=1 if greedy else 0,
                            temperature=1.0 if greedy else ev.temperature, top_p=1.0 if greedy else ev.top_p,
                            batch_size=cfg.generation.batch_size)


def answer(lm: LoadedModel, role: str, prompts: list[EvalPrompt], cfg: ExpertChatConfig,
           bar: Any) -> list[list[Generated]]:
    """``role``'s answers in its persona: ``[sample][prompt]``; sample s draws with seed ``evaluation.seed + s``."""
    texts = [render_prompt(lm.tokenizer, cfg.dialogue.persona(role, p.topic), [(False, p.question)])
             for p in prompts]
    out = []
    for s in range(cfg.evaluation.samples):
        out.append(generate(lm.model, lm.tokenizer, texts, decoding(cfg), stop_token_ids=lm.stop_token_ids,
                            seed=cfg.evaluation.seed + s, max_prompt_tokens=lm.cfg.max_length))
        bar.update(len(texts))
    return out


def distinct(ids: Sequence[Sequence[int]], n: int) -> float:
    """distinct-n (Li et al., 2016, arXiv 1510.03055): distinct n-grams / all n-grams over the token sequences
    ``ids`` (0.0 when they hold no n-gram).

    >>> distinct([[1, 2, 1, 2]], 2), distinct([[1, 2], [1, 2]], 1)
    (0.6666666666666666, 0.5)
    """
    grams = [tuple(seq[i:i + n]) for seq in ids for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _copied(lm: LoadedModel, question: str, ids: list[int]) -> float:
    q = lm.tokenizer(question, add_special_tokens=False)["input_ids"]
    return float(copied_mask(q, ids, COPY_NGRAM).float().mean()) if ids else 0.0


def _r(x: float | None, nd: int = 5) -> float | None:
    return None if x is None else round(float(x), nd)


def judge_rows(point: int | str, role: str, lm: LoadedModel, prompts: list[EvalPrompt],
               answers: list[list[Generated]], judge: Judge, cfg: ExpertChatConfig,
               progress: bool) -> list[dict[str, Any]]:
    """The frozen judge's verdict on each answer, as ``eval.jsonl`` rows (contract A of the issue)."""
    flat = [(s, p, g) for s, outs in enumerate(answers) for p, g in zip(prompts, outs)]
    items = [RatingItem(p.question, g.text) for _, p, g in flat]
    use_wim = wants_wim(cfg.judging, cfg.reward)
    judgements = judge.rate(items, wim=use_wim, progress=progress, desc=f"evaluation {point}: judging the {role}")
    parts = rewards(judgements, [it.answer for it in items], cfg.reward,
                    load_embedder(cfg.reward.embedder) if use_wim else None)
    return [{"round": point, "role": role, "model": lm.name, "prompt_id": p.id, "prompt": p.question, "sample": s,
             "answer": g.text, "tokens": len(g.token_ids), "cut": not g.finished,
             "copied_fraction": _r(_copied(lm, p.question, g.token_ids)),
             "distinct_1": _r(distinct([g.token_ids], 1)), "distinct_2": _r(distinct([g.token_ids], 2)),
             "scores": {n: _r(c.score) for n, c in j.categories.items()}, "score": _r(j.score),
             "rating": _r(pr.rating), "wim": j.wim or "", "similarity": _r(pr.similarity), "reward": _r(pr.reward)}
            for (s, p, g), j, pr in zip(flat, judgements, parts)]


# ------------------------------------------------------------------------------------------------ statistics


def bootstrap_ci(values: Sequence[float], resamples: int, seed: int) -> list[float] | None:
    """95% BCa bootstrap interval of the mean (``scipy.stats.bootstrap``; percentile where BCa is undefined);
    ``[v, v]`` when every value is ``v``; ``None`` for fewer than 2 values.

    >>> bootstrap_ci([0.5, 0.5, 0.5], 1000, 0), bootstrap_ci([1.0], 1000, 0)
    ([0.5, 0.5], None)
    """
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return None
    if np.all(data == data[0]):
        return [round(float(data[0]), 5)] * 2
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa warns (and gives NaN) on nearly degenerate data: percentile then
            ci = bootstrap((data,), np.mean, n_resamples=resamples, confidence_level=0.95, method=method,
                           rng=np.random.default_rng(seed)).confidence_interval
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            break
    return [round(float(ci.low), 5), round(float(ci.high), 5)]


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 5) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def role_summary(rows: list[dict[str, Any]], ids: list[list[int]], base: dict[str, Any] | None,
                 base_rows: list[dict[str, Any]] | None, cfg: ExpertChatConfig) -> dict[str, Any]:
    """One role's figures at one point: mean reward and category scores with 95% CIs, the PAIRED difference to
    the base answers to the same prompt and sample (mean, CI, win / tie / loss beyond ``evaluation.tie_tolerance``,
    win-rate = (wins + ties / 2) / pairs), mean tokens, corpus distinct-1/2 (over ``ids``), cut and copied
    fractions (of answers, of answer tokens), and their ratios to the base (``base``: its summary; ``None`` at
    the base point)."""
    ev = cfg.evaluation
    scored = [r for r in rows if r["reward"] is not None]
    tokens = sum(r["tokens"] for r in rows)
    out: dict[str, Any] = {
        "n": len(scored), "reward_mean": _mean([r["reward"] for r in scored]),
        "reward_ci": bootstrap_ci([r["reward"] for r in scored], ev.bootstrap, ev.seed),
        "scores": {n: {"mean": _mean(v), "ci": bootstrap_ci(v, ev.bootstrap, ev.seed)}
                   for n in cfg.judging.active()
                   for v in [[r["scores"][n] for r in rows if r["scores"].get(n) is not None]]},
        "delta_vs_base": None, "win": 0, "tie": 0, "loss": 0, "win_rate": None,
        "tokens_mean": _mean([r["tokens"] for r in rows]), "length_ratio": None,
        "distinct_1": round(distinct(ids, 1), 5), "distinct_2": round(distinct(ids, 2), 5), "distinct_2_ratio": None,
        "cut_fraction": _mean([float(r["cut"]) for r in rows]),
        "copied_fraction": round(sum(r["copied_fraction"] * r["tokens"] for r in rows) / tokens, 5) if tokens else 0.0,
    }
    if base is None or base_rows is None:
        return out
    before = {(r["prompt_id"], r["sample"]): r["reward"] for r in base_rows if r["reward"] is not None}
    deltas = [r["reward"] - before[k] for r in scored if (k := (r["prompt_id"], r["sample"])) in before]
    out["delta_vs_base"] = {"mean": _mean(deltas), "ci": bootstrap_ci(deltas, ev.bootstrap, ev.seed),
                            "pairs": len(deltas)}
    out["win"] = sum(d > ev.tie_tolerance for d in deltas)
    out["loss"] = sum(d < -ev.tie_tolerance for d in deltas)
    out["tie"] = len(deltas) - out["win"] - out["loss"]
    out["win_rate"] = round((out["win"] + out["tie"] / 2) / len(deltas), 4) if deltas else None
    out["length_ratio"] = _ratio(out["tokens_mean"], base["tokens_mean"])
    out["distinct_2_ratio"] = _ratio(out["distinct_2"], base["distinct_2"])
    return out


# ------------------------------------------------------------------------------------------- one point


def evaluate(models: dict[str, LoadedModel], judge_lm: LoadedModel, prompts: list[EvalPrompt],
             cfg: ExpertChatConfig, store: RunStore, point: int | str, tracker: Tracker) -> dict[str, Any]:
    """Evaluate each role's model (``models``) at ``point`` (``"base"`` or a round): answer every prompt, have
    ``judge_lm`` (frozen) score each answer, append the rows to ``eval.jsonl``, and return the point's summary
    (also tracked as ``eval/<role>_<figure>`` at ``eval/step`` = rounds trained: 0 for the base).

    Raises:
        ExpertChatError: a round point in a folder whose base point is missing (nothing to pair it with).
    """
    base_summary = None if point == "base" else store.stage_summary("base", "evaluation")["models"]
    start = time.perf_counter()
    judge = Judge(judge_lm, cfg.judging)
    summary: dict[str, Any] = {"round": point, "judge": judge_lm.name, "prompts": len(prompts),
                               "samples": cfg.evaluation.samples, "models": {}}
    total = len(ROLES) * len(prompts) * cfg.evaluation.samples
    for role in ROLES:
        with progress_bar(total // len(ROLES), cfg.progress, f"evaluation {point}: {role} answers", "answer") as bar:
            answers = answer(models[role], role, prompts, cfg, bar)
        rows = judge_rows(point, role, models[role], prompts, answers, judge, cfg, cfg.progress)
        for row in rows:
            store.append(EVAL_FILE, row)
        base_rows = None if point == "base" else store.read(EVAL_FILE, round="base", role=role)
        summary["models"][role] = role_summary(rows, [g.token_ids for outs in answers for g in outs],
                                               None if base_summary is None else base_summary[role], base_rows, cfg)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    step = 0 if point == "base" else int(point) + 1
    tracker.log({f"eval/{role}_{k}": (m[k] if k != "delta" else (m["delta_vs_base"] or {}).get("mean"))
                 for role, m in summary["models"].items()
                 for k in ("reward_mean", "delta", "win_rate", "tokens_mean", "distinct_2", "cut_fraction")}, step=step)
    return summary


def describe(s: dict[str, Any]) -> list[str]:
    """The point's summary in short log lines: per role the reward with its CI, the paired delta vs the base,
    win/tie/loss, and the guards beside them."""
    if "skipped" in s:
        return [f"skipped ({s['skipped']})"]

    def ci(c: list[float] | None) -> str:
        return f"[{fmt(c[0])}, {fmt(c[1])}]" if c else "[n/a]"

    lines = []
    for role, m in s.get("models", {}).items():
        d = m["delta_vs_base"]
        vs = (f"; vs base {fmt(d['mean'])} {ci(d['ci'])}, win/tie/loss {m['win']}/{m['tie']}/{m['loss']}, "
              f"length x{fmt(m['length_ratio'], 2)}, distinct-2 x{fmt(m['distinct_2_ratio'], 2)}") if d else ""
        lines.append(f"{role}: reward {fmt(m['reward_mean'])} {ci(m['reward_ci'])} on {m['n']} answers "
                     f"(judge {s['judge']}), {fmt(m['tokens_mean'], 1)} tokens, {m['cut_fraction']:.0%} cut, "
                     f"{m['copied_fraction']:.0%} copied{vs}")
    return lines
