"""Helpers shared by the training-stage tests (test_training, test_adapters, test_dpo): tiny random Llamas with
SmolLM2's real tokenizer, fake dialogues, simple reward factories."""

from __future__ import annotations

import torch

from expertchat.config.schema import DialogueConfig, ModelConfig, TrainingConfig
from expertchat.engine.models import LoadedModel
from expertchat.policies.adapters import Policies
from expertchat.stages.dialogue import Dialogue
from tests.conftest import make_tiny_model

DCFG = DialogueConfig()


def tiny_pair(tokenizer, shared: bool = True, max_length: int = 512) -> dict[str, LoadedModel]:
    cfg = ModelConfig(name="tiny", max_length=max_length)
    actor = make_tiny_model(tokenizer, seed=0)
    judge = actor if shared else make_tiny_model(tokenizer, seed=1)
    return {"actor": LoadedModel("tiny", actor, tokenizer, cfg), "judge": LoadedModel("tiny", judge, tokenizer, cfg)}


def fake_dialogues(n: int = 3, turns: int = 4, words: int = 6) -> list[Dialogue]:
    out = []
    for i in range(n):
        d = Dialogue(f"r0-d{i:03d}", f"topic number {i}")
        for t in range(turns):
            text = " ".join(f"w{t}x{k}" for k in range(words))
            d.turns.append({"role": ("actor", "judge")[t % 2], "turn": t, "text": f"turn {t}: {text}"})
        out.append(d)
    return out


def length_reward(judge: LoadedModel):
    def reward(prompts, completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    return reward


def constant_reward(judge: LoadedModel):
    def reward(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    return reward


def lora_b(policies: Policies, role: str) -> list[torch.Tensor]:
    peft = next(iter(policies._peft.values()))
    return [p.detach().clone() for n, p in peft.named_parameters() if f"lora_B.{role}." in n]


def logits(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    return lm.model(torch.tensor([ids])).logits[0].float()


def cfg(**kw) -> TrainingConfig:
    return TrainingConfig(**{"steps": 1, "max_new_tokens": 6, "learning_rate": 1e-2, **kw})


IDS = [1, 20, 300, 4000, 50]
