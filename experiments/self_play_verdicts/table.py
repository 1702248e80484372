"""The tables and the figure of experiments/self_play_verdicts from the seeds' run folders.

    python experiments/self_play_verdicts/table.py OUT/seed1 OUT/seed2 [--plot verdicts.png]

Per seed, from each evaluation point's marker (``stages/round_<r>.evaluation.json``): the paired reward change vs
the base (pointwise, the frozen judge), the pairwise win rate against the base answers (both orders), the preference
(the judge's probability, both orders averaged), the length-controlled win rate, and the judge audit. Pooled over
seeds, from the rows (``eval.jsonl``, ``pairwise.jsonl``): each prompt's reward change and pairwise outcome averaged
over the seeds, then a 95% BCa bootstrap over the 80 prompts (the prompt is the unit: the seeds share them); the
pooled length-controlled win rate is fitted on every (prompt, seed) pair.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from expertchat.runs.reader import ci, table
from expertchat.stats import bootstrap_ci, length_controlled_win_rate

ROLES = ("actor", "judge")


def rows(run: Path, name: str) -> list[dict]:
    path = run / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def marker(run: Path, point: int) -> dict:
    return json.loads((run / "stages" / f"round_{point}.evaluation.json").read_text())


def points(run: Path) -> list[int]:
    """The evaluated rounds (a round left unevaluated keeps a ``skipped`` marker)."""
    return sorted(int(p.name.split(".")[0].split("_")[1]) for p in (run / "stages").glob("round_*.evaluation.json")
                  if "models" in json.loads(p.read_text()))


def pooled(runs: list[Path], point: int, role: str) -> dict:
    """Reward change and pairwise outcome per prompt, averaged over the seeds; BCa CIs over prompts."""
    delta, outcome, soft, pairs = defaultdict(list), defaultdict(list), defaultdict(list), []
    for run in runs:
        ev = rows(run, "eval.jsonl")
        base = {r["prompt_id"]: r["reward"] for r in ev if r["round"] == "base" and r["role"] == role}
        for r in ev:
            if r["round"] == point and r["role"] == role and r["reward"] is not None and base.get(r["prompt_id"]) \
                    is not None:
                delta[r["prompt_id"]].append(r["reward"] - base[r["prompt_id"]])
        for r in rows(run, "pairwise.jsonl"):
            if r["round"] == point and r["role"] == role:
                outcome[r["prompt_id"]].append(r["outcome"])
                soft[r["prompt_id"]].append((r["p_x_first"] + r["p_x_second"]) / 2)
                pairs.append(r)
    d = [sum(v) / len(v) for v in delta.values()]
    o = [sum(v) / len(v) for v in outcome.values()]
    pref = [sum(v) / len(v) for v in soft.values()]
    lc, lc_ci = length_controlled_win_rate([(r["p_x_first"] + r["p_x_second"]) / 2 for r in pairs],
                                           [r["x_tokens"] - r["y_tokens"] for r in pairs], 1000, 0)
    return {"delta": (sum(d) / len(d) if d else None, bootstrap_ci(d, 2000, 0)),
            "win_rate": (sum(o) / len(o) if o else None, bootstrap_ci(o, 2000, 0)), "lc": (lc, lc_ci),
            "preference": (sum(pref) / len(pref) if pref else None, bootstrap_ci(pref, 2000, 0)),
            "prompts": len(d), "pairs": len(pairs)}


def verdict_tables(runs: list[Path]) -> list[str]:
    out = []
    for point in points(runs[0]):
        for role in ROLES:
            for run in runs:
                m, p = marker(run, point)["models"][role], marker(run, point).get("pairwise", {}).get(role)
                d = m["delta_vs_base"]
                out.append([point, role, run.name, ci(d["mean"], d["ci"]), f"{m['win']}/{m['tie']}/{m['loss']}",
                            f"x{m['length_ratio']:.2f}", ci(p["win_rate"], p["win_rate_ci"]) if p else "-",
                            f"{p['win']}/{p['tie']}/{p['loss']}" if p else "-",
                            ci(p["preference"], p["preference_ci"]) if p else "-",
                            ci(p["lc_win_rate"], p["lc_win_rate_ci"]) if p else "-",
                            f"{p['consistency']['value']:.2f}" if p else "-"])
            if len(runs) > 1:
                pool = pooled(runs, point, role)
                out.append([point, role, f"**pooled** ({pool['prompts']} prompts)", ci(*pool["delta"]), "", "",
                            ci(*pool["win_rate"]), "", ci(*pool["preference"]), ci(*pool["lc"]), ""])
    return table(["round", "model", "seed", "reward change vs base (pointwise)", "W/T/L (reward)", "length",
                  "pairwise win rate vs base", "W/T/L (pairwise)", "preference (both orders averaged)",
                  "length-controlled win rate",
                  "position-consistent"], out)


def audit_tables(runs: list[Path]) -> list[str]:
    out, both = [], []
    for point in ["base", *points(runs[0])]:
        for run in runs:
            name = "base" if point == "base" else f"round_{point}"
            a = json.loads((run / "stages" / f"{name}.evaluation.json").read_text()).get("audit")
            if not a:
                continue
            for rater in ROLES:
                pos, verb = a["position"][rater], a["verbosity"][rater]
                infl = (a.get("inflation") or {}).get(rater)
                anchor = a["agreement"]["anchor"].get(rater) or {}
                flat = [f"{n} ({f['sd']:.2f})" for n, f in a["flat"][rater].items() if f["flat"]]
                out.append([point, rater, run.name, ci(pos["consistency"]["value"], pos["consistency"]["ci"], 2),
                            ci(pos["first_chosen"]["value"], pos["first_chosen"]["ci"], 2),
                            ci(verb["value"], verb["ci"], 2), ci(infl["delta"], infl["ci"], 2) if infl else "-",
                            ci(anchor.get("rho"), anchor.get("ci"), 2), ", ".join(flat) or "none"])
            sp, mu = a["self_preference"], a["agreement"]["mutual"]
            both.append([point, run.name, ci(sp["index"], sp["ci"], 2), ci(mu["rho"], mu["ci"], 2)])
    return table(["point", "judge", "seed", "position-consistent", "chose first", "prefers longer",
                  "inflation (base answers)", "rho with the anchor", "flat categories (sd)"], out) + [""] + table(
        ["point", "seed", "self-preference (score points)", "mutual rho"], both)


def plot(runs: list[Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    rounds = points(runs[0])
    for k, role in enumerate(ROLES):
        pools = [pooled(runs, r, role) for r in rounds]
        x = [r + 1 + (k - 0.5) * 0.12 for r in rounds]
        for ax, key, title in ((axes[0], "delta", "reward change vs base (frozen judge)"),
                               (axes[1], "preference", "pairwise preference vs base"),
                               (axes[2], "lc", "length-controlled win rate")):
            means = [p[key][0] for p in pools]
            lo = [m - (p[key][1] or (m, m))[0] for m, p in zip(means, pools)]
            hi = [(p[key][1] or (m, m))[1] - m for m, p in zip(means, pools)]
            ax.errorbar(x, means, yerr=[lo, hi], marker="o", capsize=3, label=f"{role} (pooled, 95% CI)")
            ax.axhline(0.0 if key == "delta" else 0.5, color="grey", lw=0.8, ls="--")
            ax.set_title(title)
            ax.set_xlabel("rounds of self-play")
            ax.set_xticks([r + 1 for r in rounds])
    axes[0].legend()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    print("\n".join(verdict_tables(args.runs) + [""] + audit_tables(args.runs)))
    if args.plot:
        plot(args.runs, args.plot)
        print(f"\nfigure: {args.plot}")


if __name__ == "__main__":
    main()
