"""Every conf group option composes onto the typed schema; bad values fail with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from expertchat.config import ExpertChatConfig, register, to_config
from expertchat.errors import ExpertChatError

CONF = Path(__file__).resolve().parents[1] / "conf"
register()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(*overrides: str) -> ExpertChatConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.run_dir = "."
    return to_config(cfg)


def test_default_config_is_the_embedded_cpu_experiment():
    cfg = compose_cfg()
    assert cfg.actor.name == cfg.judge.name == "smollm2_135m"
    assert cfg.topics.n >= 8 and cfg.dialogue.turns >= 4
    assert len(cfg.topics.items) >= 24
    assert cfg.dialogue.actor_persona != cfg.dialogue.judge_persona


@pytest.mark.parametrize("role", ["actor", "judge"])
@pytest.mark.parametrize("name", options("model"))
def test_every_model_composes_in_both_roles(role, name):
    cfg = compose_cfg(f"model@{role}={name}")
    assert getattr(cfg, role).name == name


@pytest.mark.parametrize("group", ["generation", "topics", "dialogue"])
def test_every_option_of_every_group_composes(group):
    assert options(group), f"conf/{group} is empty"
    for name in options(group):
        compose_cfg(f"{group}={name}")


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_validates(name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_"), "experiment files must be global packages"
    assert "python -m expertchat" in text.splitlines()[1], "second line gives the command that runs it"
    compose_cfg(f"+experiment={name}")


def test_experiment_overrides_primary_config():
    cfg = compose_cfg("+experiment=smoke")
    assert (cfg.topics.n, cfg.dialogue.turns, cfg.generation.max_new_tokens) == (2, 2, 8)


def test_contrastive_generation_group():
    cfg = compose_cfg("generation=contrastive")
    assert cfg.generation.strategy == "contrastive" and cfg.generation.top_k >= 1


@pytest.mark.parametrize(
    "override, key",
    [
        ("dialogue.turns=0", "dialogue.turns"),
        ("dialogue.turns=-3", "dialogue.turns"),
        ("topics.n=0", "topics.n"),
        ("generation.temperature=0", "generation.temperature"),
        ("generation.top_p=1.5", "generation.top_p"),
        ("generation.strategy=beam", "generation.strategy"),
        ("actor.dtype=int3", "dtype"),
        ("rounds=0", "rounds"),
        ("dialogue.opening='{subject}'", "dialogue.opening"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ExpertChatError, match=key.replace(".", r"\.")) as info:
        compose_cfg(override)
    assert "\n" not in str(info.value)


def test_wrong_type_is_rejected_at_composition():
    with pytest.raises(Exception, match="turns"):
        compose_cfg("dialogue.turns=many")


def test_unknown_key_is_rejected_at_composition():
    with pytest.raises(Exception, match="temprature"):
        compose_cfg("generation.temprature=1.0")
