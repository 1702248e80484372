"""Markdown tables of held-out evaluation results, read from run folders' ``stages/*.evaluation.json``.

    python experiments/self_play_cpu/table.py RUN_DIR [RUN_DIR ...]        one row per run, round and model
    python experiments/self_play_cpu/table.py --sweep SWEEP_DIR           one row per job of a multirun

A folder or round without an evaluation summary is listed as missing; no number is made up for it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = ("| {first} | round | model | reward (95% CI) | delta vs base (95% CI) | win/tie/loss | win-rate | "
          "length ratio | distinct-2 ratio | cut fraction | copied |\n|---|---|---|---|---|---|---|---|---|---|---|")


def ci(c: list[float] | None) -> str:
    return f"[{c[0]:+.3f}, {c[1]:+.3f}]" if c else "n/a"


def num(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def rows(run: Path, label: str) -> list[str]:
    points = sorted(run.glob("stages/round_*.evaluation.json"), key=lambda p: int(p.name.split(".")[0][6:]))
    if not points:
        return [f"| {label} | - | - | no evaluation summary in {run} | | | | | | | |"]
    out = []
    for path in points:
        s = json.loads(path.read_text())
        if "skipped" in s:
            out.append(f"| {label} | {s['round']} | - | skipped: {s['skipped']} | | | | | | | |")
            continue
        for role, m in s["models"].items():
            d = m["delta_vs_base"] or {}
            out.append(f"| {label} | {s['round']} | {role} | {m['reward_mean']:+.3f} {ci(m['reward_ci'])} | "
                       f"{num(d.get('mean'), '+.3f')} {ci(d.get('ci'))} | {m['win']}/{m['tie']}/{m['loss']} | "
                       f"{num(m['win_rate'])} | {num(m['length_ratio'])} | {num(m['distinct_2_ratio'])} | "
                       f"{num(m['cut_fraction'])} | {num(m['copied_fraction'])} |")
    return out


def sweep(folder: Path) -> list[str]:
    jobs = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    out = []
    for job in jobs:
        overrides = job / ".hydra" / "overrides.yaml"
        swept = [line.strip("- \n") for line in overrides.read_text().splitlines()] if overrides.exists() else []
        label = " ".join(o for o in swept if o.startswith("reward.zeta")) or job.name
        out += rows(job, f"{job.name}: {label}")
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["--sweep"]:
        print(HEADER.format(first="job"))
        print("\n".join(sweep(Path(argv[1]))))
        return
    print(HEADER.format(first="run"))
    for run in map(Path, argv):
        print("\n".join(rows(run, run.name)))


if __name__ == "__main__":
    main(sys.argv[1:])
