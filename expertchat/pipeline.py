"""The ExpertChat loop, top to bottom: topics -> (dialogue -> rating -> training) x rounds.

Every stage writes into the run folder and marks itself done; rerunning into the same folder continues from
the last completed stage.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import OmegaConf

from expertchat import dialogue
from expertchat.config import ExpertChatConfig
from expertchat.models import load_pair
from expertchat.store import RunStore
from expertchat.topics import load_topics

log = logging.getLogger(__name__)


def run(cfg: ExpertChatConfig) -> dict[str, Any]:
    """Run the experiment described by ``cfg`` in ``cfg.run_dir``; return the last round's summaries."""
    store = RunStore(cfg.run_dir)
    n = cfg.topics.n
    topics = None  # chosen once and kept in topics.json, so a resumed run holds the same dialogues
    if not store.path("topics.json").exists() and cfg.topics.source != "generated":
        topics = load_topics(cfg.topics, n * cfg.rounds, seed=cfg.seed)  # bad input fails before any write
    actor, judge = load_pair(cfg.actor, cfg.judge)
    models = {"actor": actor, "judge": judge}
    if not store.path("config.yaml").exists():
        store.write_text("config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if not store.path("topics.json").exists():
        topics = topics or load_topics(cfg.topics, n * cfg.rounds, model=actor, generation=cfg.generation,
                                       seed=cfg.seed)
        store.write_json("topics.json", topics)
    topics = store.read_json("topics.json")

    summary: dict[str, Any] = {}
    for r in range(cfg.rounds):
        if not store.done(r, "dialogue"):
            store.begin(r, "dialogue", [dialogue.TURNS_FILE])
            dialogues = dialogue.run_dialogues(models, topics[r * n:(r + 1) * n], cfg.dialogue, cfg.generation,
                                               store, round_idx=r, seed=cfg.seed, progress=cfg.progress)
            store.finish(r, "dialogue", dialogue.summarize(dialogues))
        summary["dialogue"] = store.stage_summary(r, "dialogue")
        log.info("round %d dialogue: %s", r, summary["dialogue"])
    return summary
