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
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from expertchat.config.schema import ExpertChatConfig, GenerationConfig
from expertchat.engine.generation import generate
from expertchat.engine.models import load_model, render_prompt
from expertchat.judging.judge import Judge, RatingItem
from expertchat.judging.rewards import load_embedder, rewards, wants_wim
from expertchat.report.console import progress_bar
from expertchat.report.timing import Split
from expertchat.stages import audit
from expertchat.stages.dialogue import ROLES
from expertchat.stages.harness import run_lm_eval
from expertchat.stages.heldout import EvalPrompt
from expertchat.stats import bootstrap_ci, copied_fraction, detectable_effect, distinct_n, fmt

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.engine.generation import Generated
    from expertchat.engine.models import LoadedModel
    from expertchat.policies.adapters import Policies
    from expertchat.report.tracking import Tracker
    from expertchat.runs.store import RunStore
    from expertchat.stages.context import Run

log = logging.getLogger(__name__)

EVAL_FILE = "eval.jsonl"
FILES = [EVAL_FILE, audit.PAIRWISE_FILE, audit.AUDIT_FILE]  # what an evaluation point appends to
COPY_NGRAM = 3  # an answer token inside a 3-gram of the prompt's tokens counts as copied (as the likelihood does)


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


def _distinct(ids: Sequence[Sequence[int]], n: int) -> float:
    """:func:`expertchat.stats.distinct_n` over the token sequences ``ids``, 0.0 when they hold no n-gram (as the
    rows and summaries record it)."""
    value = distinct_n(ids, n)
    return 0.0 if value is None else value


def _copied(lm: LoadedModel, question: str, ids: list[int]) -> float:
    """The fraction of the answer's tokens ``ids`` copied from the question (:func:`expertchat.stats.copied_fraction`
    in float32, as the rows have always held it); 0.0 for an empty answer."""
    if not ids:
        return 0.0
    q = lm.tokenizer(question, add_special_tokens=False)["input_ids"]
    return copied_fraction(q, ids, COPY_NGRAM, float32=True) or 0.0


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
             "distinct_1": _r(_distinct([g.token_ids], 1)), "distinct_2": _r(_distinct([g.token_ids], 2)),
             "scores": {n: _r(c.score) for n, c in j.categories.items()}, "score": _r(j.score),
             "rating": _r(pr.rating), "wim": j.wim or "", "similarity": _r(pr.similarity), "reward": _r(pr.reward)}
            for (s, p, g), j, pr in zip(flat, judgements, parts)]


# ------------------------------------------------------------------------------------------------ statistics


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
        "distinct_1": round(_distinct(ids, 1), 5), "distinct_2": round(_distinct(ids, 2), 5), "distinct_2_ratio": None,
        "cut_fraction": _mean([float(r["cut"]) for r in rows]),
        "copied_fraction": round(sum(r["copied_fraction"] * r["tokens"] for r in rows) / tokens, 5) if tokens else 0.0,
    }
    rewards = np.array([r["reward"] for r in scored], dtype=float)
    out["detectable"] = detectable_effect(float(rewards.std(ddof=1)), len(rewards)) if len(rewards) > 1 else None
    out["detectable_from"] = "sd of the rewards: paired differences assumed as spread"
    if base is None or base_rows is None:
        return out
    before = {(r["prompt_id"], r["sample"]): r["reward"] for r in base_rows if r["reward"] is not None}
    deltas = [r["reward"] - before[k] for r in scored if (k := (r["prompt_id"], r["sample"])) in before]
    out["delta_vs_base"] = {"mean": _mean(deltas), "ci": bootstrap_ci(deltas, ev.bootstrap, ev.seed),
                            "pairs": len(deltas)}
    if len(deltas) > 1:
        out["detectable"] = detectable_effect(float(np.std(deltas, ddof=1)), len(deltas))
        out["detectable_from"] = "sd of the paired differences"
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
    (with its timing split: each role's answers as ``generation``, the frozen judge's as ``judging`` of
    ``eval_judge``; also tracked as ``eval/<role>_<figure>`` at ``eval/step`` = rounds trained: 0 for the base).

    Raises:
        ExpertChatError: a round point in a folder whose base point is missing (nothing to pair it with).
    """
    base_summary = None if point == "base" else store.stage_summary("base", "evaluation")["models"]
    start = time.perf_counter()
    judge = Judge(judge_lm, cfg.judging)
    summary: dict[str, Any] = {"round": point, "judge": judge_lm.name, "prompts": len(prompts),
                               "samples": cfg.evaluation.samples, "models": {}}
    total = len(ROLES) * len(prompts) * cfg.evaluation.samples
    split = Split()  # the timing: each role's answers (generation), the frozen judge's ratings (judging)
    for role in ROLES:
        with progress_bar(total // len(ROLES), cfg.progress, f"evaluation {point}: {role} answers", "answer") as bar, \
                split.measure("generation", role) as work:
            answers = answer(models[role], role, prompts, cfg, bar)
            work["tokens"] = sum(len(g.token_ids) for outs in answers for g in outs)
        with split.measure("judging", "eval_judge") as work:
            rows = judge_rows(point, role, models[role], prompts, answers, judge, cfg, cfg.progress)
            work["ratings"] = len(rows)
        for row in rows:
            store.append(EVAL_FILE, row)
        base_rows = None if point == "base" else store.read(EVAL_FILE, round="base", role=role)
        summary["models"][role] = role_summary(rows, [g.token_ids for outs in answers for g in outs],
                                               None if base_summary is None else base_summary[role], base_rows, cfg)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["timing"] = split.to_json()
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
        if m.get("detectable") is not None:
            lines.append(f"{role}: {m['n']} prompts detect a paired reward change of +-{fmt(m['detectable'])} "
                         f"(80% power, 5% two-sided; {m['detectable_from']})")
    return lines + audit.describe(s)


def frozen_judge(cfg: ExpertChatConfig, policies: Policies) -> LoadedModel:
    """The evaluation's frozen judge: ``evaluation.judge`` when set; else the judge role's round-0 base, i.e. its
    weights with the adapters disabled (``Policies.frozen`` outside a training stage), or a fresh copy of them
    when ``training.method=full`` trains the weights in place."""
    if cfg.evaluation.judge is not None:
        return load_model(cfg.evaluation.judge)
    if cfg.training.method == "full":
        return load_model(cfg.judge)
    return policies.frozen("judge")


def evaluate_point(cfg: ExpertChatConfig, store: RunStore, models: dict[str, LoadedModel], judge: LoadedModel,
                   prompts: list[EvalPrompt], point: int | str, tracker: Tracker) -> dict[str, Any]:
    """One evaluation point (:func:`expertchat.stages.evaluation.evaluate`); then, at a round point, the frozen
    judge's pairwise verdicts against the base answers (``evaluation.pairwise``, under ``pairwise``); the judge
    audit (``evaluation.audit``, under ``audit``; :mod:`expertchat.stages.audit`); and lm-evaluation-harness when
    ``evaluation.lm_eval.tasks`` asks for it (its results under ``lm_eval`` in the summary)."""
    summary = evaluate(models, judge, prompts, cfg, store, point, tracker)
    if cfg.evaluation.pairwise.enabled and point != "base":
        summary["pairwise"] = audit.pairwise_vs_base(cfg, store, judge, int(point))
    if cfg.evaluation.audit.enabled:
        anchor = judge.name if cfg.evaluation.judge is not None else f"{judge.name} (the judge's base)"
        summary["audit"] = audit.audit_point(cfg, store, models, point, anchor)
    audit.track(tracker, summary, 0 if point == "base" else int(point) + 1)
    if cfg.evaluation.lm_eval.tasks:
        summary["lm_eval"] = run_lm_eval(cfg, store, point, models)
    return summary


def stage(run: Run, r: int | str) -> dict[str, Any]:
    """The evaluation stage: each role's current policy answers the held-out prompts; the frozen judge scores them
    -> ``eval.jsonl``. ``r``: ``"base"`` (before round 0) or the round just trained."""
    if not run.cfg.evaluation.enabled:
        return {"skipped": "evaluation.enabled=false"}
    later = [t for t in range(int(r) + 1, run.cfg.rounds) if run.store.done(t, "training")] if r != "base" else []
    if later:  # a folder from before the evaluation stage: the policy of round r is gone from memory
        return {"skipped": f"round {later[-1]} is trained already: evaluate round {r} with mode=eval"}
    return evaluate_point(run.cfg, run.store, run.models, run.eval_judge(), run.eval_prompts, r, run.tracker)
