"""Batched decoding: contrastive search against a slow reference of its definition, sampling, stop tokens,
prompt order and truncation. All on tiny random Llamas with SmolLM2's vocab."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from expertchat.config.schema import GenerationConfig
from expertchat.engine.generation import Generated, generate, sample_next
from expertchat.engine.models import render_prompt
from tests.conftest import make_tiny_model

QUESTIONS = [
    "Hi.",
    "What drives a Plinian eruption, and why do some columns collapse while others keep rising?",
    "Explain soil carbon.",
    "Tell me about the history of medieval trade routes between Venice, Alexandria and the Hanseatic cities, "
    "with one concrete example of a contract.",
]


@pytest.fixture(scope="module")
def prompts(smol_tokenizer) -> list[str]:
    """Chat prompts of clearly different token lengths."""
    return [render_prompt(smol_tokenizer, "You are an expert.", [(False, q)]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def model(smol_tokenizer):
    """A tiny fp32 Llama (3 layers, so the cache has several layers to keep in step)."""
    return make_tiny_model(smol_tokenizer, seed=1, hidden=32, layers=3)


def encode(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------ slow references


@lru_cache(maxsize=None)
@torch.inference_mode()
def reference_contrastive(model, ids: tuple[int, ...], k: int, alpha: float, max_new: int) -> list[int]:
    """Contrastive search straight from its definition: one sequence, no cache, everything recomputed, fp32.

    score(v) = (1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j) over the top-k tokens v, where h_v is the
    last-layer hidden state of v fed after the sequence and h_j those of all tokens of the sequence.
    """
    ids, new = list(ids), []
    for _ in range(max_new):
        out = model(torch.tensor([ids]), output_hidden_states=True, logits_to_keep=1)
        probs = out.logits[0, -1].float().softmax(-1)
        context = F.normalize(out.hidden_states[-1][0].float(), dim=-1)
        top_probs, top_ids = probs.topk(k)
        best_score, best = None, None
        for p, v in zip(top_probs.tolist(), top_ids.tolist()):
            h = model(torch.tensor([ids + [v]]), output_hidden_states=True,
                      logits_to_keep=1).hidden_states[-1][0, -1].float()
            score = (1 - alpha) * p - alpha * (F.normalize(h, dim=-1) @ context.T).max().item()
            if best_score is None or score > best_score:
                best_score, best = score, v
        ids.append(best)
        new.append(best)
    return new


@lru_cache(maxsize=None)
@torch.inference_mode()
def reference_greedy(model, ids: tuple[int, ...], max_new: int) -> list[int]:
    """Greedy decoding, one sequence, no cache."""
    ids, new = list(ids), []
    for _ in range(max_new):
        token = int(model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].argmax())
        ids.append(token)
        new.append(token)
    return new


def until_stop(tokens: list[int], stop: int) -> tuple[list[int], bool]:
    """What a decoder that produced ``tokens`` freely gives when ``stop`` ends a sequence."""
    return (tokens[:tokens.index(stop)], True) if stop in tokens else (tokens, False)


def check_consistent(out: Generated, max_new: int) -> None:
    assert out.new_tokens == len(out.token_ids) + int(out.finished)
    assert out.new_tokens <= max_new
    assert out.finished or out.new_tokens == max_new


# ------------------------------------------------------------------------------------ contrastive search


@pytest.mark.parametrize("alpha", [0.0, 0.6])
@pytest.mark.parametrize("k", [1, 4])
def test_contrastive_matches_reference(model, smol_tokenizer, prompts, alpha, k):
    cfg = GenerationConfig(strategy="contrastive", top_k=k, penalty_alpha=alpha, max_new_tokens=8)
    outputs = generate(model, smol_tokenizer, prompts, cfg, stop_token_ids=[])
    for prompt, out in zip(prompts, outputs):
        expected = reference_contrastive(model, encode(smol_tokenizer, prompt), k, alpha, 8)
        assert out.token_ids == expected
        assert not out.finished and out.new_tokens == 8
        assert out.prompt_tokens == len(encode(smol_tokenizer, prompt))
    if alpha == 0.0 or k == 1:  # degenerates to greedy decoding
        for prompt, out in zip(prompts, outputs):
            assert out.token_ids == reference_greedy(model, encode(smol_tokenizer, prompt), 8)


def test_contrastive_penalty_changes_the_output(model, smol_tokenizer, prompts):
    greedy = generate(model, smol_tokenizer, prompts, GenerationConfig(strategy="contrastive", top_k=1),
                      stop_token_ids=[])
    penalized = generate(model, smol_tokenizer, prompts,
                         GenerationConfig(strategy="contrastive", top_k=4, penalty_alpha=0.9), stop_token_ids=[])
    assert any(g.token_ids != p.token_ids for g, p in zip(greedy, penalized))


def test_contrastive_stop_tokens_drop_finished_rows(model, smol_tokenizer, prompts):
    """A stop id that one sequence produces mid-way: it ends there, the others go on exactly as before."""
    k, alpha, max_new = 3, 0.5, 10
    free = [reference_contrastive(model, encode(smol_tokenizer, p), k, alpha, max_new) for p in prompts]
    stop = free[1][3]
    cfg = GenerationConfig(strategy="contrastive", top_k=k, penalty_alpha=alpha, max_new_tokens=max_new,
                           batch_size=3)  # two chunks
    outputs = generate(model, smol_tokenizer, prompts, cfg, stop_token_ids=[stop])
    for tokens, out in zip(free, outputs):
        assert (out.token_ids, out.finished) == until_stop(tokens, stop)
        check_consistent(out, max_new)
    assert outputs[1].finished and outputs[1].new_tokens == free[1].index(stop) + 1


# ------------------------------------------------------------------------------------ sampling


def test_top_k_1_is_greedy_and_batched_equals_single(model, smol_tokenizer, prompts):
    cfg = GenerationConfig(strategy="sample", top_k=1, max_new_tokens=12)
    batched = generate(model, smol_tokenizer, prompts, cfg, stop_token_ids=[], seed=3)
    for prompt, out in zip(prompts, batched):
        single = generate(model, smol_tokenizer, [prompt], cfg, stop_token_ids=[], seed=3)[0]
        assert out == single
        assert out.token_ids == reference_greedy(model, encode(smol_tokenizer, prompt), 12)


def test_sampling_is_seeded(model, smol_tokenizer, prompts):
    cfg = GenerationConfig(strategy="sample", max_new_tokens=10, temperature=1.5)
    first = generate(model, smol_tokenizer, prompts, cfg, stop_token_ids=[], seed=7)
    again = generate(model, smol_tokenizer, prompts, cfg, stop_token_ids=[], seed=7)
    other = generate(model, smol_tokenizer, prompts, cfg, stop_token_ids=[], seed=8)
    assert first == again
    assert [o.token_ids for o in first] != [o.token_ids for o in other]


def test_results_follow_input_order(model, smol_tokenizer, prompts):
    cfg = GenerationConfig(strategy="sample", top_k=1, max_new_tokens=6, batch_size=2)
    shuffled = [prompts[2], prompts[0], prompts[3], prompts[1], prompts[2]]
    outputs = generate(model, smol_tokenizer, shuffled, cfg, stop_token_ids=[])
    assert [o.prompt_tokens for o in outputs] == [len(encode(smol_tokenizer, p)) for p in shuffled]
    for prompt, out in zip(shuffled, outputs):
        assert out.token_ids == reference_greedy(model, encode(smol_tokenizer, prompt), 6)
        assert out.text == smol_tokenizer.decode(out.token_ids, skip_special_tokens=True).strip()
    assert outputs[0] == outputs[4]
    assert generate(model, smol_tokenizer, [], cfg) == []


def test_prompts_are_truncated_from_the_left(model, smol_tokenizer, prompts):
    ids = encode(smol_tokenizer, prompts[3])
    tail = smol_tokenizer.decode(ids[-9:])
    assert encode(smol_tokenizer, tail) == ids[-9:]  # the tail re-tokenizes to the same ids
    cfg = GenerationConfig(strategy="sample", top_k=1, max_new_tokens=6)
    cut, whole = generate(model, smol_tokenizer, [prompts[3], tail], cfg, stop_token_ids=[], max_prompt_tokens=9)
    assert cut.prompt_tokens == whole.prompt_tokens == 9
    assert cut.token_ids == whole.token_ids == reference_greedy(model, ids[-9:], 6)
    short = generate(model, smol_tokenizer, [prompts[0]], cfg, stop_token_ids=[], max_prompt_tokens=10_000)[0]
    assert short.prompt_tokens == len(encode(smol_tokenizer, prompts[0]))


def test_stop_tokens_end_sequences(model, smol_tokenizer, prompts):
    max_new = 12
    free = [reference_greedy(model, encode(smol_tokenizer, p), max_new) for p in prompts]
    stop = free[2][4]
    cfg = GenerationConfig(strategy="sample", top_k=1, max_new_tokens=max_new)
    outputs = generate(model, smol_tokenizer, prompts, cfg, stop_token_ids=[stop])
    for tokens, out in zip(free, outputs):
        check_consistent(out, max_new)
        assert (out.token_ids, out.finished) == until_stop(tokens, stop)
        assert stop not in out.token_ids
    assert outputs[2].finished and outputs[2].new_tokens == free[2].index(stop) + 1


def test_default_stop_is_eos(smol_tokenizer, prompts):
    """A model that always prefers EOS stops at once, with the default stop ids."""
    model = make_tiny_model(smol_tokenizer, seed=2)
    bias = torch.zeros(model.config.vocab_size)
    bias[smol_tokenizer.eos_token_id] = 100.0
    model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    for cfg in (GenerationConfig(strategy="sample", max_new_tokens=5),
                GenerationConfig(strategy="contrastive", top_k=3, penalty_alpha=0.5, max_new_tokens=5)):
        outputs = generate(model, smol_tokenizer, prompts, cfg, seed=0)
        for out in outputs:
            assert out.finished and out.new_tokens == 1 and out.token_ids == [] and out.text == ""


def test_sampling_filters():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    draws = sample_next(logits, top_k=3, generator=gen)
    assert set(draws.tolist()) == {0, 1, 2}
    probs = logits[0].softmax(-1)
    # top-p 0.7: the best token holds 0.64, the best two 0.87, so the nucleus is {0, 1}
    draws = sample_next(logits, top_p=0.7, generator=gen)
    assert set(draws.tolist()) == {0, 1}
    share = (draws == 0).float().mean().item()
    assert abs(share - probs[0] / probs[:2].sum()) < 0.03
    # plain sampling follows the softmax, and temperature flattens it
    draws = sample_next(logits, generator=gen)
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03)
    hot = torch.bincount(sample_next(logits, temperature=100.0, generator=gen), minlength=6).float() / 4000
    assert hot.min() > 0.12
    assert sample_next(logits[:3], top_p=1e-6, generator=gen).tolist() == [0, 0, 0]
    # a flat distribution: the nucleus is far wider than the first top-k guess (256 tokens)
    draws = sample_next(torch.zeros(500, 5000), top_p=0.99, generator=gen)
    assert ((draws >= 0) & (draws < 5000)).all() and len(set(draws.tolist())) > 300


def test_bf16_model_runs_in_its_dtype(smol_tokenizer, prompts):
    model = make_tiny_model(smol_tokenizer, dtype=torch.bfloat16)
    for cfg in (GenerationConfig(max_new_tokens=4, top_p=0.9), GenerationConfig(strategy="contrastive", top_k=2,
                                                                                max_new_tokens=4)):
        outputs = generate(model, smol_tokenizer, prompts, cfg, seed=0, stop_token_ids=[])
        assert [o.new_tokens for o in outputs] == [4] * len(prompts)
    assert model.dtype == torch.bfloat16


def test_a_repeated_prompt_is_prefilled_once_with_the_same_outputs(model, smol_tokenizer, prompts, monkeypatch):
    """Online DPO samples each prompt twice: the copies share one prefill (fewer rows through the model) and
    give what prefilling every copy gives (a prefix store with nothing in it prefills every row): greedy, and
    seeded sampling (the same draws)."""
    import expertchat.engine.generation as generation
    from expertchat.engine.prefixcache import PrefixStore

    prefilled = []
    prefill = generation.CacheRunner.prefill

    def counted(self, *args, **kwargs):
        prefilled.append(self.input_ids.shape[0])
        return prefill(self, *args, **kwargs)

    monkeypatch.setattr(generation.CacheRunner, "prefill", counted)
    twice = prompts[:2] + prompts[:2]
    for cfg in (GenerationConfig(strategy="contrastive", top_k=1, max_new_tokens=6, batch_size=4),
                GenerationConfig(max_new_tokens=6, temperature=1.0, batch_size=4)):
        prefilled.clear()
        shared = generate(model, smol_tokenizer, twice, cfg, seed=3)
        every_row = generate(model, smol_tokenizer, twice, cfg, seed=3, store=PrefixStore(1.0), keys=[0, 1, 2, 3],
                             keep=False)
        assert prefilled == [2, 4]
        assert [g.token_ids for g in shared] == [g.token_ids for g in every_row]
        assert [g.prompt_tokens for g in shared] == [g.prompt_tokens for g in every_row]
