"""Every user-facing error is one line that names the key or path and the fix, before anything is written: the
overrides people type, checked as the CLI checks them (preflight, then the mode's own check)."""

from __future__ import annotations

import importlib
import json

import pytest

from expertchat import __main__ as cli
from expertchat.config.schema import MODES
from expertchat.errors import ExpertChatError
from tests.conftest import compose_cfg


def error_line(tmp_path, capsys, *overrides: str) -> str:
    """The one line the CLI would print for ``overrides`` (empty when they pass every check)."""
    try:
        cli.check_renamed(list(overrides))
        cli.preflight(list(overrides))
        cfg = compose_cfg(*overrides)
        cfg.run_dir = str(tmp_path / "run")
        importlib.import_module(MODES[cfg.mode]).check(cfg)
    except SystemExit as exc:
        assert exc.code == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("expertchat: error: "), lines
        return lines[0]
    except ExpertChatError as exc:
        assert "\n" not in str(exc)
        return f"expertchat: error: {exc}"
    return ""


CASES = [
    (["generation=greedy"], "unknown option 'greedy' for config group 'generation' (choose from: contrastive"),
    (["model@actor=gpt5"], "unknown option 'gpt5' for config group 'model'"),
    (["+experiment=nope"], "unknown option 'nope' for config group 'experiment'"),
    (["hydra/launcher=nope"], "unknown option 'nope' for config group 'hydra/launcher'"),
    (["experiment=smoke"], "use +experiment=smoke"),
    (["dialogue.turns=abc"], "dialogue.turns"),
    (["dialogue.turns=0"], "dialogue.turns is 0; it must be > 0"),
    (["generation.temprature=2"], "temprature"),
    (["topics.field=turns[0]"], "cannot parse the override 'topics.field=turns[0]'"),
    (["reward.zeta=1.5"], "reward.zeta is 1.5; it must be in [0, 1]"),
    (["reward.zeta=-0.1"], "reward.zeta is -0.1"),
    (["reward.empty_wim_similarity=3"], "reward.empty_wim_similarity must be in [-1, 1]"),
    (["judging.rubric.knowledge.weight=-1"], "judging.rubric.knowledge.weight is -1.0; it must be >= 0"),
    (["judging.mode=guess"], "judging.mode is 'guess'"),
    (["judging.likelihood_scale=0"], "judging.likelihood_scale must be > 0"),
    (["generation.temperature=0"], "generation.temperature must be > 0"),
    (["generation.top_k=-1"], "generation.top_k must be >= 0"),
    (["generation.top_p=1.5"], "generation.top_p must be in (0, 1]"),
    (["generation.penalty_alpha=2"], "generation.penalty_alpha must be in [0, 1]"),
    (["generation=contrastive", "generation.top_k=0"], "generation.top_k must be >= 1 for contrastive search"),
    (["training.temperature=0"], "training.temperature must be > 0"),
    (["training.steps=-1"], "training.steps is -1"),
    (["training.lora.r=0"], "training.lora.r must be > 0"),
    (["training.lora_r=16"], "training.lora_r was renamed to training.lora.r"),
    (["training.method=full", "training.reference=base"], "training.reference =base needs training.method=lora"),
    (["rounds=0"], "rounds must be > 0"),
    (["topics.n=0"], "topics.n must be > 0"),
    (["mode=judge"], "mode is 'judge'; use one of run, rate"),
    (["mode=rate"], "rate.input is not set"),
    (["mode=rate", "rate.input=/nonexistent/answers.jsonl"], "rate.input not found: /nonexistent/answers.jsonl"),
    (["topics=jsonl"], "topics.path is not set"),
    (["topics=jsonl", "topics.path=/nonexistent/t.jsonl"], "topics file not found: /nonexistent/t.jsonl"),
    (["topics.items=[]"], "no topics found in topics.items"),
    (["actor.dtype=int8"], "dtype is 'int8'"),
    (["actor.path=/nonexistent/model", "actor.package=null", "actor.gguf_file=null"],
     "model 'smollm2_135m': no model folder at /nonexistent/model"),
    (["tracker.backend=mlflow"], "tracker.backend is 'mlflow'; use none or wandb"),
    (["dialogue.actor_persona='Expert on {field}'"], "dialogue.actor_persona may only use the {topic} placeholder"),
    (["resume=later"], "resume is 'later'; use auto or force"),
]
GPU_ONLY = [
    (["actor.load_in_4bit=true"], "actor.load_in_4bit=true needs a CUDA GPU"),
    (["judge.device=cuda"], "judge.device=cuda needs CUDA"),
    (["judge.device_map=cuda:0"], "judge.device_map=cuda:0 needs CUDA"),
]


@pytest.mark.parametrize("overrides, expected", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_bad_input_is_one_line_naming_the_key_and_the_fix(tmp_path, capsys, overrides, expected):
    line = error_line(tmp_path, capsys, *overrides)
    assert expected in line, line
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written


@pytest.mark.parametrize("overrides, expected", GPU_ONLY, ids=[" ".join(o) for o, _ in GPU_ONLY])
def test_gpu_only_settings_without_a_gpu_are_one_line(tmp_path, capsys, overrides, expected):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert expected in error_line(tmp_path, capsys, *overrides)


def test_a_local_dataset_that_fails_gives_its_real_cause(tmp_path, capsys):
    broken = tmp_path / "ds"
    broken.mkdir()
    (broken / "data.json").write_text("{not json")
    line = error_line(tmp_path, capsys, "topics=hf", f"topics.dataset={broken}")
    assert f"dataset at {broken}" in line and "could not be loaded" in line and "local cache" not in line


def test_the_table_covers_at_least_thirty_inputs():
    assert len(CASES) + len(GPU_ONLY) + 1 >= 30


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """ENOSPC while a stage writes: one line naming the file and the fix, exit 2 (not a traceback)."""
    import errno

    from omegaconf import OmegaConf

    from expertchat.modes import registry as modes

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ratings.jsonl"))

    monkeypatch.setattr(modes, "run", full)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = OmegaConf.structured(compose_cfg())
    cfg.run_dir = str(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.app.__wrapped__(cfg)
    line = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and line.count("\n") == 0
    assert f"cannot write {tmp_path / 'ratings.jsonl'}: No space left on device" in line
    assert json.loads((tmp_path / "status.json").read_text())["error"] == line.removeprefix("expertchat: error: ")
