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
    from expertchat.config import TrackerConfig
    from expertchat.tracking import make_tracker

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
