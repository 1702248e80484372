"""The sweep report: one row per job of a Hydra multirun, ``sweep.md`` and ``sweep.png`` in the sweep folder.

    python -m expertchat.report multirun/2026-11-30/20-00-00

The expected jobs are the cartesian product of the swept overrides in ``multirun.yaml`` (Hydra's own job order),
so a job whose folder is missing is listed ``missing``, a job that failed or never finished is listed with its
state (contract B's ``status.json``; without one, its stage markers), and no number is written for a job that has
none. Per job: the held-out reward change vs base with its 95% CI, the win-rate and the length ratio of each model
at the job's last evaluation point (contract A) with the hacking guards beside it (length and distinct-2 ratios to
the base, cut and copied fractions), and the partner-rated reward of its last rated round. Each job
folder with records also gets its own ``report.md`` (``report.main``), linked from its row.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from expertchat.errors import ExpertChatError
from expertchat.report import plots
from expertchat.runs.reader import RunData, ci, groups, load, mean, sweep_overrides, swept_only, table
from expertchat.stats import fmt

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.md"
SWEEP_PLOT = "sweep.png"
_GUARDS = ("length_ratio", "distinct_2_ratio", "cut_fraction", "copied_fraction")  # beside the reward


def read_task(sweep_dir: Path) -> list[str]:
    """The multirun's command-line overrides, from ``multirun.yaml``.

    Raises:
        ExpertChatError: no readable ``multirun.yaml`` with ``hydra.overrides.task``.
    """
    import yaml

    path = sweep_dir / "multirun.yaml"
    try:
        task = yaml.safe_load(path.read_text(encoding="utf-8"))["hydra"]["overrides"]["task"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ExpertChatError(f"cannot read the sweep's overrides from {path} ({type(exc).__name__}): is it the "
                              f"folder of a Hydra multirun (python -m expertchat -m ...)?") from exc
    return [str(o) for o in task or []]


def job_overrides(data: RunData) -> list[str] | None:
    """A job's own overrides: its status file's, else Hydra's record (``.hydra/overrides.yaml``)."""
    if data.status is not None and isinstance(data.status.get("overrides"), list):
        return [str(o) for o in data.status["overrides"]]
    return data.overrides


def job_row(num: int, expected: list[str], swept: list[str], folder: Path) -> dict[str, Any]:
    """One job: ``{"job", "label", "state", "why", "point", "models": {role: {...}}, "rated": {role: reward}}``;
    the numbers are there only where the job's files hold them."""
    label = " ".join(swept_only(expected, swept)) or f"job {num}"
    row: dict[str, Any] = {"job": num, "label": label, "models": {}, "rated": {}, "point": None}
    if not folder.is_dir():
        return {**row, "state": "missing", "why": f"no folder {folder.name}/"}
    data = load(folder)
    state, why = data.state()
    own = job_overrides(data)
    if own is not None and sorted(own) != sorted(expected):
        why += f"; its overrides {own} differ from the sweep's {expected}"
    row.update(state=state, why=why)
    last = next((e for e in reversed(data.evals) if e.get("round") != "base"), None)
    if last is None and data.evals:
        row["point"] = "base only"
    if last is not None:
        row["point"] = last.get("round")
        for role, m in (last.get("models") or {}).items():
            d = m.get("delta_vs_base") or {}
            row["models"][role] = {"mean": d.get("mean"), "ci": d.get("ci"),
                                   **{k: m.get(k) for k in ("win_rate", *_GUARDS)}}
    rated = groups(data.ratings, "round", "ratee")
    last_round = max((r for r, _ in rated if isinstance(r, int)), default=None)
    row["rated"] = {ratee: mean([x.get("reward") for x in rs]) for (r, ratee), rs in rated.items() if r == last_round}
    row["rated_round"] = last_round
    if (folder / "report.md").is_file():
        row["report"] = f"{folder.name}/report.md"
    return row


def sweep_rows(sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(the swept keys, a row per expected job, then any job folder the sweep does not explain)."""
    swept, expected = sweep_overrides(read_task(sweep_dir))
    rows = [job_row(i, overrides, swept, sweep_dir / str(i)) for i, overrides in enumerate(expected)]
    extra = sorted(int(p.name) for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()
                   and int(p.name) >= len(expected))
    for num in extra:
        data = load(sweep_dir / str(num))
        row = job_row(num, job_overrides(data) or [], swept, sweep_dir / str(num))
        rows.append({**row, "why": row["why"] + "; not one of the sweep's expected jobs"})
    return swept, rows


def render(sweep_dir: Path, swept: list[str], rows: list[dict[str, Any]], plot: Path | None) -> str:
    """The text of ``sweep.md``."""
    roles = sorted({role for r in rows for role in (*r["models"], *r["rated"])})
    header = ["job", "swept overrides", "state", "eval point"]
    for role in roles:
        header += [f"{role} change vs base [95% CI]", f"{role} win rate", f"{role} length ratio",
                   f"{role} distinct-2 ratio", f"{role} cut", f"{role} copied"]
    header += [f"{role} partner-rated reward" for role in roles] + ["report", "why"]
    body = []
    for r in rows:
        point = fmt(r["point"]) if r["point"] is not None else "no evaluation"
        cells = [r["job"], r["label"], f"**{r['state']}**", point]
        for role in roles:
            m = r["models"].get(role) or {}
            cells += [ci(m.get("mean"), m.get("ci")), *[fmt(m.get(k), 2) for k in ("win_rate", *_GUARDS)]]
        cells += [fmt(r["rated"].get(role)) for role in roles]
        cells += [f"[report]({r['report']})" if r.get("report") else "", r["why"]]
        body.append(cells)
    states = {s: sum(r["state"] == s for r in rows) for s in dict.fromkeys(r["state"] for r in rows)}
    out = [f"# ExpertChat sweep: {sweep_dir.name}", "", f"Sweep folder `{sweep_dir}`; swept: "
           f"{', '.join(swept) or 'nothing (one job)'}; {len(rows)} jobs: "
           + ", ".join(f"{n} {s}" for s, n in states.items()) + ".", "",
           "The change vs base is the paired held-out reward change of each model at the job's last evaluation "
           "point (frozen judge), with its 95% bootstrap CI; the partner-rated reward is the mean reward of the "
           "job's last rated round (its judge is the partner, not frozen). `n/a`: the job has no such number.", ""]
    out += table(header, body)
    out += ["", f"![sweep]({plot.name})"] if plot is not None else ["", "No job has an evaluation: no plot."]
    return "\n".join(out) + "\n"


def write_sweep_report(sweep_dir: str | Path) -> Path:
    """Write ``sweep.md`` and ``sweep.png`` into a multirun folder; return the path of ``sweep.md``.

    Raises:
        ExpertChatError: the folder is missing, has no readable ``multirun.yaml``, or holds no job folder.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ExpertChatError(f"no sweep folder at {root}: give the folder a multirun wrote (hydra.sweep.dir)")
    swept, rows = sweep_rows(root)
    if all(r["state"] == "missing" for r in rows):
        raise ExpertChatError(f"nothing to report in {root}: none of the sweep's {len(rows)} job folders "
                              f"(0/ to {len(rows) - 1}/) exists yet")
    plot = plots.sweep_deltas([{"label": r["label"], "models": {k: v for k, v in r["models"].items()
                                                                if v.get("mean") is not None}} for r in rows],
                              root / SWEEP_PLOT, f"Held-out reward change vs base per job ({root.name})")
    path = root / SWEEP_FILE
    tmp = path.with_name(f".{SWEEP_FILE}.tmp{os.getpid()}")
    tmp.write_text(render(root, swept, rows, plot), encoding="utf-8")
    tmp.replace(path)
    return path
