"""The report's figures: PNG files drawn with matplotlib's object API on the Agg canvas (no pyplot, no display).

Each function takes plain numbers, writes one PNG and returns its path, or ``None`` when there is nothing to draw
(the report then says so instead of drawing an empty frame). Error bars are the 95% CIs the evaluation stage wrote
(bootstrap, ``scipy.stats.bootstrap``), or, where the figure says so, the standard error of a mean.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertchat.runs.reader import groups

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.runs.reader import RunData

DPI = 110
PLOTS_DIR = "plots"  # in the run folder
_TRAIN_PANELS = (("loss", "DPO loss"), ("rewards/margins", "reward margin (chosen - rejected, x beta)"),
                 ("objective/kl", "KL(policy || reference), TRL's estimate"), ("objective/scores", "judge's reward of the samples"))


def _figure(ncols: int = 1, nrows: int = 1, width: float = 6.4, height: float = 4.0) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # the run folder's temporary name (store.py)
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def _ci_err(mean: float, ci: Sequence[float] | None) -> tuple[float, float]:
    """(below, above) error-bar lengths of a CI around ``mean``; zero when there is no CI.

    >>> _ci_err(0.5, [0.25, 1.0])
    (0.25, 0.5)
    """
    if not ci or ci[0] is None or ci[1] is None:
        return 0.0, 0.0
    return max(mean - ci[0], 0.0), max(ci[1] - mean, 0.0)


def eval_reward(evals: list[dict[str, Any]], path: Path) -> Path | None:
    """Held-out reward per evaluation point and model with 95% CI bars (left) and the paired change vs the base
    models with its 95% CI (right). ``evals``: evaluation summaries (contract A), in order."""
    if not evals:
        return None
    labels = [str(e.get("round")) for e in evals]
    roles = sorted({role for e in evals for role in e.get("models", {})})
    fig, axes = _figure(2)
    for k, role in enumerate(roles):
        shift = (k - (len(roles) - 1) / 2) * 0.08
        for ax, key, ci_key in ((axes[0][0], "reward_mean", "reward_ci"), (axes[0][1], "delta_vs_base", None)):
            xs, ys, err = [], [], [[], []]
            for i, e in enumerate(evals):
                m = e.get("models", {}).get(role) or {}
                value, ci = (m.get(key), m.get(ci_key)) if ci_key else ((m.get(key) or {}).get("mean"),
                                                                      (m.get(key) or {}).get("ci"))
                if value is None:
                    continue
                lo, hi = _ci_err(value, ci)
                xs.append(i + shift), ys.append(value), err[0].append(lo), err[1].append(hi)
            ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=4, label=role)
    axes[0][1].axhline(0.0, color="grey", lw=0.8, ls="--")
    for ax, title in zip(axes[0], ("held-out reward (95% CI)", "change vs base, paired (95% CI)")):
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xticks(range(len(labels)), [f"round {x}" if x != "base" else "base" for x in labels])
        ax.set_title(title)
        ax.set_xlabel("evaluation point (after round r's training)")
        ax.set_ylabel("reward")
        ax.legend(title="model")
    judge = evals[-1].get("judge")
    fig.suptitle(f"Held-out evaluation, frozen judge {judge}" if judge else "Held-out evaluation")
    return _save(fig, path)


def category_distributions(by_group: dict[str, dict[str, list[float]]], path: Path, title: str) -> Path | None:
    """One panel per rubric category: the distribution of its 1-10 scores per group (a box per group, e.g.
    ``round 0 actor``), the mean marked by a triangle."""
    cats = sorted({c for per_cat in by_group.values() for c, v in per_cat.items() if v})
    if not cats:
        return None
    names = [g for g in by_group if any(by_group[g].get(c) for c in cats)]
    fig, axes = _figure(len(cats), width=max(3.2, 0.9 * len(names) + 1.5), height=4.2)
    for ax, cat in zip(axes[0], cats):
        data = [by_group[g].get(cat) or [math.nan] for g in names]
        ax.boxplot(data, tick_labels=names, showmeans=True)
        ax.set_title(cat)
        ax.set_ylabel("score (1-10)")
        ax.set_ylim(0.5, 10.5)
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(title)
    return _save(fig, path)


def similarity_vs_score(panels: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> Path | None:
    """Scatter of the weighted rubric score (x) against the cosine similarity of the answer with its WIM critique
    (y): one panel per source (``panels``: title -> group -> points), one colour per group (model)."""
    panels = {t: p for t, p in panels.items() if any(p.values())}
    if not panels:
        return None
    fig, axes = _figure(len(panels), width=5.2)
    for ax, (title, points) in zip(axes[0], panels.items()):
        for name, xy in points.items():
            if xy:
                ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=18, alpha=0.6, label=f"{name} (n={len(xy)})")
        ax.set_xlabel("weighted score (1-10)")
        ax.set_ylabel("similarity of the answer to its WIM (cosine)")
        ax.set_title(title)
        ax.legend()
    fig.suptitle("WIM similarity vs score")
    return _save(fig, path)


def length_per_round(series: dict[str, dict[str, list[float]]], path: Path, title: str) -> Path | None:
    """Mean answer length in tokens per round (x: ``series[name]``'s keys, in order) with the standard error of
    the mean as bars, one line per ``name``."""
    if not any(any(v) for s in series.values() for v in s.values()):
        return None
    xs = sorted(dict.fromkeys(x for s in series.values() for x in s),
                key=lambda x: (x != "base", int(x.split()[-1]) if x.split()[-1].isdigit() else 0, x))
    fig, axes = _figure()
    ax = axes[0][0]
    for name, s in series.items():
        pts = [(xs.index(x), sum(v) / len(v), _sem(v)) for x, v in s.items() if v]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-", capsize=4,
                    label=name)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_ylabel("new tokens per answer (mean +- s.e.)")
    ax.set_xlabel("round (held-out: the base models, then after round r's training)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def _sem(values: list[float]) -> float:
    """Standard error of the mean (0 for fewer than 2 values).

    >>> round(_sem([1.0, 2.0, 3.0]), 4)
    0.5774
    """
    n = len(values)
    if n < 2:
        return 0.0
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def training_curves(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """DPO loss, reward margin, KL and the judge's reward of the samples over optimizer steps, one line per
    role; rounds follow each other on the x-axis (dashed lines between them). ``rows``: train_metrics.jsonl."""
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    last = {}  # the last step of each round (over roles): where the next round starts
    for r in rows:
        last[r["round"]] = max(last.get(r["round"], 0), int(r.get("step", 0)))
    offset, start = {}, 0
    for rnd in sorted(last):
        offset[rnd], start = start, start + last[rnd]
    fig, axes = _figure(2, 2, width=5.2, height=3.4)
    for ax, (key, label) in zip([a for row in axes for a in row], _TRAIN_PANELS):
        for k, role in enumerate(sorted({r["role"] for r in rows})):
            for rnd in sorted(offset):  # one line per round: a new round starts from a new reference
                pts = [(offset[rnd] + r["step"], r[key]) for r in rows if r["role"] == role and r["round"] == rnd
                       and key in r]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) < 30 else "-", ms=3,
                            color=f"C{k}", label=role if rnd == min(offset) else None)
        for rnd in sorted(offset)[1:]:
            ax.axvline(offset[rnd] + 0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(label)
        ax.set_xlabel("optimizer step (rounds in sequence)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
    fig.suptitle("Online DPO training")
    return _save(fig, path)


def sweep_deltas(jobs: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """One group of points per sweep job (x: its swept overrides) with each model's value and 95% CI bar;
    ``jobs``: ``{"label", "models": {role: {"mean", "ci"}}}`` (jobs without a number are left out of the plot and
    marked ``no result`` under the axis)."""
    roles = sorted({role for j in jobs for role in j.get("models", {})})
    if not roles:
        return None
    fig, axes = _figure(width=max(6.4, 1.6 * len(jobs) + 2))
    ax = axes[0][0]
    for k, role in enumerate(roles):
        shift = (k - (len(roles) - 1) / 2) * 0.12
        pts = [(i + shift, m["mean"], _ci_err(m["mean"], m.get("ci"))) for i, j in enumerate(jobs)
               for m in [j.get("models", {}).get(role)] if m and m.get("mean") is not None]
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[2][0] for p in pts], [p[2][1] for p in pts]],
                    fmt="o", capsize=4, label=role)
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlim(-0.5, len(jobs) - 0.5)
    ax.set_xticks(range(len(jobs)), [j["label"] + ("" if j.get("models") else "\n(no result)") for j in jobs])
    ax.set_ylabel("held-out reward change vs base (paired, 95% CI)")
    ax.set_xlabel("job (its swept overrides)")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(title)
    ax.legend(title="model")
    return _save(fig, path)


def _point(rnd: Any) -> str:
    return "base" if rnd == "base" else f"round {rnd}"


def draw(data: RunData) -> dict[str, Path]:
    """Every figure this folder has data for, under ``plots/``: ``{name: path}``."""
    d = data.root / PLOTS_DIR
    cats: dict[str, dict[str, list[float]]] = {}
    eval_cats: dict[str, dict[str, list[float]]] = {}
    rated = "answers from a file (mode=rate)" if data.mode == "rate" else "dialogue turns, rated by the partner"
    sims: dict[str, dict[str, list[tuple[float, float]]]] = {rated: {}, "held-out answers, frozen judge": {}}
    for (rnd, ratee), rs in groups(data.ratings, "round", "ratee").items():
        label = f"{_point(rnd)} {ratee}" if ratee is not None else "rated answers"  # mode=rate: no round, no ratee
        for r in rs:
            for c, v in (r.get("categories") or {}).items():
                if isinstance(v, dict) and v.get("score") is not None:
                    cats.setdefault(label, {}).setdefault(c, []).append(v["score"])
            if r.get("score") is not None and r.get("similarity") is not None:
                sims[rated].setdefault(str(ratee or "rated answers"), []).append(
                    (r["score"], r["similarity"]))
    for (rnd, role), rs in groups(data.eval_rows, "round", "role").items():
        for r in rs:
            for c, v in (r.get("scores") or {}).items():
                if v is not None:
                    eval_cats.setdefault(f"{_point(rnd)} {role}", {}).setdefault(c, []).append(v)
            if r.get("score") is not None and r.get("similarity") is not None:
                sims["held-out answers, frozen judge"].setdefault(str(role), []).append((r["score"], r["similarity"]))
    made = {
        "eval_reward": eval_reward(data.evals, d / "eval_reward.png"),
        "eval_categories": category_distributions(eval_cats, d / "eval_categories.png",
                                                  "Held-out scores per category (frozen judge)"),
        "rating_categories": category_distributions(cats, d / "rating_categories.png",
                                                    f"Scores per category: {rated}"),
        "similarity_vs_score": similarity_vs_score(sims, d / "similarity_vs_score.png"),
        "length": length_per_round(_lengths(data), d / "length.png", "Answer length per round"),
        "training": training_curves(data.train, d / "training.png"),
    }
    return {k: v for k, v in made.items() if v is not None}


def _lengths(data: RunData) -> dict[str, dict[str, list[float]]]:
    """New tokens per answer: ``{series: {x label: values}}``, x in order base, round 0, round 1, ..."""
    out: dict[str, dict[str, list[float]]] = {}
    for (rnd, role), rs in groups(data.eval_rows, "round", "role").items():
        out.setdefault(f"held-out {role}", {})[_point(rnd)] = [r["tokens"] for r in rs
                                                               if isinstance(r.get("tokens"), int)]
    for (rnd, role), ts in groups(data.turns, "round", "role").items():
        out.setdefault(f"dialogue {role}", {})[_point(rnd)] = [t["new_tokens"] for t in ts
                                                              if isinstance(t.get("new_tokens"), int)]
    return out
