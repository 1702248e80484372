"""The KV-cache machinery: the preallocated layer against transformers' DynamicLayer, which layers a cache
swaps, and the WIM greedy continuation with rows finishing early. (The judge's PrefixBatch is also checked
against plain forwards in tests/test_judging.py.)"""

from __future__ import annotations

import pytest
import torch

from expertchat.engine.kvcache import PreallocatedLayer, PrefixBatch, make_cache
from expertchat.engine.models import LoadedModel
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


def plain_greedy(model, ids: list[int], max_new: int, stops: set[int]) -> list[int]:
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            t = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if t in stops:
                break
            new.append(t)
    return new


@pytest.mark.parametrize("reserve", [0, 64])  # the buffer grows / is allocated up front
def test_greedy_continuation_drops_finished_rows_and_matches_a_plain_loop(smol_tokenizer, reserve):
    model = make_tiny_model(smol_tokenizer)
    lm = LoadedModel("tiny", model, smol_tokenizer, None)
    head = [1, 2, 3]
    prefixes = [head + [40 + i] * (2 + 3 * i) for i in range(4)]
    suffix, max_new = [7, 8], 10
    free = [plain_greedy(model, p + suffix, max_new, set()) for p in prefixes]
    stops = {free[0][2], free[2][5]}  # rows 0 and 2 (at least) end early, at different steps
    expected = [plain_greedy(model, p + suffix, max_new, stops) for p in prefixes]
    assert len({len(e) for e in expected}) > 1
    with torch.no_grad():
        batch = PrefixBatch(lm, prefixes, shared=len(head), reserve=reserve)
        batch.extend(suffix, 1)  # a suffix run and cropped first, as the rubric's are
        assert batch.greedy(suffix, max_new, sorted(stops)) == expected
    with pytest.raises(RuntimeError, match="spent"):
        batch.extend(suffix, 1)
