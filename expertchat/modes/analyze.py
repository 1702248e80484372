"""``mode=analyze``: measure what the two speakers did to each other in an existing run folder, without training
and without any model of the run (the reward's sentence embedder only).

    python -m expertchat mode=analyze analysis.run=outputs/my_run

Every round whose dialogues are complete gets the interaction stage (:mod:`expertchat.stages.interaction`) through
the same :func:`~expertchat.stages.context.run_stage` as in a run: ``interaction.jsonl`` and
``stages/round_<r>.interaction.json`` go into the run folder (rounds measured before are kept), then its report is
rebuilt with the "Interaction" section. Folders written before the stage existed are measured the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from expertchat.config.schema import ExpertChatConfig
from expertchat.errors import ExpertChatError
from expertchat.modes.eval import run_config
from expertchat.report import markdown as report
from expertchat.report.tracking import Tracker
from expertchat.runs.store import CONFIG_FILE, STAGES_DIR, RunStore, parse_marker
from expertchat.stages import interaction
from expertchat.stages.context import Run, Stage, run_stage
from expertchat.stages.dialogue import TURNS_FILE

log = logging.getLogger(__name__)

INTERACTION = Stage("interaction", interaction.stage, [interaction.INTERACTION_FILE], interaction.describe,
                    interaction.headlines)


def dialogue_rounds(store: RunStore) -> list[int]:
    """The rounds whose dialogue stage is complete (a marker says so); a folder without markers (written by hand,
    or by a version before markers): the rounds ``turns.jsonl`` holds."""
    marked = sorted({int(m[0]) for p in store.path(STAGES_DIR).glob("*.json")
                     if (m := parse_marker(p.name)) and m[0] != "base" and m[1] == "dialogue"})
    if marked:
        return marked
    return sorted({int(t["round"]) for t in store.read(TURNS_FILE) if isinstance(t.get("round"), int)})


def check(cfg: ExpertChatConfig) -> tuple[ExpertChatConfig, list[int]]:
    """The measured folder's config (its recorded one, with this command's ``tracker`` and ``progress``: the
    embedder is the run's) and its rounds with complete dialogues.

    Raises:
        ExpertChatError: no folder, no dialogues in it, an unreadable stage marker or recorded config.
    """
    folder = Path(cfg.analysis.run or cfg.run_dir or ".").expanduser()
    if not folder.is_dir():
        raise ExpertChatError(f"analysis.run: no run folder at {folder} (set analysis.run=<a run folder>)")
    store = RunStore(folder)
    store.check_markers()
    rounds = dialogue_rounds(store)
    if not rounds:
        raise ExpertChatError(f"analysis.run: {folder} holds no dialogues ({TURNS_FILE} has no record of a complete "
                              f"round): give the folder of a run that `python -m expertchat` wrote")
    # the recorded config with this command's analysis, tracker and progress (mode=eval's merge); none: older folders
    run_cfg = run_config(cfg, "analysis.run", own=("analysis",)) if (folder / CONFIG_FILE).is_file() else cfg
    return run_cfg, rounds


def run(cfg: ExpertChatConfig, tracker: Tracker | None = None,
        checked: tuple[ExpertChatConfig, list[int]] | None = None) -> dict[str, Any]:
    """Measure every round :func:`check` found (rounds measured before are kept); returns ``{round: summary}``."""
    run_cfg, rounds = checked if checked is not None else check(cfg)
    store = RunStore(run_cfg.run_dir)
    ctx = Run(run_cfg, store, tracker or Tracker(), [], None, reward_for=None)
    out = {r: run_stage(ctx, r, INTERACTION) for r in rounds}
    path = report.after_run(store.root, ctx.tracker)  # the measured folder's report gets its Interaction section
    log.info("measured the interaction of %d round(s) of %s: %s; report: %s", len(out), store.root,
             interaction.INTERACTION_FILE, path)
    return out
