"""Every conf group option composes onto the typed schema, and says each value once; bad values fail with one line
naming the key."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import yaml

from expertchat.config.schema import (
    DialogueConfig,
    EvaluationConfig,
    GenerationConfig,
    HardwareConfig,
    JudgingConfig,
    ModelConfig,
    RewardConfig,
    RubricCategory,
    TopicsConfig,
    TrackerConfig,
    TrainingConfig,
    register,
)
from expertchat.errors import ExpertChatError
from tests.conftest import CONF, compose_cfg

register()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_config_is_the_embedded_cpu_experiment():
    cfg = compose_cfg()
    assert cfg.actor.name == cfg.judge.name == "smollm2_135m"
    assert cfg.topics.n >= 8 and cfg.dialogue.turns >= 4
    assert len(cfg.topics.items) >= 24
    assert cfg.dialogue.actor_persona != cfg.dialogue.judge_persona


SCHEMA = {"generation": GenerationConfig, "topics": TopicsConfig, "dialogue": DialogueConfig,
          "training": TrainingConfig, "tracker": TrackerConfig, "judging": JudgingConfig, "reward": RewardConfig,
          "model": ModelConfig, "hardware": HardwareConfig, "evaluation": EvaluationConfig}


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a.b": value}`` for every leaf of a nested dict (an empty dict or list is a leaf)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("group", sorted(SCHEMA))
def test_option_files_hold_only_what_they_change(group):
    """The one-home rule (README, Configuration): every default lives in the schema; an option file writes a key
    only to change it. A rubric category an option adds is compared with the schema's category defaults."""
    schema = leaves(asdict(SCHEMA[group]()))
    new_category = asdict(RubricCategory())  # a category the schema's rubric does not have
    for name in options(group):
        values = leaves(yaml.safe_load((CONF / group / f"{name}.yaml").read_text()) or {})
        for key, value in values.items():
            assert key in schema or key.startswith("rubric."), f"conf/{group}/{name}.yaml: {key} is not in the schema"
            default = schema[key] if key in schema else new_category.get(key.rpartition(".")[2])
            assert value != default, f"conf/{group}/{name}.yaml: {key}: {value!r} restates the schema default"


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_files_hold_only_what_they_change(name):
    default = leaves(asdict(compose_cfg()))
    text = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text())
    for key, value in leaves({k: v for k, v in text.items() if k != "defaults"}).items():
        assert default.get(key) != value, f"conf/experiment/{name}.yaml: {key}: {value!r} restates the default"


def test_the_default_composition_is_the_schema():
    """What users run by default is what ``JudgingConfig()``, ``TrainingConfig()``, ... say: tests that build the
    dataclasses by hand check the configuration that ships."""
    cfg = compose_cfg()
    assert (cfg.judging, cfg.training, cfg.dialogue, cfg.reward, cfg.tracker, cfg.evaluation) == (
        JudgingConfig(), TrainingConfig(), DialogueConfig(), RewardConfig(), TrackerConfig(), EvaluationConfig())
    assert cfg.generation == GenerationConfig(**yaml.safe_load((CONF / "generation" / "high_temp.yaml").read_text()))
    assert (cfg.rounds, cfg.seed, cfg.mode, cfg.topics.n) == (1, 0, "run", 8)


@pytest.mark.parametrize("role", ["actor", "judge"])
@pytest.mark.parametrize("name", options("model"))
def test_every_model_composes_in_both_roles(role, name):
    cfg = compose_cfg(f"model@{role}={name}")
    assert getattr(cfg, role).name == name


@pytest.mark.parametrize("group", ["generation", "topics", "dialogue", "training", "tracker", "judging", "reward",
                                   "hardware"])
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
        ("training.steps=-1", "training.steps"),
        ("training.tie_tolerance=-0.1", "training.tie_tolerance"),
        ("training.loss_type=hinge", "training.loss_type"),
        ("training.method=qlora", "training.method"),
        ("tracker.backend=mlflow", "tracker.backend"),
        ("reward.zeta=1.5", "reward.zeta"),
        ("reward.zeta=-0.1", "reward.zeta"),
        ("reward.empty_wim_similarity=2", "reward.empty_wim_similarity"),
        ("judging.wim=false", "judging.wim"),  # with reward.zeta 0.4: the WIM part would silently be 0
        ("judging.rubric.depth.weight=-1", "judging.rubric.depth.weight"),
        ("judging.rubric.knowledge.signal=vibes", "judging.rubric.knowledge.signal"),
        ("judging.mode=vote", "judging.mode"),
        ("judging.on_parse_failure=zero", "judging.on_parse_failure"),
        ("judging.neutral_score=11", "judging.neutral_score"),
        ("judging.prompt='{question}'", "judging.prompt"),
        ("judging.turing.question='Who wrote it? {who}'", "judging.turing.question"),
        ("judging.turing.question='Human or AI?'", "judging.turing.question"),  # neither {a} nor {b}
        ("judging.turing.ai='a human expert'", "judging.turing.human"),
        ("judging.turing.prefix=' '", "judging.turing.prefix"),
        ("mode=rate", "rate.input"),
        ("mode=judge", "mode"),
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


def test_full_fine_tuning_has_no_base_reference():
    with pytest.raises(ExpertChatError, match=r"training\.reference"):
        compose_cfg("training.method=full", "training.reference=base")


def test_training_and_tracker_defaults_fit_the_cpu_budget():
    cfg = compose_cfg()
    assert cfg.tracker.backend == "none"
    assert cfg.training.bidirectional and cfg.training.method == "lora" and cfg.training.reference == "previous"
    assert 0 < cfg.training.steps <= 8 and not cfg.training.gradient_checkpointing


def test_judging_and_reward_presets():
    cfg = compose_cfg()
    assert cfg.judging.mode == "expected" and cfg.reward.zeta == 0.4 and cfg.reward.empty_wim_similarity == 1.0
    assert {"knowledge", "depth", "human_expert_likeness"} <= set(cfg.judging.rubric)
    assert {c.signal for c in cfg.judging.rubric.values()} == {"likelihood", "rubric"}  # the small-judge default
    assert {c.signal for c in compose_cfg("judging=rubric").judging.rubric.values()} == {"rubric"}
    assert compose_cfg("judging=parse").judging.mode == "parse"
    assert compose_cfg("reward=rating_only").reward.zeta == 0.0 and compose_cfg("reward=wim_only").reward.zeta == 1.0
    rate = compose_cfg("mode=rate", "rate.input=x.jsonl").rate
    assert (rate.question_field, rate.answer_field, rate.id_field) == ("question", "answer", "id")


def test_two_likelihood_categories_warn_and_the_default_does_not():
    """The likelihood does not read the category: two weighted likelihood categories are one number twice."""
    assert compose_cfg().judging.same_signal_warning() is None
    doubled = compose_cfg("judging.rubric.depth.weight=1.0", "judging.rubric.depth.signal=likelihood").judging
    assert "knowledge and depth" in doubled.same_signal_warning() and "67%" in doubled.same_signal_warning()
    assert compose_cfg("judging=rubric").judging.same_signal_warning() is None
    turing = compose_cfg("judging.rubric.human_expert_likeness.signal=turing").judging
    assert turing.rubric["human_expert_likeness"].signal == "turing" and turing.same_signal_warning() is None
    twice = compose_cfg("judging.rubric.human_expert_likeness.signal=turing", "judging.rubric.knowledge.signal=turing")
    assert "knowledge and human_expert_likeness all read the turing signal" in twice.judging.same_signal_warning()


def test_hardware_profiles_and_the_flagships_choice(monkeypatch):
    """The default is this machine without a GPU; +experiment=mixtral_vs_llama picks the Beluga node and reads the
    model folders from the environment (compute nodes have no internet), else the hub ids."""
    assert compose_cfg().hardware == HardwareConfig() and HardwareConfig().gpus == 0
    cfg = compose_cfg("+experiment=mixtral_vs_llama")
    assert (cfg.hardware.name, cfg.hardware.gpus, cfg.hardware.compute_capability) == ("beluga", 4, 7.0)
    assert cfg.actor.path == cfg.actor.hub_id == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    monkeypatch.setenv("MIXTRAL_PATH", "/project/models/Mixtral-8x7B-Instruct-v0.1")
    monkeypatch.setenv("LLAMA3_8B_PATH", "/project/models/Meta-Llama-3-8B-Instruct")
    cfg = compose_cfg("+experiment=mixtral_vs_llama")
    assert (cfg.actor.path, cfg.judge.path) == ("/project/models/Mixtral-8x7B-Instruct-v0.1",
                                                "/project/models/Meta-Llama-3-8B-Instruct")
    assert compose_cfg("+experiment=mixtral_vs_llama", "actor.path=/elsewhere").actor.path == "/elsewhere"
    assert compose_cfg("hardware=a100_40gb").hardware.compute_capability == 8.0


@pytest.mark.parametrize("override, key", [
    ("actor.dtype=bfloat16", "actor.dtype"),
    ("judge.dtype=bfloat16", "judge.dtype"),
    ("actor.bnb_4bit_compute_dtype=bfloat16", "actor.bnb_4bit_compute_dtype"),
    ("judge.attn_implementation=flash_attention_2", "judge.attn_implementation"),
])
def test_a_v100_has_no_bf16_and_no_flash_attention(override, key):
    """Compute capability 7.0: a bf16 or FlashAttention 2 setting is one line naming the key; on an A100 (8.0)
    and on the CPU profile (no GPU: the run itself decides) the same settings compose."""
    with pytest.raises(ExpertChatError, match=key.replace(".", r"\.")) as info:
        compose_cfg("+experiment=mixtral_vs_llama", override)
    assert "\n" not in str(info.value) and "V100" in str(info.value)
    compose_cfg("+experiment=mixtral_vs_llama", "hardware=a100_40gb", override)
    compose_cfg(override)


def test_attention_implementation_is_checked():
    with pytest.raises(ExpertChatError, match="attn_implementation"):
        compose_cfg("actor.attn_implementation=flash")
    assert compose_cfg("actor.attn_implementation=eager").actor.attn_implementation == "eager"


@pytest.mark.parametrize("overrides, message", [
    (["seed=-1"], r"^config error: seed is -1; seeds must lie in 0\.\.4294967295"),
    # round 1's training seed would be seed + 1001 > 2**32 - 1: refused at start, not after round 0
    (["seed=4294966296", "rounds=2"], r"seed is 4294966296; .* so use 0 <= seed <= 4294966292"),
    (["evaluation.seed=-5"], r"evaluation\.seed is -5; sample s draws with evaluation\.seed \+ s"),
    (["evaluation.strategy=sample", "evaluation.samples=3", "evaluation.seed=4294967294"], r"evaluation\.seed is"),
])
def test_seeds_the_run_derives_are_checked_at_start(overrides, message):
    with pytest.raises(ExpertChatError, match=message):
        compose_cfg(*overrides)


def test_the_largest_usable_seed_is_accepted():
    assert compose_cfg("seed=4294966292", "rounds=2", "dialogue.turns=4").seed == 4294966292
    assert compose_cfg("seed=4294967292", "dialogue.turns=4").seed == 4294967292
