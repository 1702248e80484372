"""The report's "Pairwise verdicts" and "Judge audit" sections, from the evaluation summaries
(``stages/<point>.evaluation.json``: ``pairwise`` and ``audit``, written by ``expertchat/stages/audit.py``) and the
training ratings (``ratings.jsonl``: flat categories per round and rater)."""

from __future__ import annotations

from typing import Any

from expertchat.audit import category_scores, flat_categories
from expertchat.runs.reader import RunData, ci, table
from expertchat.stats import fmt

FLAT_SD = 0.25  # as evaluation.audit.flat_sd's default, for folders whose config does not say


def detectable(x: float | None) -> str:
    """A win-rate change the pairs can show, or that they can show none (a change beyond 0.5 is impossible)."""
    return "n/a" if x is None else f"+-{x:.2f}" if x < 0.5 else "none (too few pairs)"


def pairwise_section(data: RunData) -> list[str]:
    """Each round's answers against the base answers, judged pairwise in both orders by the frozen judge."""
    rows = [[e.get("round"), role, p["n"], f"{p['win']}/{p['tie']}/{p['loss']}", ci(p["win_rate"], p["win_rate_ci"]),
             ci(p.get("preference"), p.get("preference_ci")), ci(p["lc_win_rate"], p["lc_win_rate_ci"]),
             ci(p["consistency"]["value"], p["consistency"]["ci"], 2), detectable(p["detectable"])]
            for e in data.evals for role, p in (e.get("pairwise") or {}).items()]
    if not rows:
        return []
    return ["", "## Pairwise verdicts", "",
            f"The frozen judge ({data.evals[-1].get('judge')}) compares each round's answer with the base answer to "
            "the same prompt, in both orders, from the probabilities of its two choice letters; a pair whose two "
            "verdicts disagree is a tie (MT-Bench). Win rate = (wins + ties / 2) / pairs (95% BCa CI); *preference*: "
            "the judge's probability that the round's answer is better, both orders averaged (AlpacaEval 2's "
            "probability-weighted win rate); length-controlled: AlpacaEval 2's logistic model of that preference with "
            "the length difference as a covariate, predicted at equal lengths (95% bootstrap CI); *detectable*: the "
            "smallest win-rate change these pairs show at 80% power.", ""] + table(
        ["point", "model", "pairs", "W/T/L", "win rate", "preference", "length-controlled", "position-consistent",
         "detectable"], rows)


def audit_section(data: RunData) -> list[str]:
    """The judge audit at every evaluation point, and the flat categories of the training ratings."""
    if data.mode == "rate" or not (data.evals or data.ratings):
        return []
    audits = [(e.get("round"), e["audit"]) for e in data.evals if e.get("audit")]
    out = ["", "## Judge audit", ""]
    if not audits:
        return out + ["Not audited in this folder (no evaluation, evaluation.audit.enabled=false, or a run older than "
                      "the audit): delete its `stages/*.evaluation.json` and `eval.jsonl`, then `python -m expertchat "
                      f"mode=eval evaluation.run={data.root}` evaluates and audits every point."] + _flat_training(data)
    out += ["Each training judge (each role's policy at that point: the judge of the next round's dialogues) rates "
            "both roles' held-out answers and compares them pairwise in both orders (`audit.jsonl`; statistics in "
            "`expertchat/audit.py`). *Position-consistent*: pairs judged the same in both orders; *first*: "
            "single verdicts that chose the answer shown first (0.5: no slot preference); *longer*: consistent "
            "verdicts that chose the longer answer; *inflation*: its score of the fixed base answers now minus at "
            f"the base (1-10 scale); *anchor rho*: Spearman with the anchor judge ({audits[-1][1]['anchor']}); *flat*: "
            "categories whose scores' standard deviation is below the threshold. 95% bootstrap CIs.", ""]
    rows = []
    for point, a in audits:
        for rater in a["position"]:
            pos, verb = a["position"][rater], a["verbosity"][rater]
            infl = (a.get("inflation") or {}).get(rater)
            anchor = a["agreement"]["anchor"].get(rater) or {}
            flat = [f"{n} (sd {fmt(f['sd'], 2)})" for n, f in a["flat"][rater].items() if f["flat"]]
            rows.append([point, rater, ci(pos["consistency"]["value"], pos["consistency"]["ci"], 2),
                         ci(pos["first_chosen"]["value"], pos["first_chosen"]["ci"], 2),
                         ci(verb["value"], verb["ci"], 2) + f" (n={verb['n']})",
                         ci(infl["delta"], infl["ci"], 2) if infl else "-",
                         ci(anchor.get("rho"), anchor.get("ci"), 2), ", ".join(flat) or "none"])
    out += table(["point", "judge", "position-consistent", "first", "longer", "inflation", "anchor rho", "flat"],
                 rows)
    both = [[point, ci(a["self_preference"]["index"], a["self_preference"]["ci"], 2),
             ", ".join(f"{r} {fmt(g, 2)}" for r, g in a["self_preference"]["gap"].items()),
             ci(a["agreement"]["mutual"]["rho"], a["agreement"]["mutual"]["ci"], 2), a["self_preference"]["n"]]
            for point, a in audits]
    out += ["", "Between the two judges: *self-preference* = how much more each prefers its own answer than its "
            "partner prefers it (score points; the answers' quality cancels; 0: none), beside each one's raw gap "
            "own minus partner; *mutual rho*: Spearman between their scores of the same answers.", ""]
    return out + table(["point", "self-preference", "own - partner", "mutual rho", "prompts"], both) + \
        _flat_training(data)


def _flat_training(data: RunData) -> list[str]:
    """Per round and rater: the spread of each category's scores in the training ratings (``ratings.jsonl``)."""
    if not data.ratings:
        return []
    flat_sd = ((data.config or {}).get("evaluation") or {}).get("audit", {}).get("flat_sd", FLAT_SD)
    rows: list[list[Any]] = []
    for rnd in sorted({r.get("round") for r in data.ratings}, key=str):
        for rater in sorted({r.get("rater") for r in data.ratings if r.get("round") == rnd}, key=str):
            rs = [r for r in data.ratings if r.get("round") == rnd and r.get("rater") == rater]
            for name, f in flat_categories(category_scores(rs), flat_sd, resamples=500).items():
                rows.append([rnd, rater, name, f["n"], ci(f["sd"], f["sd_ci"], 2), f"{f['modal_share']:.0%}"
                             if f["modal_share"] is not None else "n/a", "FLAT: no signal" if f["flat"] else ""])
    return ["", f"Spread of the training ratings per category (`ratings.jsonl`; flat below sd {flat_sd}):", ""] + \
        table(["round", "rater", "category", "turns", "sd [95% CI]", "at its most common score", ""], rows)
