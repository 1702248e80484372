"""Experiment tracking: one small interface, ``none`` or ``wandb`` (offline by default).

The pipeline opens one tracker per job and finishes it in a ``finally``; every stage (and the TRL trainer,
through :class:`expertchat.stages.dpo.MetricsCallback`) logs into it. Metrics that matter also stay in the run
folder whatever the tracker (``train_metrics.jsonl``, ``stages/*.json``), so ``none`` loses nothing.

W&B notes (0.31): ``dir=`` the run folder, so the offline run lands in ``<run_dir>/wandb/offline-run-*``;
``reinit="create_new"`` so a second job in the same process never logs into the previous run; a stable run id
kept in ``<run_dir>/wandb/run_id`` so a resumed job continues the same run (``wandb sync`` merges them).
Every section (``train/...``, ``rounds/...``) logs against its own explicit x-axis (``<section>/step``) instead of W&B's implicit step, so a
requeued job that starts again at step 0, or a stage logging after another, never has its points dropped.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from expertchat.config.schema import TrackerConfig

log = logging.getLogger(__name__)


class Tracker:
    """Tracks nothing: the interface, and the ``none`` backend."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log scalar metrics at an explicit step. Keys are ``<section>/<name>`` (e.g. ``train/actor/loss``);
        the section (before the first ``/``) names the x-axis, ``<section>/step``, that ``step`` is on."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Record end-of-run values (shown in the run's summary, not as curves)."""

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Record a table (e.g. every dialogue turn with its rating), one list of cells per row."""

    def log_images(self, images: dict[str, str | os.PathLike[str]]) -> None:
        """Record image files (the report's plots) under their names."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; ``exit_code`` != 0 marks it failed."""


class WandbTracker(Tracker):
    """One W&B run per job, offline by default, under the run folder."""

    def __init__(self, cfg: TrackerConfig, run_dir: str | os.PathLike[str], config: dict[str, Any]) -> None:
        from expertchat.engine.models import require

        require("wandb", "wandb", "tracker=wandb")
        import wandb

        root = Path(run_dir)
        (root / "wandb").mkdir(parents=True, exist_ok=True)
        for line in wandb_dirs(root):
            log.warning("%s", line)
        id_file = root / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        self._axes: set[str] = set()
        job = sweep_job()  # in a multirun: the sweep folder groups the jobs, the swept overrides name each one
        if job is not None:
            config = {**config, "sweep": job}
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group or (job or {}).get("group"),
            name=cfg.name or (job and " ".join(job["swept"]) or None) or root.name, tags=list(cfg.tags),
            dir=str(root), mode=cfg.mode, config=config, id=run_id, resume="allow", reinit="create_new",
        )
        log.info("W&B run %s (%s) in %s", run_id, cfg.mode, root / "wandb")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        by_axis: dict[str, dict[str, Any]] = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            axis = key.partition("/")[0] if "/" in key else "metrics"
            by_axis.setdefault(axis, {})[key] = value
        for axis, values in by_axis.items():
            step_key = f"{axis}/step"
            if axis not in self._axes:
                self.run.define_metric(step_key)
                self.run.define_metric(f"{axis}/*", step_metric=step_key)
                self._axes.add(axis)
            self.run.log({**values, step_key: step})

    def log_summary(self, summary: dict[str, Any]) -> None:
        for key, value in _flatten(summary).items():
            self.run.summary[key] = value

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self.run.log({f"tables/{name}": wandb.Table(columns=columns, data=rows)})

    def log_images(self, images: dict[str, str | os.PathLike[str]]) -> None:
        import wandb

        if images:
            self.run.log({f"plots/{name}": wandb.Image(str(path)) for name, path in images.items()})

    def finish(self, exit_code: int = 0) -> None:
        import wandb

        self.run.finish(exit_code=exit_code)
        # finish() can return before the service has flushed the run's .wandb log (seen once in the test suite under
        # load: the file held only its header); teardown waits for the service to write everything and exit.
        wandb.teardown(exit_code=exit_code)


def make_tracker(cfg: TrackerConfig, run_dir: str | os.PathLike[str], config: dict[str, Any]) -> Tracker:
    """The tracker ``cfg.backend`` names; ``config`` (the resolved experiment config) is recorded with it."""
    if cfg.backend == "wandb":
        return WandbTracker(cfg, run_dir, config)
    return Tracker()


def sweep_job() -> dict[str, Any] | None:
    """In a Hydra multirun: ``{"group"`` (the sweep folder's last two parts, e.g. ``2026-11-30_20-00-00``),
    ``"dir"``, ``"job"`` (its number), ``"overrides"`` (the job's task overrides), ``"swept"`` (those whose key
    the sweep varies, read from ``<sweep dir>/multirun.yaml``; all of them when it cannot be read)``}``; ``None``
    outside a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        overrides = list(hc.overrides.task)
        job = {"group": "_".join(Path(hc.sweep.dir).parts[-2:]), "dir": str(hc.sweep.dir), "job": hc.job.num,
               "overrides": overrides, "swept": overrides}
    except (ImportError, ValueError, AttributeError):  # not inside a Hydra job
        return None
    import yaml

    from expertchat.errors import ExpertChatError
    from expertchat.runs.reader import sweep_overrides, swept_only

    try:
        multirun = yaml.safe_load((Path(hc.sweep.dir) / "multirun.yaml").read_text(encoding="utf-8"))
        job["swept"] = swept_only(overrides, sweep_overrides(multirun["hydra"]["overrides"]["task"])[0])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ExpertChatError):
        pass
    return job


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
    return out


# W&B's own folders, outside the run folder: where it stages the files of tables and images before they are logged
# (data), caches artifacts (cache) and keeps its settings (config). Defaults under $HOME (platformdirs).
WANDB_DIRS = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache", "WANDB_CONFIG_DIR": "config"}


def wandb_dirs(run_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Make sure W&B can write its own folders (:data:`WANDB_DIRS`): on a compute node whose $HOME is read-only or
    over quota, W&B would otherwise finish the run as successful without its tables, plots and evaluation summary.
    A default folder that cannot be written is replaced by ``<run_dir>/wandb/<data|cache|config>`` (the
    environment variable is set for this process); a folder the user chose is an error.

    Returns:
        one line per folder replaced (for the log); empty when all can be written (or ``run_dir`` is None: checks
        only).

    Raises:
        ExpertChatError: a folder set by its environment variable cannot be written: the variable, the folder, why.
    """
    import platformdirs

    from expertchat.errors import ExpertChatError

    defaults = {"WANDB_DATA_DIR": platformdirs.user_data_dir("wandb"),
                "WANDB_CACHE_DIR": platformdirs.user_cache_dir("wandb"),
                "WANDB_CONFIG_DIR": str(Path(platformdirs.user_config_dir()) / "wandb")}
    replaced = []
    for var, name in WANDB_DIRS.items():
        folder = Path(os.environ.get(var) or defaults[var]).expanduser()
        why = _unwritable(folder)
        if why is None:
            continue
        if os.environ.get(var):
            raise ExpertChatError(f"{var}={folder} cannot be written ({why}): W&B keeps its {name} there (the run's "
                                  f"tables and plots are staged in WANDB_DATA_DIR); set {var} to a writable folder, "
                                  f"e.g. {var}=$SLURM_TMPDIR/wandb-{name}, or use tracker=none")
        if run_dir is not None:
            os.environ[var] = str(Path(run_dir, "wandb", name).absolute())
            replaced.append(f"W&B's {name} folder {folder} cannot be written ({why}): using {os.environ[var]} "
                            f"({var})")
    return replaced


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` (created if missing) cannot take a file, or None."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None
