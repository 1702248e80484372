"""Pairwise verdicts and the judge audit, run at every evaluation point after the answers are scored.

    eval.jsonl (this point's and the base point's answers)
        --(the FROZEN evaluation judge: round answer vs base answer, both orders)--> pairwise.jsonl
             -> per role: win rate, preference, length-controlled win rate, position consistency
                (``summary["pairwise"]``)
        --(each TRAINING judge, i.e. each role's policy at this point: scores of both roles' answers, now and at
           the base; pairwise verdicts on the actor's vs the judge's answer, both orders)--> audit.jsonl
             -> position consistency, P(prefer longer), self-preference, mutual and anchor agreement, inflation,
                flat categories (``summary["audit"]``; the statistics: ``expertchat/audit.py``)

The training judges at point r are the models that rate round r + 1's dialogues (at the base: round 0's). The
anchor is the evaluation's frozen judge (``evaluation.judge``, else the judge role's base). Rows are keyed by
``(prompt_id, sample)`` as in ``eval.jsonl``; a verdict ``outcome`` is 1 (x better in both orders), 0 (y better
in both) or 0.5 (the orders disagree: a tie, as MT-Bench counts it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from expertchat import audit as stats_audit
from expertchat.judging.judge import Judge, RatingItem
from expertchat.judging.pairwise import PairVerdict, PairwiseJudge
from expertchat.report.audit import detectable
from expertchat.stages.dialogue import ROLES
from expertchat.stats import bootstrap_ci, detectable_effect, fmt, length_controlled_win_rate

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.config.schema import ExpertChatConfig
    from expertchat.engine.models import LoadedModel
    from expertchat.report.tracking import Tracker
    from expertchat.runs.store import RunStore

PAIRWISE_FILE = "pairwise.jsonl"
AUDIT_FILE = "audit.jsonl"
LC_RESAMPLES = 1000  # each resample refits the length-controlled GLM (~4 ms): more buys nothing at this n


def _answers(store: RunStore, point: int | str, role: str) -> dict[tuple[Any, int], dict[str, Any]]:
    return {(r["prompt_id"], r["sample"]): r for r in store.read("eval.jsonl", round=point, role=role)}


def _verdict_row(v: PairVerdict) -> dict[str, Any]:
    return {"p_x_first": round(v.p_x_first, 5), "p_x_second": round(v.p_x_second, 5), "outcome": v.outcome,
            "consistent": v.consistent}


# ------------------------------------------------------------------------------------ pairwise vs the base


def pairwise_vs_base(cfg: ExpertChatConfig, store: RunStore, judge_lm: LoadedModel, point: int) -> dict[str, Any]:
    """The frozen judge's verdicts on each role's round-``point`` answer (x) against its base answer (y) to the same
    prompt and sample, both orders; rows appended to ``pairwise.jsonl``. Returns ``{role: figures}``."""
    ev = cfg.evaluation
    judge = PairwiseJudge(judge_lm, ev.pairwise, cfg.judging.batch_size, cfg.judging.max_answer_tokens)
    out = {}
    for role in ROLES:
        now, base = _answers(store, point, role), _answers(store, "base", role)
        keys = [k for k in now if k in base]
        verdicts = judge.compare([(now[k]["prompt"], now[k]["answer"], base[k]["answer"]) for k in keys],
                                 cfg.progress, f"evaluation {point}: {role} vs base, both orders")
        rows = [{"round": point, "role": role, "judge": judge_lm.name, "prompt_id": k[0], "sample": k[1],
                 "x": f"round {point}", "y": "base", **_verdict_row(v), "x_tokens": now[k]["tokens"],
                 "y_tokens": base[k]["tokens"]} for k, v in zip(keys, verdicts)]
        for row in rows:
            store.append(PAIRWISE_FILE, row)
        out[role] = pairwise_figures(rows, ev.bootstrap, ev.seed)
    return out


def pairwise_figures(rows: list[dict[str, Any]], resamples: int, seed: int) -> dict[str, Any]:
    """Win / tie / loss of x and its win rate ``(wins + ties / 2) / n`` (MT-Bench: a verdict counts only when both
    orders agree); the *preference*, the judge's probability that x is better with the two orders averaged
    (AlpacaEval 2's probability-weighted win rate: it keeps the signal of a judge too slot-biased to be consistent);
    the length-controlled win rate (:func:`~expertchat.stats.length_controlled_win_rate` on that preference, as
    AlpacaEval 2 fits it); the judge's position consistency; and the smallest win-rate change the n pairs can show
    (80% power, 5% two-sided). Rates with 95% CIs (BCa; bootstrap refits for the length-controlled one)."""
    outcomes = [r["outcome"] for r in rows]
    soft = [(r["p_x_first"] + r["p_x_second"]) / 2 for r in rows]
    n = len(outcomes)
    lc, lc_ci = length_controlled_win_rate(soft, [r["x_tokens"] - r["y_tokens"] for r in rows],
                                           min(resamples, LC_RESAMPLES), seed)
    return {"n": n, "win": outcomes.count(1.0), "tie": outcomes.count(0.5), "loss": outcomes.count(0.0),
            "win_rate": round(sum(outcomes) / n, 4) if n else None,
            "win_rate_ci": bootstrap_ci(outcomes, resamples, seed),
            "preference": round(sum(soft) / n, 4) if n else None, "preference_ci": bootstrap_ci(soft, resamples, seed),
            "lc_win_rate": lc, "lc_win_rate_ci": lc_ci,
            "consistency": stats_audit.position(rows, resamples, seed)["consistency"],
            "detectable": detectable_effect(0.5, n)}  # a win rate's sd is at most 0.5


# ------------------------------------------------------------------------------------------ the audit


Answers = dict[tuple[int | str, str], dict[tuple[Any, int], dict[str, Any]]]  # (point, role) -> eval.jsonl rows


def _rate(judge: Judge, rater: str, lm: LoadedModel, found: Answers, point: int | str, content: int | str,
          progress: bool) -> list[dict[str, Any]]:
    """Rater ``rater``'s scores (training rubric, no WIM) of both roles' answers of point ``content``."""
    answers = [(author, r) for author in ROLES for r in found[(content, author)].values()]
    judgements = judge.rate([RatingItem(r["prompt"], r["answer"]) for _, r in answers], wim=False,
                            progress=progress, desc=f"audit {point}: {rater} rates the {content} answers")
    return [{"round": point, "kind": "rating", "rater": rater, "rater_model": lm.name, "content": content,
             "author": author, "prompt_id": r["prompt_id"], "sample": r["sample"],
             "score": None if j.score is None else round(j.score, 5),
             "scores": {n: None if c.score is None else round(c.score, 5) for n, c in j.categories.items()}}
            for (author, r), j in zip(answers, judgements)]


def _compare(cfg: ExpertChatConfig, rater: str, lm: LoadedModel, found: Answers, point: int | str
             ) -> list[dict[str, Any]]:
    """Rater ``rater``'s pairwise verdicts on the actor's (x) vs the judge's (y) answer to each prompt, both orders."""
    actor, judge = found[(point, "actor")], found[(point, "judge")]
    keys = [k for k in actor if k in judge]
    pj = PairwiseJudge(lm, cfg.evaluation.pairwise, cfg.judging.batch_size, cfg.judging.max_answer_tokens)
    verdicts = pj.compare([(actor[k]["prompt"], actor[k]["answer"], judge[k]["answer"]) for k in keys],
                          cfg.progress, f"audit {point}: {rater} compares actor vs judge, both orders")
    return [{"round": point, "kind": "pairwise", "rater": rater, "rater_model": lm.name, "prompt_id": k[0],
             "sample": k[1], "x": "actor", "y": "judge", **_verdict_row(v), "x_tokens": actor[k]["tokens"],
             "y_tokens": judge[k]["tokens"]} for k, v in zip(keys, verdicts)]


def audit_point(cfg: ExpertChatConfig, store: RunStore, models: dict[str, LoadedModel], point: int | str,
                anchor_name: str) -> dict[str, Any]:
    """The judge audit at ``point``: each role's current policy, as a judge, rates both roles' answers of this
    point (and of the base, when ``point`` is a round) and compares the two roles' answers in both orders; rows
    appended to ``audit.jsonl``. Returns the figures (:mod:`expertchat.audit`)."""
    contents = list(dict.fromkeys([point, "base"]))
    found: Answers = {(c, role): {} for c in contents for role in ROLES}
    for r in store.read("eval.jsonl"):  # read once: both roles' answers of this point and of the base
        if (r["round"], r["role"]) in found:
            found[(r["round"], r["role"])][(r["prompt_id"], r["sample"])] = r
    rows = []
    for rater in ROLES:
        judge = Judge(models[rater], cfg.judging)
        for content in contents:
            rows += _rate(judge, rater, models[rater], found, point, content, cfg.progress)
        rows += _compare(cfg, rater, models[rater], found, point)
    for row in rows:
        store.append(AUDIT_FILE, row)
    return audit_figures(cfg, rows, store.read(AUDIT_FILE, round="base") if point != "base" else rows,
                         _anchor(store, point), point, anchor_name)


def _anchor(store: RunStore, point: int | str) -> dict[tuple[str, Any, int], float]:
    return {(r["role"], r["prompt_id"], r["sample"]): r["score"] for r in store.read("eval.jsonl", round=point)
            if r["score"] is not None}


def audit_figures(cfg: ExpertChatConfig, rows: list[dict[str, Any]], base_rows: list[dict[str, Any]],
                  anchor: dict[tuple[str, Any, int], float], point: int | str, anchor_name: str) -> dict[str, Any]:
    """The audit's figures from its rows at ``point`` (and the base point's, for inflation)."""
    ev, b, seed = cfg.evaluation, cfg.evaluation.bootstrap, cfg.evaluation.seed
    ratings = [r for r in rows if r["kind"] == "rating"]
    verdicts = {rater: [r for r in rows if r["kind"] == "pairwise" and r["rater"] == rater] for rater in ROLES}
    base_ratings = [r for r in base_rows if r.get("kind") == "rating"]
    return {
        "anchor": anchor_name,
        "position": {rater: stats_audit.position(v, b, seed) for rater, v in verdicts.items()},
        "verbosity": {rater: stats_audit.verbosity(v, b, seed) for rater, v in verdicts.items()},
        "self_preference": stats_audit.self_preference(ratings, point, ROLES, b, seed),
        "agreement": stats_audit.agreement(ratings, point, anchor, ROLES, b, seed),
        "inflation": (stats_audit.inflation(ratings, base_ratings, "base", b, seed) if point != "base" else None),
        "flat": {rater: stats_audit.flat_categories(stats_audit.category_scores(
            [r for r in ratings if r["rater"] == rater and r["content"] == point], "scores"),
            ev.audit.flat_sd, b, seed) for rater in ROLES},
    }


# ------------------------------------------------------------------------------------------ console


def _ci(c: list[float] | tuple[float, float] | None) -> str:
    return f"[{fmt(c[0])}, {fmt(c[1])}]" if c else "[n/a]"


def describe(s: dict[str, Any]) -> list[str]:
    """The pairwise verdicts and the audit of one evaluation point in short log lines."""
    lines = []
    for role, p in (s.get("pairwise") or {}).items():
        lines.append(f"{role} vs base, pairwise (judge {s.get('judge')}, both orders): win/tie/loss "
                     f"{p['win']}/{p['tie']}/{p['loss']}, win rate {fmt(p['win_rate'])} {_ci(p['win_rate_ci'])}, "
                     f"preference {fmt(p['preference'])} {_ci(p['preference_ci'])}, length-controlled "
                     f"{fmt(p['lc_win_rate'])} {_ci(p['lc_win_rate_ci'])}, position-consistent "
                     f"{fmt(p['consistency']['value'], 2)}; {p['n']} pairs show a win-rate change of "
                     f"{detectable(p['detectable'])}")
    a = s.get("audit")
    if not a:
        return lines
    for rater in ROLES:
        pos, verb = a["position"][rater], a["verbosity"][rater]
        flat = [n for n, f in a["flat"][rater].items() if f["flat"]]
        infl = (a["inflation"] or {}).get(rater)
        lines.append(f"audit, {rater} as judge: position-consistent {fmt(pos['consistency']['value'], 2)} "
                     f"{_ci(pos['consistency']['ci'])}, chose the first answer {fmt(pos['first_chosen']['value'], 2)}, "
                     f"prefers the longer {fmt(verb['value'], 2)} {_ci(verb['ci'])} (n={verb['n']})"
                     + (f", inflation {fmt(infl['delta'])} {_ci(infl['ci'])}" if infl else "")
                     + (f"; FLAT (no signal): {', '.join(flat)}" if flat else ""))
    sp, ag = a["self_preference"], a["agreement"]
    anchors = ", ".join(f"{r} {fmt(x['rho'], 2)} {_ci(x['ci'])}" for r, x in ag["anchor"].items())
    lines.append(f"audit: self-preference {fmt(sp['index'])} {_ci(sp['ci'])} (score points, n={sp['n']}), mutual "
                 f"agreement rho {fmt(ag['mutual']['rho'], 2)} {_ci(ag['mutual']['ci'])}, agreement with the anchor "
                 f"{a['anchor']}: {anchors or 'n/a'}")
    return lines


def track(tracker: Tracker, s: dict[str, Any], step: int) -> None:
    """The point's pairwise and audit headlines as ``pairwise/<role>_*`` and ``audit/*`` at ``eval/step``."""
    metrics: dict[str, Any] = {}
    for role, p in (s.get("pairwise") or {}).items():
        metrics.update({f"pairwise/{role}_win_rate": p["win_rate"], f"pairwise/{role}_lc_win_rate": p["lc_win_rate"],
                        f"pairwise/{role}_preference": p["preference"],
                        f"pairwise/{role}_consistency": p["consistency"]["value"]})
    a = s.get("audit")
    if a:
        for rater in ROLES:
            metrics[f"audit/{rater}_position_consistency"] = a["position"][rater]["consistency"]["value"]
            metrics[f"audit/{rater}_prefer_longer"] = a["verbosity"][rater]["value"]
            metrics[f"audit/{rater}_inflation"] = ((a["inflation"] or {}).get(rater) or {}).get("delta")
            metrics[f"audit/{rater}_anchor_rho"] = (a["agreement"]["anchor"].get(rater) or {}).get("rho")
        metrics["audit/self_preference"] = a["self_preference"]["index"]
        metrics["audit/mutual_rho"] = a["agreement"]["mutual"]["rho"]
    tracker.log({k: v for k, v in metrics.items() if v is not None}, step=step)
