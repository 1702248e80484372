"""Experiment tracking: one small interface, ``none`` or ``wandb`` (offline by default).

The pipeline opens one tracker per job and finishes it in a ``finally``; every stage (and the TRL trainer,
through :class:`expertchat.stages.dpo.MetricsCallback`) logs into it. Metrics that matter also stay in the run
folder whatever the tracker (``train_metrics.jsonl``, ``stages/*.json``), so ``none`` loses nothing.

W&B notes (0.31): ``dir=`` the run folder, so the offline run lands in ``<run_dir>/wandb/offline-run-*``;
``reinit="create_new"`` so a second job in the same process never logs into the previous run.

One W&B run per SEGMENT: the first job into a run folder is run ``<id>`` (kept in ``<run_dir>/wandb/run_id``); a job
that resumes the folder (a Slurm requeue, a rerun) is a new run ``<id>-s<k>`` (k = 1, 2, ...; listed in
``<run_dir>/wandb/segments``), named ``<name> (segment k+1)``, in the same group, with ``segment`` in its config. A
resumed run with the same id writes a second offline folder that starts at step 0, and syncing it can replace the
first segment's data on the server (reported in W&B's issues); separate runs never overwrite one another, and the
dashboard groups them by the swept keys (``python -m expertchat.report SWEEP --wandb-workspace``).

In a multirun the group is ``<experiment>/<sweep folder>`` (e.g. ``mixtral_vs_llama/2026-12-06_10-00-00``), the run is
named by its swept overrides, and tagged with the swept keys. With ``tracker.live_sync`` (the cluster profiles) each
flush marks the offline run for a ``wandb-osh`` process on a login node, which syncs it while the job runs (compute
nodes have no internet): on every summary, every image and table, at most once a minute while logging, and at the end.
Every section (``train/...``, ``rounds/...``) logs against its own explicit x-axis (``<section>/step``) instead of W&B's
implicit step, so a stage logging after another never has its points dropped.
"""

from __future__ import annotations

import logging
import math
import os
import time
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
        self._sync = live_sync_hook() if cfg.live_sync and cfg.mode == "offline" else None  # before a run exists
        run_id, segment = next_segment(root)
        self._axes: set[str] = set()
        job = sweep_job()  # in a multirun: the sweep folder groups the jobs, the swept overrides name each one
        if job is not None:
            config = {**config, "sweep": job}
        if segment:
            config = {**config, "segment": segment}
        name = cfg.name or (job and " ".join(job["swept"]) or None) or root.name
        tags = list(dict.fromkeys([*cfg.tags, *(job or {}).get("swept_keys", [])]))
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, group=cfg.group or (job or {}).get("group"),
            name=name + (f" (segment {segment + 1})" if segment else ""), tags=tags,
            dir=str(root), mode=cfg.mode, config=config, id=run_id, resume="allow", reinit="create_new",
        )
        self._synced_at = 0.0
        self.offline_dir = Path(self.run.dir).parent  # <run_dir>/wandb/offline-run-<time>-<id> (run.dir: its files/)
        log.info("W&B run %s (%s) in %s%s", run_id, cfg.mode, root / "wandb",
                 "; wandb-osh syncs it live" if self._sync else "")

    def mark_for_sync(self, force: bool = True) -> None:
        """With ``tracker.live_sync``: ask the login node's ``wandb-osh`` to sync this offline run now (``force``
        False: only when the last request is a minute old)."""
        if self._sync is None or (not force and time.monotonic() - self._synced_at < 60):
            return
        self._synced_at = time.monotonic()
        try:
            self._sync(self.offline_dir)
        except OSError as exc:  # a full or read-only home costs the live view, never the job
            log.warning("wandb-osh: could not mark the run for syncing: %s", exc)

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
        self.mark_for_sync(force=False)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for key, value in _flatten(summary).items():
            self.run.summary[key] = value
        self.mark_for_sync()

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self.run.log({f"tables/{name}": wandb.Table(columns=columns, data=rows)})
        self.mark_for_sync()

    def log_images(self, images: dict[str, str | os.PathLike[str]]) -> None:
        import wandb

        if images:
            self.run.log({f"plots/{name}": wandb.Image(str(path)) for name, path in images.items()})
            self.mark_for_sync()

    def finish(self, exit_code: int = 0) -> None:
        import wandb

        self.run.finish(exit_code=exit_code)
        # finish() can return before the service has flushed the run's .wandb log (seen once in the test suite under
        # load: the file held only its header); teardown waits for the service to write everything and exit.
        wandb.teardown(exit_code=exit_code)
        self.mark_for_sync()  # after teardown: the last records are on disk


def next_segment(root: Path) -> tuple[str, int]:
    """The W&B run id of the next job into run folder ``root`` and its segment number: ``(<id>, 0)`` for the first
    (a new random id, kept in ``wandb/run_id``), ``(<id>-s<k>, k)`` for the k-th job that resumes the folder (each
    listed in ``wandb/segments``)."""
    folder = root / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file, segments = folder / "run_id", folder / "segments"
    if not id_file.exists():
        run_id = uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        segments.write_text(run_id + "\n")
        return run_id, 0
    base = id_file.read_text().strip()
    done = segments.read_text().split() if segments.exists() else [base]
    k = len(done)
    segments.write_text("".join(f"{s}\n" for s in [*done, f"{base}-s{k}"]))
    return f"{base}-s{k}", k


def live_sync_hook() -> Any:
    """``wandb_osh``'s hook that marks an offline run for the login node's ``wandb-osh`` process (its command folder:
    ``$WANDB_OSH_COMMAND_DIR``, else ``~/.wandb_osh_command_dir``, on a filesystem both see).

    Raises:
        ExpertChatError: wandb-osh is not installed (``pip install 'expertchat[wandb]'``).
    """
    from expertchat.engine.models import require

    require("wandb_osh", "wandb", "tracker.live_sync=true")
    from wandb_osh.hooks import TriggerWandbSyncHook

    where = os.environ.get("WANDB_OSH_COMMAND_DIR")
    return TriggerWandbSyncHook(Path(where)) if where else TriggerWandbSyncHook()


def make_tracker(cfg: TrackerConfig, run_dir: str | os.PathLike[str], config: dict[str, Any]) -> Tracker:
    """The tracker ``cfg.backend`` names; ``config`` (the resolved experiment config) is recorded with it."""
    if cfg.backend == "wandb":
        return WandbTracker(cfg, run_dir, config)
    return Tracker()


def sweep_group(experiment: str | None, sweep_dir: str | os.PathLike[str]) -> str:
    """The W&B group of a sweep's runs: the experiment (``default`` without ``+experiment``) and the sweep folder's
    last two parts.

    >>> sweep_group("smoke", "multirun/2026-11-30/20-00-00"), sweep_group(None, "/scratch/x/multirun/d/t")
    ('smoke/2026-11-30_20-00-00', 'default/d_t')
    """
    return f"{experiment or 'default'}/{'_'.join(Path(sweep_dir).parts[-2:])}"


def sweep_job() -> dict[str, Any] | None:
    """In a Hydra multirun: ``{"group"`` (the experiment and the sweep folder's last two parts, e.g.
    ``smoke/2026-11-30_20-00-00``; ``default/...`` without ``+experiment``), ``"dir"``, ``"job"`` (its number),
    ``"overrides"`` (the job's task overrides), ``"swept"`` (those whose key the sweep varies, read from
    ``<sweep dir>/multirun.yaml``; all of them when it cannot be read), ``"swept_keys"`` (their keys)``}``;
    ``None`` outside a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        overrides = list(hc.overrides.task)
        job = {"group": sweep_group(hc.runtime.choices.get("experiment"), hc.sweep.dir), "dir": str(hc.sweep.dir),
               "job": hc.job.num, "overrides": overrides, "swept": overrides}
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
    job["swept_keys"] = [o.partition("=")[0].lstrip("+~") for o in job["swept"]]
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
