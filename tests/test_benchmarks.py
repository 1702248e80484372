"""The benchmarks' shared parts: the llama.cpp column survives a build that dies (SIGILL) in its own process, and
the machine's matmul rates and roofline fractions."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"
sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402

FAKE_LLAMA_CPP = '''
import os, signal
__version__ = "0.0-fake"
def llama_print_system_info():
    return b"CPU : AVX512 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 |"
class Llama:
    def __init__(self, **kwargs):
        pass
    def create_completion(self, prompt, **kwargs):
        if os.environ.get("FAKE_LLAMA_CRASH"):
            os.kill(os.getpid(), signal.SIGILL)  # what an AMX build does on a VM that does not allow AMX
        return {"usage": {"completion_tokens": 3}, "choices": [{"text": " fine.", "finish_reason": "stop"}]}
'''


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    (tmp_path / "llama_cpp").mkdir()
    (tmp_path / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA_CPP)
    return str(tmp_path)


@pytest.mark.e2e
@pytest.mark.parametrize("crash", [True, False])
def test_the_llamacpp_column_survives_an_illegal_instruction_and_says_which_build_ran(fake_site, monkeypatch, crash):
    import bench_dialogue

    from expertchat.config.schema import DialogueConfig, GenerationConfig

    if crash:
        monkeypatch.setenv("FAKE_LLAMA_CRASH", "1")
    else:
        monkeypatch.delenv("FAKE_LLAMA_CRASH", raising=False)
    out = bench_dialogue.llamacpp_column(["tides"], DialogueConfig(turns=2), GenerationConfig(max_new_tokens=4),
                                         fake_site)
    assert out["llama_cpp_python"] == "0.0-fake" and "AMX_INT8 = 1" in out["system_info"]
    if crash:
        assert out["failed"] == "killed by SIGILL (Illegal instruction)" and "tok_s" not in out
    else:
        assert "failed" not in out and out["tok_s"] > 0


def test_a_missing_llamacpp_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    import bench_dialogue

    from expertchat.config.schema import DialogueConfig, GenerationConfig

    monkeypatch.setattr(bench_dialogue.subprocess, "run", lambda *a, **k: dataclasses.make_dataclass(
        "P", ["returncode", "stdout", "stderr"])(1, "", "ModuleNotFoundError: No module named 'llama_cpp'\n"))
    out = bench_dialogue.llamacpp_column(["t"], DialogueConfig(turns=1), GenerationConfig(), str(tmp_path))
    assert out == {"failed": "ModuleNotFoundError: No module named 'llama_cpp'"}


def test_matmul_rates_and_roofline_fractions():
    assert benchlib.matmul_gflops(torch.float32, 64, 64, 64, seconds=0.05) > 0
    assert benchlib.roofline_fraction(100.0, 135_000_000, 270.0) == 0.1  # 100 tok/s x 0.27 GFLOP / 270 GFLOP/s
    assert benchlib.roofline_fraction(None, 1, 1.0) is None and benchlib.roofline_fraction(1.0, 1, 0.0) is None
    m = benchlib.machine()
    assert m["cpu"] and m["threads"] >= 1 and isinstance(m["cpu_flags"], list)
