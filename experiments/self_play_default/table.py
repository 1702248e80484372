"""Per-round table of a run folder, from its stage markers (stages/round_<r>.<stage>.json), as Markdown.

    python experiments/self_play_default/table.py outputs/<date>/<time>

One row per round and model: how its partner rated its dialogue turns (mean weighted score in [1, 10], mean WIM
similarity, mean reward), and what its online DPO steps saw (mean reward of the sampled completions, first and
last batch, fraction of pairs masked as ties), plus the stage times and the process's peak memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run: Path) -> None:
    rows = ["| round | model | rated score | similarity | reward (rating) | DPO reward: mean (first -> last batch) "
            "| masked | dialogue / rating / training s | peak RSS GB |",
            "|---|---|---|---|---|---|---|---|---|"]
    r = 0
    while (run / "stages" / f"round_{r}.dialogue.json").exists():
        stage = {s: json.loads(p.read_text()) if (p := run / "stages" / f"round_{r}.{s}.json").exists() else {}
                 for s in ("dialogue", "rating", "training")}
        for model, rated in stage["rating"].get("models", {}).items():
            t = stage["training"].get("roles", {}).get(model, {})
            seconds = (stage["dialogue"].get("seconds"), rated.get("seconds"), t.get("seconds"))
            dpo = (f"{t['reward_mean']:.3f} ({t['reward_first_batch']:.3f} -> {t['reward_last_batch']:.3f})"
                   if t.get("reward_mean") is not None else "-")
            rows.append(f"| {r} | {model} | {rated['score_mean']} | {rated['similarity_mean']} | "
                        f"{rated['reward_mean']} | {dpo} | {t.get('masked_fraction', '-')} | "
                        f"{' / '.join('-' if s is None else f'{s:.0f}' for s in seconds)} | "
                        f"{stage['training'].get('peak_rss_gb', stage['rating'].get('peak_rss_gb', '-'))} |")
        r += 1
    print("\n".join(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
