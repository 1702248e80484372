"""The judge audit's statistics: the failure modes of LLM judges, measured on what the training judges said.

Every judge in the loop is also a student: each model rates the other and both train on those ratings. The
literature on LLM judges names what to measure (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and
Chatbot Arena", section 3.3: position, verbosity and self-enhancement bias; Dubois et al. 2024 on length; Li et al.
2025, "Preference Leakage", on related judge and student). Here each figure is computed from the rows the audit
stage (``expertchat/stages/audit.py``) writes to ``audit.jsonl``, each with a 95% bootstrap CI:

* position consistency: the share of pairs whose verdict is the same in both orders (1 = no position bias), and
  the share of single verdicts that chose the answer shown first (0.5 = no preference for a slot);
* verbosity: P(prefer longer), among consistent verdicts on answers of different lengths;
* self-preference: how much more a model favours its own answers than its partner favours them, which cancels the
  answers' true quality (both judges rate the same two answers);
* mutual agreement: Spearman's rank correlation of the two judges' scores of the same answers; agreement with an
  anchor judge (``evaluation.judge``) likewise;
* inflation: a judge's scores of FIXED content (the base answers) now minus at the base point;
* flat categories: a rubric category whose scores barely vary carries no signal (its standard deviation, the
  share at its most common whole score).

Every function is pure (rows in, numbers out); ``tests/test_audit.py`` checks each on crafted rows.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from expertchat.stats import bootstrap_ci, rank_correlation

Row = dict[str, Any]


def _share(flags: Sequence[bool], resamples: int, seed: int) -> dict[str, Any]:
    values = [float(f) for f in flags]
    return {"n": len(values), "value": round(sum(values) / len(values), 4) if values else None,
            "ci": bootstrap_ci(values, resamples, seed)}


def position(verdicts: Sequence[Row], resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Position bias of pairwise verdicts (rows with ``p_x_first``, ``p_x_second``: P(x better) with x shown first,
    second): ``consistency`` (share of pairs judged the same in both orders) and ``first_chosen`` (share of the
    2 x N single verdicts that chose the answer shown first; an exactly even verdict counts half)."""
    consistent = [(v["p_x_first"] - 0.5) * (v["p_x_second"] - 0.5) > 0 for v in verdicts]
    firsts = [x for v in verdicts for x in (_side(v["p_x_first"]), _side(1.0 - v["p_x_second"]))]
    return {"consistency": _share(consistent, resamples, seed),
            "first_chosen": {"n": len(firsts), "value": round(float(np.mean(firsts)), 4) if firsts else None,
                             "ci": bootstrap_ci(firsts, resamples, seed)}}


def _side(p_first: float) -> float:
    """1 when a single verdict chose the answer shown first, 0 the second, 0.5 exactly even."""
    return 0.5 if p_first == 0.5 else float(p_first > 0.5)


def verbosity(verdicts: Sequence[Row], resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """P(prefer longer): among consistent verdicts on answers of different lengths (``x_tokens``, ``y_tokens``),
    the share whose winner is the longer answer (0.5 = no length preference; it also moves with any real quality
    difference that goes with length, so read it beside the length-controlled win rate)."""
    flags = []
    for v in verdicts:
        consistent = (v["p_x_first"] - 0.5) * (v["p_x_second"] - 0.5) > 0
        if consistent and v["x_tokens"] != v["y_tokens"]:
            flags.append((v["p_x_first"] > 0.5) == (v["x_tokens"] > v["y_tokens"]))
    return _share(flags, resamples, seed)


def _scores(rows: Sequence[Row], content: Any) -> dict[tuple[str, str, Any, int], float]:
    """``(rater, author, prompt_id, sample) -> score`` of the rating rows on ``content`` (a point)."""
    return {(r["rater"], r["author"], r["prompt_id"], r["sample"]): r["score"] for r in rows
            if r["content"] == content and r["score"] is not None}


def self_preference(rows: Sequence[Row], content: Any, roles: tuple[str, str] = ("actor", "judge"),
                    resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Self-preference on the answers of ``content``: with ``s_r(a)`` rater r's score of author a's answer to a
    prompt, ``gap[r]`` = mean of ``s_r(r) - s_r(partner)`` (how much r prefers its own answers) and the
    ``index`` = mean over prompts of ``((s_a(a) - s_a(b)) - (s_b(a) - s_b(b))) / 2``: how much more each judge
    prefers its own answer than its partner prefers it. The answers' true quality cancels in the index (both
    judges rate both answers), so 0 means no self-preference; on the 1-10 score scale."""
    a, b = roles
    s = _scores(rows, content)
    keys = sorted({k[2:] for k in s}, key=str)
    full = [k for k in keys if all((r, w, *k) in s for r in roles for w in roles)]
    idx = [((s[(a, a, *k)] - s[(a, b, *k)]) - (s[(b, a, *k)] - s[(b, b, *k)])) / 2 for k in full]
    gap = {r: _mean([s[(r, r, *k)] - s[(r, o, *k)] for k in full]) for r, o in ((a, b), (b, a))}
    return {"n": len(full), "gap": gap, "index": _mean(idx), "ci": bootstrap_ci(idx, resamples, seed)}


def agreement(rows: Sequence[Row], content: Any, anchor: dict[tuple[str, Any, int], float] | None = None,
              roles: tuple[str, str] = ("actor", "judge"), resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Rank agreement on the answers of ``content``: ``mutual`` = Spearman's rho between the two raters' scores of
    the same answers; ``anchor[r]`` = rho between rater r's scores and ``anchor`` (``(author, prompt_id, sample)
    -> score``, e.g. the frozen evaluation judge's), each ``{"n", "rho", "ci"}``."""
    s = _scores(rows, content)
    items = sorted({k[1:] for k in s}, key=str)
    both = [k for k in items if all((r, *k) in s for r in roles)]
    rho, ci = rank_correlation([s[(roles[0], *k)] for k in both], [s[(roles[1], *k)] for k in both], resamples, seed)
    out: dict[str, Any] = {"mutual": {"n": len(both), "rho": rho, "ci": ci}, "anchor": {}}
    for r in roles if anchor else ():
        common = [k for k in items if (r, *k) in s and k in anchor]
        rho, ci = rank_correlation([s[(r, *k)] for k in common], [anchor[k] for k in common], resamples, seed)
        out["anchor"][r] = {"n": len(common), "rho": rho, "ci": ci}
    return out


def inflation(now: Sequence[Row], before: Sequence[Row], content: Any = "base", resamples: int = 1000,
              seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per rater: the mean paired change of its scores of the same answers (``content``, the base answers) from
    the rows ``before`` (the base point's audit) to ``now`` (a later point's): score drift at fixed content."""
    s0, s1 = _scores(before, content), _scores(now, content)
    out = {}
    for rater in sorted({k[0] for k in s1}):
        deltas = [v - s0[k] for k, v in s1.items() if k[0] == rater and k in s0]
        out[rater] = {"n": len(deltas), "delta": _mean(deltas), "ci": bootstrap_ci(deltas, resamples, seed)}
    return out


def flat_categories(scores: dict[str, Sequence[float]], flat_sd: float = 0.25, resamples: int = 1000,
                    seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per rubric category: the standard deviation of its scores (1-10 scale) with a 95% percentile bootstrap CI,
    the share at its most common whole score, and ``flat`` = sd below ``flat_sd`` (the category carries no
    signal: its weight only shifts every reward by the same amount)."""
    from scipy.stats import bootstrap

    out = {}
    for name, values in scores.items():
        v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
        if len(v) < 2:
            out[name] = {"n": len(v), "sd": None, "sd_ci": None, "modal_share": None, "flat": None}
            continue
        sd = float(v.std(ddof=1))
        ci = None
        if resamples > 0 and sd > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = bootstrap((v,), lambda x, axis: np.std(x, ddof=1, axis=axis), n_resamples=resamples,
                                method="percentile", rng=np.random.default_rng(seed))
            ci = (round(float(res.confidence_interval.low), 4), round(float(res.confidence_interval.high), 4))
        modal = Counter(np.rint(v).astype(int).tolist()).most_common(1)[0][1] / len(v)
        out[name] = {"n": len(v), "sd": round(sd, 4), "sd_ci": ci, "modal_share": round(modal, 4),
                     "flat": sd < flat_sd}
    return out


def category_scores(rows: Sequence[Row], key: str = "categories") -> dict[str, list[float]]:
    """``category -> [scores]`` from rating rows whose ``key`` holds ``{category: {"score": x}}`` (``ratings.jsonl``)
    or ``{category: x}`` (``audit.jsonl``'s ``scores``)."""
    out: dict[str, list[float]] = {}
    for r in rows:
        for name, c in (r.get(key) or {}).items():
            value = c.get("score") if isinstance(c, dict) else c
            if value is not None:
                out.setdefault(name, []).append(float(value))
    return out


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 5) if len(values) else None
