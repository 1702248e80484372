"""Checks before a sweep is queued: what a Slurm job would otherwise find out after its wait in the queue.

The entrypoint (``python -m expertchat -m ...``) calls :func:`check_sweep` in the driver, before Hydra creates the
sweep folder or calls ``sbatch``. For a Slurm launcher profile it checks, in this order:

1. the launcher: the submitit plugin is installed, ``sbatch`` is on PATH and ``squeue`` answers;
2. the profile: a cluster profile (one that asks Slurm for ``hardware``'s GPUs) needs GPU hardware and an account
   (``SLURM_ACCOUNT`` or ``SBATCH_ACCOUNT``, or ``hydra.launcher.account``);
3. every job of the sweep (the cartesian product of its overrides, as Hydra's basic sweeper builds it): its config
   validates, its models are found (a local folder exists; a hub id is in the Hugging Face cache, since compute nodes
   have no internet) and the memory plan (``expertchat.modes.plan.check``, the figures of ``mode=plan``) fits the
   job's ``hardware``.

The first problem stops the sweep with one line (:class:`~expertchat.errors.ExpertChatError`) naming the job, the
variable or the plan's figure; nothing is queued. Sweeps on the basic launcher (jobs run here one after another)
are checked by each job as it starts, as single runs are.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from expertchat.config.schema import CONF, ExpertChatConfig, register, to_config
from expertchat.engine.models import looks_local, resolve_source
from expertchat.errors import ExpertChatError, first_line
from expertchat.modes import plan as memory
from expertchat.runs.reader import sweep_overrides, swept_only

GB = memory.GB
ENV_SCRIPT = "launchers/alliance/env.sh"


def compose(overrides: list[str], hydra: bool = True) -> DictConfig:
    """The config Hydra would compose for one job (with ``hydra.*`` when ``hydra``), ``run_dir`` set to ``.``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)
    with open_dict(cfg):
        cfg.run_dir = "."
    return cfg


def is_slurm(cfg: DictConfig) -> bool:
    """Whether the composed job config (with ``hydra.*``) submits through the submitit Slurm launcher."""
    return "SlurmLauncher" in str(cfg.hydra.launcher.get("_target_", ""))


def asks_hardware(launcher: DictConfig) -> bool:
    """Whether a launcher profile asks Slurm for the GPUs of ``hardware`` (a cluster profile, not the local one)."""
    extra = launcher.get("additional_parameters") or {}
    return OmegaConf.is_interpolation(launcher, "gpus_per_node") or (
        "gpus_per_node" in extra and OmegaConf.is_interpolation(extra, "gpus_per_node"))


def check_launcher(profile: str) -> None:
    """The submitit plugin is installed and a Slurm answers.

    Raises:
        ExpertChatError: naming the missing plugin, ``sbatch``, or what ``squeue`` said, and the fix.
    """
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        raise ExpertChatError(f"hydra/launcher={profile} needs the submitit launcher: pip install 'expertchat[slurm]'")
    how = ("start the local cluster (launchers/local_slurm.sh start)" if profile == "slurm_local"
           else "submit from a login node of the cluster")
    if shutil.which("sbatch") is None:
        raise ExpertChatError(f"hydra/launcher={profile} needs Slurm, but sbatch is not on PATH: {how}, or drop "
                              f"hydra/launcher=... to run the sweep's jobs here one after another")
    try:
        subprocess.run(["squeue", "-h", "-o", "%i"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        said = first_line(getattr(exc, "stderr", b"").decode(errors="replace")) if getattr(exc, "stderr", None) \
            else first_line(exc)
        raise ExpertChatError(f"hydra/launcher={profile}: Slurm does not answer (squeue: {said}): {how}, or drop "
                              f"hydra/launcher=... to run the sweep's jobs here one after another") from None


def check_profile(cfg: DictConfig, profile: str) -> None:
    """A cluster profile takes the node from ``hardware`` and needs an account.

    Raises:
        ExpertChatError: a later option replaced ``+cluster``'s hardware, ``hardware`` has no GPU, no checkout with ``launchers/alliance/env.sh`` is known
            (``EXPERTCHAT_HOME``), or no account is set (naming ``SLURM_ACCOUNT``).
    """
    launcher = cfg.hydra.launcher
    if not asks_hardware(launcher):
        return
    choices = cfg.hydra.runtime.choices
    cluster = choices.get("cluster")
    if cluster and choices.get("hardware") != cluster:
        raise ExpertChatError(f"+cluster={cluster} selects hardware={cluster}, but an option after it picked "
                              f"hardware={choices.get('hardware')} (e.g. +experiment=mixtral_vs_llama): put "
                              f"+cluster={cluster} last")
    if cfg.hardware.gpus == 0:
        raise ExpertChatError(f"hydra/launcher={profile} asks Slurm for the GPUs, CPUs and memory of `hardware`, but "
                              f"hardware={cfg.hardware.name} has no GPU: add the hardware of the cluster's nodes, e.g. "
                              f"hardware=rorqual (or +cluster=rorqual, which selects both)")
    home = os.environ.get("EXPERTCHAT_HOME") or (str(CONF.parent) if (CONF.parent / ENV_SCRIPT).is_file() else "")
    if not (Path(home) / ENV_SCRIPT).is_file():
        raise ExpertChatError(f"hydra/launcher={profile} sources {ENV_SCRIPT} of the ExpertChat checkout on every "
                              f"node, and EXPERTCHAT_HOME={home or '(unset)'} has none: source "
                              f"launchers/alliance/env.sh of your checkout first (it sets EXPERTCHAT_HOME)")
    os.environ["EXPERTCHAT_HOME"] = home  # sbatch passes the driver's environment to the job
    if not launcher.get("account", None):
        raise ExpertChatError(f"hydra/launcher={profile} needs a Slurm account and SLURM_ACCOUNT is not set: export "
                              f"SLURM_ACCOUNT=def-<pi> (launchers/alliance/local.env) or pass "
                              f"hydra.launcher.account=def-<pi>")


def check_models(cfg: ExpertChatConfig) -> None:
    """Each role's model is where the job will look: a local folder (or an installed package) exists; a hub id is in
    the local Hugging Face cache (``config.json``), since a compute node cannot download it.

    Raises:
        ExpertChatError: naming the role, the path or hub id, and how to get it.
    """
    from huggingface_hub import try_to_load_from_cache

    for role in ("actor", "judge"):
        model = getattr(cfg, role)
        path, gguf = resolve_source(model)  # a missing folder or GGUF file raises here
        if gguf or looks_local(path) or model.package:
            continue
        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise ExpertChatError(
                f"{role}.path={path} is a hub id that is not in the Hugging Face cache here, and compute nodes have "
                f"no internet: on a login node, HF_HUB_DISABLE_XET=1 hf download --max-workers=1 {path} --local-dir "
                f"<folder>, then {role}.path=<folder>")


def _plan_key(cfg: ExpertChatConfig) -> str:
    parts = {k: asdict(getattr(cfg, k)) for k in ("actor", "judge", "generation", "training", "judging", "hardware")}
    return json.dumps(parts, sort_keys=True, default=str)


def check_jobs(args: list[str]) -> list[str]:
    """Every job of the sweep ``args`` (its command-line overrides): config, models, memory plan.

    Returns:
        One line per distinct plan (hardware, need and capacity in GB), for the console.

    Raises:
        ExpertChatError: the first job that fails, named by its number and swept overrides.
    """
    swept, jobs = sweep_overrides([a for a in args if not a.startswith("-")])
    plans: dict[str, dict[str, Any]] = {}
    lines = []
    for num, overrides in enumerate(jobs):
        label = f"job {num} ({' '.join(swept_only(overrides, swept)) or 'no swept key'})"
        try:
            cfg = to_config(compose(overrides, hydra=False))
            check_models(cfg)
            key = _plan_key(cfg)
            if key not in plans:
                plans[key] = memory.check(cfg)
                result = plans[key]
                lines.append(f"  {label}: hardware={cfg.hardware.name}, needs {result['need'] / GB:.1f} GB "
                             f"{result['unit']} of {result['capacity'] / GB:.1f}")
            result = plans[key]
        except ExpertChatError as exc:
            raise ExpertChatError(f"sweep refused before queueing: {label}: {exc}") from None
        if not result["fits"]:
            blockers = "".join(f"; {b}" for b in result["blockers"])
            raise ExpertChatError(
                f"sweep refused before queueing: {label} does not fit hardware={cfg.hardware.name}: the plan needs "
                f"{result['need'] / GB:.1f} GB {result['unit']} of {result['capacity'] / GB:.1f}{blockers} "
                f"(python -m expertchat {' '.join(overrides)} mode=plan shows why and what fits); nothing was queued")
    return [f"checked {len(jobs)} job(s) before queueing: models found, memory plan fits"] + lines


def check_sweep(args: list[str], first_job: list[str] | None) -> list[str]:
    """All checks of the module docstring for the sweep ``args`` whose first job's overrides are ``first_job``
    (None: the sweep cannot be expanded here, e.g. ``glob``: only the launcher is checked).

    Returns:
        Console lines (empty for a sweep on the basic launcher).

    Raises:
        ExpertChatError: one line naming what would fail.
    """
    plain = [a for a in args if not a.startswith("-") and "," not in a and "(" not in a]  # the sweeps left out
    cfg = compose(first_job if first_job is not None else plain)
    if not is_slurm(cfg):
        return []
    profile = str(cfg.hydra.runtime.choices.get("hydra/launcher"))
    check_launcher(profile)
    check_profile(cfg, profile)
    return check_jobs(args) if first_job is not None else []
