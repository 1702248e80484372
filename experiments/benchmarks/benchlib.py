"""What the benchmark scripts share: alternating the compared paths, medians, the machine's load, which CPU and
kernels ran, and the machine's measured matmul rates (the roofline a stage's throughput is a fraction of).

A shared machine's load changes within a run. Each path is run once per repeat, in the order A, B, C, A, B, C,
...; a change in load then hits every path, and the ratio of the medians stays meaningful.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def alternate(paths: dict[str, Callable[[], dict[str, Any]]], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """Run every path once per repeat, in turn; each call returns a dict of figures. Progress goes to stderr."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    for rep in range(repeats):
        for name, run in paths.items():
            start = time.perf_counter()
            out = run()
            out.setdefault("seconds", time.perf_counter() - start)
            results[name].append(out)
            note(repeat=rep, path=name, load1=load(), **{k: v for k, v in out.items() if not isinstance(v, list)})
    return results


def median(runs: list[dict[str, Any]], key: str) -> float:
    """Median of ``key`` over the runs of one path."""
    return statistics.median(r[key] for r in runs)


def median_list(runs: list[dict[str, Any]], key: str) -> list[float]:
    """Element-wise median of a list figure (e.g. per-turn step times) over the runs of one path."""
    return [round(statistics.median(values), 3) for values in zip(*(r[key] for r in runs))]


def load() -> float:
    """The 1-minute load average (``uptime``)."""
    return round(os.getloadavg()[0], 2)


def note(**kwargs: Any) -> None:
    print(json.dumps(kwargs, default=str), file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """The CPU's model name, the vector/matrix extensions it advertises (``/proc/cpuinfo`` flags among avx2,
    avx512f, avx512_bf16, avx512_vnni, amx_*), the kernels torch dispatches to (its CPU capability) and threads."""
    import torch

    name, flags = platform.processor() or "unknown", set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return {"cpu": name, "cpu_flags": [f for f in wanted if f in flags], "torch_cpu_capability": capability,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def matmul_gflops(dtype: Any, m: int, k: int, n: int, seconds: float = 0.5) -> float:
    """Measured GFLOP/s of ``[m, k] @ [k, n]`` in ``dtype`` on the CPU: the best of 5 timed batches of repeats,
    each about ``seconds / 5`` long (2 m k n FLOPs per product)."""
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b  # warm-up (allocations, kernel selection)
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 10:
        a @ b
        reps += 1
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - start) / reps)
    return round(2 * m * k * n / best / 1e9, 1)


def roofline() -> dict[str, float]:
    """The machine's measured matmul rates (GFLOP/s): bf16 and fp32 at a large square shape (1024^3: the peak a
    stage could reach) and at a batch-32 decode shape of SmolLM2-135M (``[32, 576] @ [576, 1536]``)."""
    import torch

    return {"bf16_gflops": matmul_gflops(torch.bfloat16, 1024, 1024, 1024),
            "fp32_gflops": matmul_gflops(torch.float32, 1024, 1024, 1024),
            "bf16_decode32_gflops": matmul_gflops(torch.bfloat16, 32, 576, 1536),
            "fp32_decode32_gflops": matmul_gflops(torch.float32, 32, 576, 1536)}


def roofline_fraction(tok_s: float | None, params: int, peak_gflops: float) -> float | None:
    """The share of ``peak_gflops`` a throughput of ``tok_s`` tokens/s uses at 2 FLOPs per parameter per token
    (the matmuls of a decoder forward; the tied LM head counts as the embedding's parameters; attention over the
    cache is left out, so the figure is a lower bound)."""
    if not tok_s or not peak_gflops:
        return None
    return round(tok_s * 2 * params / 1e9 / peak_gflops, 4)
