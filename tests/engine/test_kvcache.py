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


@pytest.mark.parametrize("shared", [0, 3])
def test_rows_grouped_by_a_shared_context_give_the_plain_layouts_logits_and_continuations(smol_tokenizer, shared):
    """Rows 0/2 and 1/3 share their first tokens (a context, two samples each): run once per group, their logits,
    suffix logits and greedy continuations are those of the plain layout, and the group layout feeds fewer tokens."""
    model = make_tiny_model(smol_tokenizer, dtype=torch.float32)
    lm = LoadedModel("tiny", model, smol_tokenizer, None)
    head, ctx = [1, 2, 3], [[50, 51, 52, 53, 54, 55], [60, 61]]
    answers = [[70, 71], [80, 81, 82, 83], [90], [95, 96, 97]]
    prefixes = [head + ctx[r % 2] + [9] + answers[r] + [5, 6] for r in range(4)]
    split = [len(head) + len(ctx[r % 2]) for r in range(4)]  # up to the context's end (the [9] runs per row)
    tail = 2 + 4 + 1
    with torch.no_grad():
        plain = PrefixBatch(lm, prefixes, tail_keep=tail, shared=shared, reserve=8)
        grouped = PrefixBatch(lm, prefixes, tail_keep=tail, shared=shared, reserve=8, split=split)
        spans = [(split[r] + 1, split[r] + 1 + len(answers[r])) for r in range(4)]
        for a, b in zip(plain.span_logprobs(spans), grouped.span_logprobs(spans), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain.extend([7, 8], 2), grouped.extend([7, 8], 2), rtol=1e-5, atol=1e-5)
        assert grouped.ids.numel() < plain.ids.numel()  # each row's own part only
        assert plain.greedy([7, 8], 5, []) == grouped.greedy([7, 8], 5, [])


def test_a_split_without_shared_rows_is_the_plain_layout_and_a_bad_split_is_an_error(smol_tokenizer):
    lm = LoadedModel("tiny", make_tiny_model(smol_tokenizer), smol_tokenizer, None)
    prefixes = [[1, 2, 3, 4], [1, 2, 5, 6, 7]]
    with torch.no_grad():
        batch = PrefixBatch(lm, prefixes, shared=2, split=[3, 3])  # 1 2 3 / 1 2 5: no two rows share them
        assert torch.equal(batch.tail_logits, PrefixBatch(lm, prefixes, shared=2).tail_logits)
        with pytest.raises(ValueError, match="split has 1 counts for 2 prefixes"):
            PrefixBatch(lm, prefixes, split=[3])
