"""The report's "Interaction" section and figures: what the two speakers did to each other, from
``interaction.jsonl`` (:mod:`expertchat.stages.interaction`), aggregated by round and speaker, by topic, and by
turn (the drift and convergence curves).

Every mean comes with a 95% BCa bootstrap CI (:func:`expertchat.stats.bootstrap_ci`) over DIALOGUES, not turns: the
turns of one dialogue depend on each other, so each dialogue's mean is one observation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertchat.runs.reader import table
from expertchat.stats import bootstrap_ci, fmt

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.runs.reader import RunData

# (field, column title, format): the per-speaker table's measures
MEASURES = (("echo", "echo", ".0%"), ("agreement", "agrees", ".0%"), ("questions", "questions", ".2f"),
            ("novelty", "novelty", ".0%"), ("adherence", "topic adherence", ".3f"),
            ("partner_similarity", "partner sim.", ".3f"), ("steer", "steers", ".0%"))


def by_dialogue(rows: Iterable[dict[str, Any]], key: str) -> list[float]:
    """Each dialogue's mean of ``key`` over ``rows`` (booleans count as 0/1; missing values are left out)."""
    per: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(key) is not None:
            per[(r.get("round"), r.get("dialogue_id"))].append(float(r[key]))
    return [sum(v) / len(v) for v in per.values()]


def mean_ci(values: list[float], spec: str) -> str:
    """``mean [lo, hi]`` in format ``spec`` (``-`` without values; no interval for fewer than 2)."""
    if not values:
        return "-"
    m = sum(values) / len(values)
    ci = bootstrap_ci(values) if len(values) > 1 else None
    return format(m, spec) + (f" [{format(ci[0], spec)}, {format(ci[1], spec)}]" if ci else "")


def speaker_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """One table row per (round, speaker): dialogues, turns and each of :data:`MEASURES` with its CI."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r.get("round"), r.get("role"))].append(r)
    return [[rnd, role, len({r["dialogue_id"] for r in rs}), len(rs),
             *[mean_ci(by_dialogue(rs, key), spec) for key, _, spec in MEASURES]]
            for (rnd, role), rs in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1])))]


def topic_rows(rows: list[dict[str, Any]], ratings: list[dict[str, Any]], limit: int = 20) -> list[list[Any]]:
    """Per topic, best rated first: dialogues, the partner's mean reward of its turns, adherence, echo, agreement
    (means over the topic's turns); at most ``limit`` topics."""
    reward: dict[tuple, float] = {(str(r.get("dialogue_id")), r.get("turn")): r["reward"] for r in ratings
                                  if r.get("reward") is not None and r.get("dialogue_id") is not None}
    topics: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        topics[str(r.get("topic"))].append(r)

    def avg(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    out = []
    for topic, rs in topics.items():
        rewards = [reward[k] for r in rs if (k := (str(r["dialogue_id"]), r["turn"])) in reward]
        out.append([topic[:70], len({r["dialogue_id"] for r in rs}), avg(rewards),
                    avg([r["adherence"] for r in rs if r.get("adherence") is not None]),
                    avg([r["echo"] for r in rs if r.get("echo") is not None]),
                    avg([float(r["agreement"]) for r in rs])])
    out.sort(key=lambda row: -1e9 if row[2] is None else -row[2])
    return [[t, n, fmt(rw, 3), fmt(ad, 3), "-" if e is None else f"{e:.0%}", "-" if ag is None else f"{ag:.0%}"]
            for t, n, rw, ad, e, ag in out[:limit]]


def turn_curve(rows: list[dict[str, Any]], key: str) -> dict[Any, list[tuple[int, float, tuple | None]]]:
    """Per round: ``(turn, mean of key, CI over dialogues)`` for each turn index (the drift or convergence curve)."""
    out: dict[Any, list[tuple[int, float, tuple | None]]] = {}
    for rnd in sorted({r.get("round") for r in rows}, key=str):
        points = []
        for turn in sorted({r["turn"] for r in rows if r.get("round") == rnd}):
            values = [float(r[key]) for r in rows if r.get("round") == rnd and r["turn"] == turn
                      and r.get(key) is not None]
            if values:
                points.append((turn, sum(values) / len(values), bootstrap_ci(values) if len(values) > 1 else None))
        out[rnd] = points
    return out


def section(data: RunData, fig: Callable[..., list[str]]) -> list[str]:
    """The "Interaction" section of ``report.md`` (empty for a folder without dialogues)."""
    if not data.turns:
        return []
    head = ["", "## Interaction", ""]
    if not data.interaction:
        return head + [f"Not measured in this folder (a run older than the interaction stage): `python -m expertchat "
                       f"mode=analyze analysis.run={data.root}` measures it."] + league_section(data, fig)
    lines = head + [
        "What the speakers did to each other (`interaction.jsonl`; measures defined in `expertchat/interaction.py`): "
        "*echo*, the share of a turn's words inside a 3-gram of the partner's last turn; *agrees*, turns using an "
        "assent phrase (\"spot on\", \"I agree\", ...); *novelty*, content words new to the dialogue; *topic "
        "adherence*, the embedding cosine of turn and topic; *partner sim.*, of turn and the partner's last turn; "
        "*steers*, the speaker's share of the new words the partner took up. Means with 95% bootstrap CIs over "
        "dialogues.", ""]
    lines += table(["round", "speaker", "dialogues", "turns", *[title for _, title, _ in MEASURES]],
                    speaker_rows(data.interaction))
    lines += fig("interaction_turns")
    lines += ["", "By topic, best rewarded first (the partner's reward of the topic's turns):", ""]
    lines += table(["topic", "dialogues", "reward", "adherence", "echo", "agrees"],
                    topic_rows(data.interaction, data.ratings))
    return lines + order_section(data) + league_section(data, fig)


def order_section(data: RunData) -> list[str]:
    """Who speaks first (``dialogue.counterbalance``: every topic played with both openers): per speaker, as
    opener and as responder, the partner's mean reward of its turns and the interaction measures, with CIs."""
    if len({r.get("opener") for r in data.interaction} - {None}) < 2:
        return []
    reward = {(str(r.get("dialogue_id")), r.get("turn")): r["reward"] for r in data.ratings
              if r.get("reward") is not None}
    rows = []
    for role in sorted({r["role"] for r in data.interaction}):
        for opened in (True, False):
            rs = [{**r, "reward": reward.get((str(r["dialogue_id"]), r["turn"]))} for r in data.interaction
                  if r["role"] == role and (r.get("opener") == role) == opened]
            rows.append([role, "opens" if opened else "responds", len({r["dialogue_id"] for r in rs}),
                         mean_ci(by_dialogue(rs, "reward"), ".3f"), mean_ci(by_dialogue(rs, "adherence"), ".3f"),
                         mean_ci(by_dialogue(rs, "echo"), ".0%"), mean_ci(by_dialogue(rs, "agreement"), ".0%")])
    return ["", "By speaking order (each topic played with both openers: dialogue.counterbalance):", ""] + table(
        ["speaker", "order", "dialogues", "reward", "adherence", "echo", "agrees"], rows)


def league_section(data: RunData, fig: Callable[..., list[str]]) -> list[str]:
    """The cross-play league (``league.json``, ``mode=league``): each actor checkpoint's Bradley-Terry rating with
    its CI, its wins, and its mean reward (frozen judge) against each judge checkpoint; the heatmap."""
    lg = data.league
    if not lg:
        return []
    rows = []
    for i, point in enumerate(lg["points"]):
        ci = lg["ratings_ci"][i]
        rows.append([point, fmt(lg["ratings"][i], 2) + (f" [{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]" if ci else ""),
                     lg["wins"][i], *[fmt(v, 3) for v in lg["matrix"][i]]])
    return ["", "### Cross-play league", "",
            f"Every actor checkpoint talked with every judge checkpoint on {len(lg['topics'])} held-out topics; the "
            f"frozen judge rated the actor's turns. Bradley-Terry log-strength (base = 0; 95% bootstrap CI over "
            f"topics) from {lg['comparisons']} comparisons: two actor checkpoints, the same judge checkpoint and "
            f"topic, the higher mean reward wins.", ""] + table(
        ["actor", "Bradley-Terry", "wins", *[f"vs judge {p}" for p in lg["points"]]], rows) + fig("league")


def league_figure(data: RunData, path: Path) -> Path | None:
    """The league's matrix as a heatmap: mean reward of actor checkpoint (rows) with judge checkpoint (columns)."""
    lg = data.league
    if not lg or not lg.get("matrix"):
        return None
    import numpy as np

    from expertchat.report.plots import _figure, _save

    m = np.array([[np.nan if v is None else v for v in row] for row in lg["matrix"]], dtype=float)
    fig, axes = _figure(width=1.6 + 1.1 * len(lg["points"]), height=1.2 + 0.9 * len(lg["points"]))
    ax = axes[0][0]
    image = ax.imshow(m, cmap="viridis")
    ax.set_xticks(range(len(lg["points"])), [f"judge {p}" for p in lg["points"]], rotation=30, ha="right")
    ax.set_yticks(range(len(lg["points"])), [f"actor {p}" for p in lg["points"]])
    for (i, j), v in np.ndenumerate(m):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v < np.nanmean(m) else "black")
    ax.set_title("Cross-play: mean reward of the actor's turns (frozen judge)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path)


def figure(data: RunData, path: Path) -> Path | None:
    """Topic adherence (drift) and partner similarity (convergence) by turn, one line per round, 95% CI bars."""
    if not data.interaction:
        return None
    from matplotlib.ticker import MaxNLocator

    from expertchat.report.plots import _figure, _save

    fig, axes = _figure(ncols=2, width=5.2, height=3.6)
    turns = [r["turn"] for r in data.interaction]
    for ax, key, title in ((axes[0][0], "adherence", "Topic adherence by turn (drift)"),
                           (axes[0][1], "partner_similarity", "Similarity to the partner's last turn")):
        for rnd, points in turn_curve(data.interaction, key).items():
            if not points:
                continue
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            err = [[max(y - (ci or (y, y))[0], 0) for y, ci in zip(ys, [p[2] for p in points], strict=True)],
                   [max((ci or (y, y))[1] - y, 0) for y, ci in zip(ys, [p[2] for p in points], strict=True)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"round {rnd}")
        ax.set_title(title)
        ax.set_xlim(min(turns) - 0.3, max(turns) + 0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("turn")
        ax.set_ylabel("cosine similarity")
        ax.legend(fontsize=8)
    return _save(fig, path)
