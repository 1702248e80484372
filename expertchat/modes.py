"""``mode=...``: which module runs the job, inside one tracker that is finished in every case.

Each mode is a module with ``run(cfg, tracker) -> summary``: ``run`` is the dialogue -> rating -> training loop
(``pipeline.py``), ``rate`` rates answers from a file (``rate.py``). A new mode is one more line of
:data:`MODES` (and its value in ``config.MODES``).
"""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import OmegaConf

from expertchat import tracking
from expertchat.config import MODES as MODE_NAMES
from expertchat.config import ExpertChatConfig

MODES = {"run": "expertchat.pipeline", "rate": "expertchat.rate"}
assert set(MODES) == set(MODE_NAMES), "config.MODES and modes.MODES must name the same modes"


def run(cfg: ExpertChatConfig) -> dict[str, Any]:
    """Run ``cfg.mode`` with the configured tracker; the tracker is finished whether the mode returns or raises
    (a raised error marks the tracked run failed, exit code 1) and the error propagates.

    Returns:
        The mode's summary.
    """
    module = importlib.import_module(MODES[cfg.mode])
    tracker = tracking.make_tracker(cfg.tracker, cfg.run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)))
    try:
        summary = module.run(cfg, tracker)
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return summary
