"""CPU memory layouts: linear weights stored ``[in, out]`` (the same outputs, training, saving) and the head's
contiguous input."""

from __future__ import annotations

import copy

import pytest
import torch

from expertchat.engine.layout import contiguous_head, transpose_linear_weights
from tests.conftest import make_tiny_model

IDS = torch.tensor([[1, 20, 300, 4000, 50, 7]])


def test_transposed_weights_give_the_same_outputs(smol_tokenizer):
    model = make_tiny_model(smol_tokenizer, seed=2, hidden=32, layers=2)
    with torch.no_grad():
        before = model(IDS).logits
    moved = transpose_linear_weights(model)
    assert moved == 2 * 7  # q, k, v, o, gate, up, down per layer; the tied head stays
    assert model.lm_head.weight is model.get_input_embeddings().weight and model.lm_head.weight.is_contiguous()
    up = model.model.layers[0].mlp.up_proj.weight
    assert up.shape == (64, 32) and up.t().is_contiguous() and not up.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, atol=1e-5, rtol=1e-5)
    assert transpose_linear_weights(model) == 0  # idempotent


def test_other_dtypes_and_linear_subclasses_are_left_alone(smol_tokenizer):
    class Quantized(torch.nn.Linear):
        pass

    model = make_tiny_model(smol_tokenizer, dtype=torch.bfloat16)
    assert transpose_linear_weights(model) == 0
    wrapper = torch.nn.Sequential(Quantized(4, 4), torch.nn.Linear(4, 4))
    assert transpose_linear_weights(wrapper) == 1 and wrapper[0].weight.is_contiguous()


def test_transposed_weights_train_and_save(smol_tokenizer, tmp_path):
    """Full fine-tuning steps (AdamW on the strided parameters) and a LoRA adapter's gradients equal those of the
    untouched model; the model saves and loads back with the same outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    plain = make_tiny_model(smol_tokenizer, seed=4, hidden=32, layers=2)
    moved = copy.deepcopy(plain)
    transpose_linear_weights(moved)
    for model in (plain, moved):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            model(IDS, labels=IDS).loss.backward()
            opt.step()
    for a, b in zip(plain.parameters(), moved.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    moved.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    moved.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, moved(IDS).logits, atol=1e-5, rtol=1e-5)

    grads = []
    for model in (copy.deepcopy(plain), copy.deepcopy(moved)):
        torch.manual_seed(0)  # the same random adapter
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False))
        peft(IDS, labels=IDS).loss.backward()
        grads.append([p.grad for p in peft.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("calls", [1, 2])
def test_the_output_head_gets_a_contiguous_input(smol_tokenizer, calls):
    """logits_to_keep slices the hidden states; a frozen bf16 head on that strided view was ~60x slower on a CPU."""
    model = make_tiny_model(smol_tokenizer)
    seen = []
    for _ in range(calls):  # once is enough: a second call adds nothing
        contiguous_head(model)
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        out = model(torch.tensor([[1, 20, 300, 4000]]), logits_to_keep=1)
    assert seen == [True] and out.logits.shape[1] == 1
    assert len(model.lm_head._forward_pre_hooks) == 2
