"""The KV-cache machinery: the preallocated layer against transformers' DynamicLayer, and which layers a cache
swaps. (The judge's PrefixBatch is checked against plain forwards in tests/test_judging.py.)"""

from __future__ import annotations

import torch

from expertchat.kvcache import PreallocatedLayer, make_cache
from tests.conftest import make_tiny_model



def test_preallocated_layer_behaves_like_dynamic_layer():
    layer = PreallocatedLayer(capacity=2)
    k1, v1 = torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2, 4)
    k2, v2 = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    layer.update(k1, v1)
    keys, values = layer.update(k2, v2)  # past the capacity: the buffer grows
    assert torch.equal(keys, torch.cat([k1, k2], 2)) and torch.equal(values, torch.cat([v1, v2], 2))
    assert layer.get_seq_length() == 3 and layer.get_mask_sizes(1) == (4, 0)
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, torch.cat([k1, k2], 2)[[2, 0]])
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.values, torch.cat([v1, v2], 2)[[2, 2, 0, 0]])
    layer.crop(-1)
    assert torch.equal(layer.keys, k1[[2, 2, 0, 0]])


def test_make_cache_keeps_special_layers(smol_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM
    from transformers.cache_utils import DynamicSlidingWindowLayer

    model = make_tiny_model(smol_tokenizer)
    assert all(isinstance(layer, PreallocatedLayer) for layer in make_cache(model, 10).layers)
    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=1, sliding_window=4))
    assert type(make_cache(sliding, 10).layers[0]) is DynamicSlidingWindowLayer
