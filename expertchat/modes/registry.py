"""``mode=...``: which module runs the job, inside one tracker that is finished in every case.

Each mode is a module with ``check(cfg) -> checked``, which validates (and reads) its input before the
tracker opens, and ``run(cfg, tracker, checked) -> summary``, which uses what ``check`` read instead of reading it
again. ``run`` is the dialogue -> rating -> training loop (``modes/run.py``), ``rate`` rates answers from a file
(``modes/rate.py``). A new mode is one more entry of ``config.MODES``.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from omegaconf import OmegaConf

from expertchat.config.schema import MODES, ExpertChatConfig
from expertchat.report import console, tracking
from expertchat.report import markdown as report
from expertchat.runs import jobs

log = logging.getLogger(__name__)


def _choices() -> dict[str, str]:
    """Hydra's group -> option choices of this job (empty outside a Hydra job)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return {k: v for k, v in HydraConfig.get().runtime.choices.items() if v and not k.startswith("hydra/")}
    except ValueError:  # not inside a Hydra job (tests, scripts)
        return {}


def run(cfg: ExpertChatConfig) -> dict[str, Any]:
    """Run ``cfg.mode`` with the configured tracker; the tracker is finished whether the mode returns or raises
    (a raised error marks the tracked run failed, exit code 1) and the error propagates.

    Returns:
        The mode's summary.
    """
    module = importlib.import_module(MODES[cfg.mode])
    checked = module.check(cfg)  # bad input stops here, before a tracker run exists
    console.quiet_libraries(cfg.progress)
    for line in console.config_lines(cfg, _choices()):
        log.info("%s", line)
    if jobs.threads_line():
        log.info("%s", jobs.threads_line())
    if cfg.judging.same_signal_warning():
        log.warning("%s", cfg.judging.same_signal_warning())
    tracker = tracking.make_tracker(cfg.tracker, cfg.run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)))
    try:
        summary = module.run(cfg, tracker, checked)
        report.after_run(cfg.run_dir, tracker, just_finished=True)  # report.md, plots, tracked tables; never raises
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return summary
