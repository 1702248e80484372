"""Placement without weights: per-GPU budgets, accelerate's device map of the meta model under them (4-bit weights
at 4 bits), offload found before anything loads, and the GPUs a plan needs checked on this machine."""

from __future__ import annotations

import pytest
import torch

from expertchat.config.schema import HardwareConfig, ModelConfig
from expertchat.engine import placement
from expertchat.engine.architecture import shape
from expertchat.errors import ExpertChatError

MIXTRAL = ModelConfig(name="mixtral", path="mistralai/Mixtral-8x7B-Instruct-v0.1", load_in_4bit=True)
GB = 1e9


def _nf4_weights(cfg: ModelConfig) -> float:
    s = shape(cfg)
    return s.quantized * 0.516 + (s.params - s.quantized) * 2


def test_budgets_spread_the_weights_plus_one_layer_and_keep_the_cpu_out():
    assert placement.budgets(8e9, 0.5e9, 4) == {0: int(2.5e9), 1: int(2.5e9), 2: int(2.5e9), 3: int(2.5e9), "cpu": 0}


def test_mixtral_in_4_bit_spreads_over_four_v100s_without_offload():
    weights = _nf4_weights(MIXTRAL)
    dmap = placement.device_map(MIXTRAL, "float16", placement.budgets(weights, weights / 32, 4))
    assert not placement.offloaded(dmap) and set(dmap.values()) == {0, 1, 2, 3}
    layers = [k for k in dmap if k.startswith("model.layers.")]
    assert len(layers) == 32  # whole decoder layers, never split
    # sized in 4 bit: 16-bit weights (93 GB) under the same budgets would not fit on four GPUs
    sixteen = placement.device_map(MIXTRAL.__class__(**{**MIXTRAL.__dict__, "load_in_4bit": False}), "float16",
                                   placement.budgets(weights, weights / 32, 4))
    assert placement.offloaded(sixteen)


def test_a_budget_too_small_is_found_as_offload_before_loading():
    dmap = placement.device_map(MIXTRAL, "float16", {0: int(16.9 * GB), "cpu": 0})
    off = placement.offloaded(dmap)
    assert off and "lm_head" in off and "disk:" in placement.describe(dmap)


def test_check_gpus_names_what_this_machine_lacks(monkeypatch):
    beluga = HardwareConfig(name="beluga", gpus=4, gpu_memory_gb=16.9, gpu_name="V100", compute_capability=7.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExpertChatError, match=r"hardware=beluga plans 4 GPU\(s\) and this machine has no CUDA"):
        placement.check_gpus(beluga)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ExpertChatError, match="plans 4 GPUs and this job sees 2"):
        placement.check_gpus(beluga)
