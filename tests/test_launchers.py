"""launchers/ and the launcher profiles: the scripts parse, the W&B sync helper finds offline runs, every profile
composes with the hardware it names (the sbatch options a sweep would ask for)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ROOT / "launchers"


@pytest.mark.parametrize("script", ["local_slurm.sh", "beluga/setup_env.sh", "beluga/env.sh", "beluga/run.sbatch",
                                    "beluga/sync_wandb.sh"])
def test_every_launcher_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(LAUNCHERS / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_local_slurm_usage_is_one_line():
    proc = subprocess.run([str(LAUNCHERS / "local_slurm.sh"), "restart"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f"usage: {LAUNCHERS / 'local_slurm.sh'} start|stop|status"


def test_sync_helper_finds_the_offline_runs_of_run_folders(tmp_path, monkeypatch):
    from expertchat.config.schema import TrackerConfig
    from expertchat.report.tracking import make_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "multirun" / "0"
    tracker = make_tracker(TrackerConfig(backend="wandb"), run, {"seed": 0})
    tracker.log({"rounds/reward": 0.1}, step=0)
    tracker.finish()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(LAUNCHERS / "beluga" / "sync_wandb.sh"), "--dry-run", "multirun"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "sync_wandb: 1 offline run(s)" in proc.stdout
    assert "Would sync 1 run(s)" in proc.stdout + proc.stderr
    nothing = subprocess.run(["bash", str(LAUNCHERS / "beluga" / "sync_wandb.sh"), str(tmp_path / "empty")],
                             env=env, capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 0 and "no offline W&B runs" in nothing.stdout


def compose_launcher(*overrides: str):
    from hydra import compose, initialize_config_dir

    from expertchat.__main__ import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True).hydra.launcher


def test_gpu_profiles_ask_slurm_for_the_node_their_hardware_describes(monkeypatch):
    monkeypatch.setenv("SLURM_ACCOUNT", "def-someone")
    beluga = compose_launcher("+experiment=mixtral_vs_llama", "hydra/launcher=beluga")
    assert (beluga.gpus_per_node, beluga.cpus_per_task, beluga.mem_gb) == (4, 40, 186)
    assert beluga.account == "def-someone" and beluga.max_num_timeout > 0  # requeued on a timeout too
    assert any("HF_HUB_OFFLINE=1" in line and "WANDB_MODE=offline" in line for line in beluga.setup)
    narval = compose_launcher("hardware=a100_40gb", "hydra/launcher=narval")
    assert (narval.gpus_per_node, narval.cpus_per_task, narval.mem_gb) == (4, 48, 498)
    local = compose_launcher("hydra/launcher=slurm_local")
    assert (local.partition, local.cpus_per_task, local.gpus_per_node) == ("debug", 1, None)
    assert local.max_num_timeout > 0


def test_a_gpu_profile_on_cpu_hardware_is_one_line_before_submitting(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "expertchat", "-m", "reward.zeta=0.0,1.0", "hydra/launcher=beluga",
                           f"hydra.sweep.dir={tmp_path}/sweep"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{_fake_slurm(tmp_path)}:{os.environ['PATH']}"})
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "expertchat: error: hydra/launcher=beluga asks Slurm for the GPUs, CPUs and memory of `hardware`, but "
        "hardware=cpu has no GPU: add the hardware of the cluster's nodes, e.g. hardware=beluga")
    assert not (tmp_path / "sweep").exists()


def _fake_slurm(tmp_path: Path) -> Path:
    """sbatch and squeue that answer (nothing is submitted in these tests)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "squeue"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_the_gpu_check_scripts_parse_and_pass_shellcheck(script):
    """launchers/gpu_check.sh runs where no one watches (a lent GPU machine, no network): it must at least parse,
    and pass shellcheck where shellcheck is installed."""
    import shutil

    proc = subprocess.run(["bash", "-n", str(LAUNCHERS / script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(LAUNCHERS / script)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout
