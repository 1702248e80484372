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


def recording_reward(seen: list):
    """A reward factory: ``len(text) % 7`` per completion (ties are rare, not absent); the texts of each call are
    appended to ``seen``."""
    def reward_for(judge: LoadedModel):
        def reward(prompts, completions, **kwargs):
            seen.append([c[0]["content"] for c in completions])
            return [float(len(c[0]["content"]) % 7) for c in completions]
        return reward

    return reward_for


def trl_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """TRL 1.16's ``OnlineDPOTrainer._forward`` without its truncation: one forward over every
    ``[prompt ; completion]`` row, the completion tokens' log-probs ``[N, C]``."""
    ids, mask = torch.cat((prompt_ids, completion_ids), 1), torch.cat((prompt_mask, completion_mask), 1)
    logits = model(ids, attention_mask=mask).logits[:, prompt_ids.size(1) - 1:-1]
    return torch.take_along_dim(logits.log_softmax(-1), completion_ids.unsqueeze(-1), dim=2).squeeze(-1)


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
