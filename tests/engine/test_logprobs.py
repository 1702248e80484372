"""Completion log-probs with each distinct prompt encoded once equal TRL's one forward over every
``[prompt ; completion]`` row: values and gradients, left-padded prompts, a LoRA-wrapped model."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from expertchat.engine.logprobs import completion_logprobs
from tests.conftest import make_tiny_model
from tests.training_helpers import trl_logprobs


def batch(k: int = 2, completion_len: int = 5, seed: int = 0):
    """Two left-padded prompts (7 and 4 real tokens) repeated ``k`` times, TRL's layout, and ``k x 2`` random
    right-padded completions."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(5, 900, (2, 7), generator=g)
    prompt_mask = torch.ones(2, 7, dtype=torch.long)
    prompt_mask[1, :3] = 0
    prompt_ids[1, :3] = 0
    completion_ids = torch.randint(5, 900, (2 * k, completion_len), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, completion_len - 2:] = 0
    return prompt_ids.repeat(k, 1), prompt_mask.repeat(k, 1), completion_ids, completion_mask


@pytest.fixture(scope="module")
def lora_model(smol_tokenizer):
    model = make_tiny_model(smol_tokenizer, seed=3, hidden=32, layers=3)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"],
                     init_lora_weights=False)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("k", [2, 3])
def test_values_equal_one_forward_over_every_row(lora_model, k):
    rows = batch(k=k)
    with torch.no_grad():
        ours, theirs = completion_logprobs(lora_model, *rows), trl_logprobs(lora_model, *rows)
    assert ours.shape == theirs.shape == (2 * k, 5)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_gradients_equal_one_forward_over_every_row(lora_model):
    rows = batch()
    weight = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (completion_logprobs, trl_logprobs):
        lora_model.zero_grad(set_to_none=True)
        (fn(lora_model, *rows) * weight).sum().backward()
        grads.append({n: p.grad.clone() for n, p in lora_model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    lora_model.zero_grad(set_to_none=True)


def encoded_rows(model) -> list[int]:
    """Rows of every forward ``model`` runs from now on (a hook on its input embeddings)."""
    rows: list[int] = []
    model.get_input_embeddings().register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return rows


def test_distinct_prompts_and_single_token_completions(smol_tokenizer):
    model = make_tiny_model(smol_tokenizer, seed=5, hidden=32)
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch(completion_len=1)
    prompt_ids, prompt_mask = prompt_ids.clone(), prompt_mask.clone()
    prompt_ids[3, -1] = 7  # the second copy of prompt 1 differs: three distinct prompts, each encoded once
    rows = encoded_rows(model)
    with torch.no_grad():
        ours = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        assert rows == [3]  # one token per completion: the prompt forward gives every log-prob
        theirs = trl_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_each_distinct_prompt_is_encoded_once_in_any_order(smol_tokenizer):
    """TRL's layout (B prompts, then again), copies side by side, and a copy whose mask differs (not a copy)."""
    model = make_tiny_model(smol_tokenizer, seed=6, hidden=32)
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch(k=3)
    side_by_side = [0, 2, 4, 1, 3, 5]
    other_mask = prompt_mask.clone()
    other_mask[5, 3] = 0  # row 5 keeps prompt 1's ids but masks a token more
    rows = encoded_rows(model)
    for ids, mask, comp, comp_mask, distinct in (
            (prompt_ids, prompt_mask, completion_ids, completion_mask, 2),
            (prompt_ids[side_by_side], prompt_mask[side_by_side], completion_ids[side_by_side],
             completion_mask[side_by_side], 2),
            (prompt_ids, other_mask, completion_ids, completion_mask, 3)):
        rows.clear()
        with torch.no_grad():
            ours = completion_logprobs(model, ids, mask, comp, comp_mask)
            assert rows == [distinct, 6]  # the distinct prompts, then every row's completion
            torch.testing.assert_close(ours, trl_logprobs(model, ids, mask, comp, comp_mask), atol=1e-5, rtol=1e-5)


def test_empty_prompt_is_an_error(lora_model):
    with pytest.raises(ValueError, match="at least one prompt token"):
        completion_logprobs(lora_model, torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long),
                            torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))


def test_a_forward_that_drops_the_cache_is_an_error(lora_model):
    """A wrapper whose forward loses the cache argument would score completions without their prompt."""

    class Forgetful(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, use_cache=True, logits_to_keep=0, **kwargs):
            width = input_ids.shape[1]
            return self.model(input_ids=input_ids, attention_mask=attention_mask[:, -width:], use_cache=use_cache,
                              logits_to_keep=logits_to_keep)

    with torch.no_grad(), pytest.raises(RuntimeError, match="did not use the KV cache"):
        completion_logprobs(Forgetful(lora_model), *batch())
