"""``python -m expertchat`` as a user runs it: a real smoke experiment, and bad input as one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.e2e  # every test here runs the CLI in a subprocess


def test_smoke_loop_with_a_tiny_mixtral_actor_and_a_tiny_llama_judge(smol_tokenizer, tmp_path):
    """Two architectures, two chat templates (Mixtral's has no system role; Llama-3's ends turns with <|eot_id|>):
    the whole smoke loop, LoRA on attention and Mixtral's per-expert w1/w2/w3."""
    from tests.conftest import DATA, make_tiny_model, save_tiny_mixtral

    templates = {name: json.loads((DATA / "chat_templates" / f"{name}.json").read_text())["chat_template"]
                 for name in ("mixtral_8x7b_instruct", "llama3_8b_instruct")}
    save_tiny_mixtral(smol_tokenizer, tmp_path / "mixtral")
    make_tiny_model(smol_tokenizer, seed=1).save_pretrained(tmp_path / "llama")
    smol_tokenizer.save_pretrained(tmp_path / "llama")
    out = tmp_path / "run"
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={out}",
                   f"actor.path={tmp_path / 'mixtral'}", "actor.package=null", "actor.gguf_file=null",
                   "actor.name=tiny_mixtral", "actor.dtype=float32",
                   f"+actor.chat_template={json.dumps(templates['mixtral_8x7b_instruct'])}",
                   f"judge.path={tmp_path / 'llama'}", "judge.package=null", "judge.gguf_file=null",
                   "judge.name=tiny_llama", "judge.dtype=float32",
                   f"+judge.chat_template={json.dumps(templates['llama3_8b_instruct'])}",
                   "training.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,w1,w2,w3]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "turns.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"tiny_mixtral", "tiny_llama"}
    adapter = json.loads((out / "adapters" / "round_0" / "actor" / "adapter_config.json").read_text())
    assert {"w1", "w2", "w3", "q_proj"} <= set(adapter["target_modules"]) and not adapter.get("target_parameters")
    assert (out / "adapters" / "round_0" / "judge" / "adapter_config.json").exists()


def test_smoke_experiment_runs_the_whole_loop(tmp_path):
    """dialogue -> rating -> training -> saved adapters through the CLI, on the embedded SmolLM2; a rerun into
    the same folder resumes and duplicates nothing."""
    out = tmp_path / "run"
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "turns.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2
    assert {(r["dialogue_id"], r["turn"]) for r in rows} == {(f"r0-d00{i}", t) for i in range(2) for t in range(2)}
    assert all(r["model"] == "smollm2_135m" and r["new_tokens"] <= 8 and r["text"] for r in rows)
    assert len(list((out / "dialogues").glob("*.md"))) == 2
    assert json.loads((out / "topics.json").read_text())[0].startswith("How CRISPR")
    # every turn rated by the other model, with every component of the reward
    ratings = [json.loads(line) for line in (out / "ratings.jsonl").read_text().splitlines()]
    assert sorted((r["ratee"], r["rater"]) for r in ratings) == [("actor", "judge")] * 2 + [("judge", "actor")] * 2
    assert all(-1 <= r["reward"] <= 1 and 1 <= r["score"] <= 10 and r["similarity_status"] for r in ratings)
    # one DPO step per model, adapters saved and loadable, the mean reward per round per model kept
    for role in ("actor", "judge"):
        assert (out / "adapters" / "round_0" / role / "adapter_config.json").exists()
    assert {r["model"] for r in json.loads((out / "rewards_by_round.json").read_text())} == {"actor", "judge"}
    assert {s for s in ("dialogue", "rating", "training") if (out / "stages" / f"round_0.{s}.json").exists()} == {
        "dialogue", "rating", "training"}
    status = json.loads((out / "status.json").read_text())  # every job says how it ended (jobs.py)
    assert status["status"] == "done" and status["error"] is None and status["threads"] >= 1
    assert status["overrides"] == ["+experiment=smoke"]  # the task's overrides; hydra.run.dir is Hydra's
    # a tiny evaluation of both models before round 0 and after it, on held-out topics, by the frozen base judge
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert sorted(str(r["round"]) for r in evals) == ["0"] * 4 + ["base"] * 4 and all(r["tokens"] <= 8 for r in evals)
    assert json.loads((out / "stages/round_0.evaluation.json").read_text())["models"]["judge"]["delta_vs_base"]
    report = (out / "report.md").read_text()  # every run ends with its report
    assert "**State: done**" in report and "## Ratings per round and model" in report and "## Training" in report
    assert {p.name for p in (out / "plots").glob("*.png")} >= {"training.png", "length.png", "rating_categories.png"}
    files = {name: (out / name).read_text()
             for name in ("turns.jsonl", "ratings.jsonl", "train_metrics.jsonl", "eval.jsonl")}
    # rerunning into the same folder resumes: nothing is regenerated or duplicated
    again = run_cli("+experiment=smoke", f"hydra.run.dir={out}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {name: (out / name).read_text() for name in files} == files
    # the console: the key choices first, one summary block last, the log file named after the app
    first = proc.stderr.splitlines()[0] if proc.stderr.strip() else proc.stdout.splitlines()[0]
    assert "ExpertChat mode=run in" in first and "+experiment=smoke" in first
    assert "run folder" in (proc.stdout + proc.stderr).splitlines()[-2] and (out / "expertchat.log").exists()
    assert "nothing left to do" in again.stdout + again.stderr and "loaded smollm2_135m" not in again.stdout
    # a changed config is refused in one line; resume=force goes on and says so in the folder
    changed = run_cli("+experiment=smoke", f"hydra.run.dir={out}", "seed=1")
    assert changed.returncode == 2 and "seed (0 -> 1)" in changed.stderr and "resume=force" in changed.stderr
    refused = json.loads((out / "status.json").read_text())
    assert refused["status"] == "failed" and "seed (0 -> 1)" in refused["error"]
    forced = run_cli("+experiment=smoke", f"hydra.run.dir={out}", "seed=1", "resume=force")
    assert forced.returncode == 0 and json.loads((out / "resumes.jsonl").read_text())["changed"]["seed"] == [0, 1]


@pytest.mark.parametrize("args, expected", [
    (["generation=greedy"], "unknown option 'greedy' for config group 'generation' (choose from: contrastive, "
                            "high_temp)"),
    (["model@actor=gpt5"], "unknown option 'gpt5' for config group 'model'"),
    (["dialogue.turns=abc"], "dialogue.turns"),
    (["dialogue.turns=0"], "dialogue.turns is 0; it must be > 0"),
    (["generation.temprature=2"], "temprature"),
    (["topics=jsonl"], "topics.path is not set"),
    (["topics=jsonl", "topics.path=/nonexistent/t.jsonl"], "topics file not found: /nonexistent/t.jsonl"),
    (["topics.items=[]"], "no topics found in topics.items"),
    (["actor.path=/nonexistent/model", "actor.package=null", "actor.gguf_file=null"],
     "no model folder at /nonexistent/model"),
    (["training.lora_r=16"], "training.lora_r was renamed to training.lora.r: use training.lora.r=16"),
    (["judging.parse_max_new_tokens=64"], "judging.parse_max_new_tokens was renamed to judging.parse.max_new_tokens"),
])
def test_bad_input_is_one_line_and_keeps_the_run_folder(tmp_path, args, expected):
    out = tmp_path / "run"
    out.mkdir()
    (out / "turns.jsonl").write_text('{"round": 0}\n')
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={out}", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("expertchat: error: "), proc.stderr[-2000:]
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert (out / "turns.jsonl").read_text() == '{"round": 0}\n'


def test_missing_field_in_mt_bench_names_the_field(tmp_path):
    data = ROOT / "tests" / "data" / "mt_bench_questions.jsonl"
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={tmp_path}", "topics=jsonl", f"topics.path={data}",
                   "topics.field=question")
    assert proc.returncode == 2
    assert "mt_bench_questions.jsonl:1: no field 'question'" in proc.stderr


def test_full_error_shows_the_traceback(tmp_path):
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={tmp_path}", "dialogue.turns=0",
                   env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_a_built_wheel_installs_and_runs_the_smoke_experiment(tmp_path):
    """`pip install` of a wheel (not the editable checkout) is a working program: the configs ship inside the
    package and the `expertchat` console script runs. The fresh venv sees the dependencies already installed in
    this one through a .pth file, so nothing is downloaded; the wheel itself is installed without them."""
    import sysconfig
    import venv

    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = wheels.glob("expertchat-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=600)
    installed = subprocess.run([str(py), "-c", "import expertchat, pathlib; print(pathlib.Path(expertchat.__file__))"],
                               capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    assert installed.startswith(str(env_dir)), installed  # the wheel's copy, not the checkout
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [str(env_dir / "bin" / "expertchat"), "+experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "stages" / "round_0.training.json").exists()
    assert (tmp_path / "run" / "adapters" / "round_0" / "actor" / "README.md").exists()


def readme_commands() -> list[str]:
    """The README's ``python -m expertchat`` commands, continuation lines joined and comments cut."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.startswith("python -m expertchat")]


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_parses_as_printed(command):
    """Each command of the README, typed in bash exactly as printed (its quoting included), composes: Hydra
    parses every override and the config validates (``--cfg job`` prints it instead of running)."""
    import re

    args = command.removeprefix("python -m expertchat")
    if " -m " in args:  # a sweep: --cfg cannot go with --multirun; check its first job's composition
        args = re.sub(r"=([^ ,]+),[^ ]+", r"=\1", args.replace(" -m ", " ", 1))
    shell = f"{sys.executable} -m expertchat{args} --cfg job"
    proc = subprocess.run(["bash", "-c", shell], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_unquoted_value_names_the_override_and_how_to_quote_it(tmp_path):
    proc = run_cli(f"hydra.run.dir={tmp_path}", "topics=jsonl", "topics.field=turns[0]")
    assert proc.returncode == 2 and "cannot parse the override 'topics.field=turns[0]'" in proc.stderr
    assert "\"topics.field='turns[0]'\"" in proc.stderr
    proc = run_cli(f"hydra.run.dir={tmp_path}", "experiment=smoke")
    assert proc.returncode == 2 and "use +experiment=smoke" in proc.stderr


def test_secrets_from_the_environment_reach_no_output_file(tmp_path):
    """W&B keys and HF tokens come from the environment only: none of a run's files (configs, logs, records,
    the offline W&B run) holds them."""
    secrets = {"WANDB_API_KEY": "wandb-secret-7f3a9c1e5b2d4f6a8c0e2b4d6f8a0c2e4b6d8f0a",
               "HF_TOKEN": "hf_SecretTokenXq9Zr7Lp5Mn3Kb1Vc8Wd6Ye4", "HUGGING_FACE_HUB_TOKEN": "hf_OtherSecretAb12Cd34"}
    out = tmp_path / "run"
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={out}", "tracker=wandb",
                   env={**secrets, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((out / "wandb").glob("offline-run-*")), "the offline W&B run is in the run folder"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in data, f"{name} found in {path.relative_to(out)}"
    for name, value in secrets.items():
        assert value not in proc.stdout + proc.stderr, f"{name} printed"


def test_a_read_only_run_folder_is_one_line(tmp_path):
    """A run folder on a read-only file system: one line naming it, not a traceback from Hydra's log handler."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        proc = run_cli("+experiment=smoke", f"hydra.run.dir={ro / 'run'}")
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert f"cannot write {ro / 'run'}: Read-only file system" in lines[0]


def test_a_run_folder_that_needs_quoting_lands_where_said_and_a_refused_one_creates_nothing(tmp_path):
    """The case run-dir-quoted-nonascii: a folder with a space and non-ASCII letters, quoted for Hydra as the error
    says, holds the run and nothing else appears anywhere (not in the current directory); refused commands (an
    unquoted value, a sweep value in a single run, a read-only place) leave no empty run folder behind."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for args in ([f"hydra.run.dir={tmp_path}/a/run dir é"], [f"hydra.run.dir={tmp_path}/b", "reward.zeta=0,4"],
                 [f"hydra.run.dir={tmp_path}/c", "generation.temperature=0"]):
        proc = run_cli("+experiment=smoke", *args, cwd=cwd)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "quote its value" in run_cli("+experiment=smoke", f"hydra.run.dir={tmp_path}/a/run dir é", cwd=cwd).stderr
    assert "a number takes a decimal point (reward.zeta=0.4)" in \
        run_cli("+experiment=smoke", "reward.zeta=0,4", cwd=cwd).stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]
    quoted = tmp_path / "q" / "run dir é"
    proc = run_cli("+experiment=smoke", "mode=plan", f"hydra.run.dir='{quoted}'", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (quoted / "status.json").exists() and (quoted / ".hydra" / "config.yaml").exists()
    assert list(cwd.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "q"]
