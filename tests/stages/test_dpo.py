"""The TRL coupling: tie-aware rewards, the masked trainer (ties change nothing, kept pairs do), completions
sampled by the project's decode loop (the same tensors, rewards and update as TRL's ``generate``), TRL's logs in
the run folder and the pipeline's tracker."""

from __future__ import annotations

import json
import math

import pytest
import torch

from expertchat.errors import ExpertChatError
from expertchat.policies.adapters import Policies
from expertchat.report.tracking import Tracker
from expertchat.runs.store import RunStore
from expertchat.stages.dpo import PairedReward
from expertchat.stages.training import TRAIN_METRICS_FILE, train_round
from tests.training_helpers import (
    DCFG,
    IDS,
    cfg,
    constant_reward,
    fake_dialogues,
    length_reward,
    logits,
    lora_b,
    recording_reward,
    tiny_pair,
    trl_logprobs,
)

# ------------------------------------------------------------------------------------------------- rewards


def test_paired_reward_masks_ties_and_unscored_pairs():
    values = iter([[1.0, 0.2, None, 0.5, 1.005, 0.7, 0.3, float("nan")]])
    reward = PairedReward(lambda prompts, completions, **kw: next(values), tie_tolerance=0.01)
    out = reward(prompts=["p"] * 8, completions=["c"] * 8)
    # pairs: (1.0, 1.005) tie, (0.2, 0.7) kept, (None, 0.3) unscored, (0.5, nan) unscored
    assert reward.keep == [False, True, False, False]
    assert out == [1.0, 0.2, 0.0, 0.5, 1.005, 0.7, 0.3, 0.0]
    assert reward.summary()["tied_pairs"] == 1 and reward.summary()["unscored_pairs"] == 2
    assert reward.summary()["masked_fraction"] == 0.75


def test_paired_reward_rejects_a_wrong_number_of_rewards():
    reward = PairedReward(lambda prompts, completions, **kw: [1.0], judge="j")
    with pytest.raises(ExpertChatError, match="returned 1 rewards for 4 completions"):
        reward(prompts=["p"] * 4, completions=["c"] * 4)


# ------------------------------------------------------------------------------------------ masked trainer


def test_tied_pairs_make_no_update(smol_tokenizer, tmp_path):
    store = RunStore(tmp_path)
    policies = Policies(tiny_pair(smol_tokenizer), cfg(steps=2, bidirectional=False))
    before = logits(policies.models["actor"], IDS)
    summary = train_round(policies, 0, fake_dialogues(), constant_reward, DCFG, store)
    actor = summary["roles"]["actor"]
    assert actor["steps"] == 2 and actor["pairs"] == 4 and actor["tied_pairs"] == 4 and actor["masked_fraction"] == 1
    assert all(torch.count_nonzero(b) == 0 for b in lora_b(policies, "actor"))  # LoRA B starts at 0 and stayed
    assert torch.equal(logits(policies.models["actor"], IDS), before)
    rows = [json.loads(line) for line in (tmp_path / TRAIN_METRICS_FILE).read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["pairs/tied"] == 1.0 and r["pairs/kept"] == 0.0
                                                        for r in steps)
    assert all(r["grad_norm"] == 0.0 for r in steps)


def test_a_tied_batch_after_an_update_changes_nothing(smol_tokenizer, tmp_path, monkeypatch):
    """Step 1 learns; step 2 is all ties: Adam's moments from step 1 must not move the weights at step 2."""
    from transformers import TrainerCallback

    from expertchat.stages import dpo

    policies = Policies(tiny_pair(smol_tokenizer), cfg(steps=2, bidirectional=False, batch_size=1))
    after: list[list[torch.Tensor]] = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            after.append(lora_b(policies, "actor"))

    class WithSnapshot(dpo.MaskedOnlineDPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "callbacks": [*kwargs["callbacks"], Snapshot()]})

    monkeypatch.setattr(dpo, "MaskedOnlineDPOTrainer", WithSnapshot)
    calls = []

    def reward_for(judge):
        def reward(prompts, completions, **kwargs):
            calls.append(1)
            if len(calls) == 1:  # distinct rewards: a preference
                return [float(i) for i in range(len(completions))]
            return [0.5] * len(completions)  # a tie

        return reward

    summary = train_round(policies, 0, fake_dialogues(), reward_for, DCFG, RunStore(tmp_path))["roles"]["actor"]
    assert summary["steps"] == 2 and summary["tied_pairs"] == 1 and summary["skipped_steps"] == 1
    assert any(torch.count_nonzero(b) > 0 for b in after[0])  # step 1 moved the adapter
    assert all(torch.equal(a, b) for a, b in zip(after[0], after[1]))  # step 2 did not


def test_distinct_rewards_do_update(smol_tokenizer, tmp_path):
    policies = Policies(tiny_pair(smol_tokenizer), cfg(steps=2, bidirectional=False))
    before = logits(policies.models["actor"], IDS)
    summary = train_round(policies, 0, fake_dialogues(), length_reward, DCFG, RunStore(tmp_path))
    assert summary["roles"]["actor"]["tied_pairs"] < summary["roles"]["actor"]["pairs"]
    assert any(torch.count_nonzero(b) > 0 for b in lora_b(policies, "actor"))
    assert not torch.equal(logits(policies.models["actor"], IDS), before)


def test_masked_pairs_get_no_gradient(smol_tokenizer, tmp_path, monkeypatch):
    """Of two pairs, the tied one gets a zero gradient on its completions' log-probs, the other a non-zero one."""
    from expertchat.stages import dpo

    grads = []

    class Spy(dpo.MaskedOnlineDPOTrainer):
        def _calculate_rewards_from_functions(self, *args, **kwargs):
            logprobs = self._policy_logprobs
            out = super()._calculate_rewards_from_functions(*args, **kwargs)
            logprobs.register_hook(lambda g: grads.append(g.clone()))  # runs after the mask hook
            return out

    monkeypatch.setattr(dpo, "MaskedOnlineDPOTrainer", Spy)

    def reward_for(judge):
        return lambda prompts, completions, **kw: [1.0, 0.5, 0.0, 0.5]  # pair (0, 2) kept, pair (1, 3) tied

    policies = Policies(tiny_pair(smol_tokenizer), cfg(bidirectional=False, batch_size=2))
    summary = train_round(policies, 0, fake_dialogues(), reward_for, DCFG, RunStore(tmp_path))
    assert summary["roles"]["actor"]["tied_pairs"] == 1
    (g,) = grads
    assert torch.count_nonzero(g[[1, 3]]) == 0
    assert torch.count_nonzero(g[[0, 2]]) > 0


# ---------------------------------------------------------------------------------------- metrics, tracker


class RecordingTracker(Tracker):
    def __init__(self):
        self.logged: list[tuple[dict, int]] = []

    def log(self, metrics, step):
        self.logged.append((dict(metrics), step))


@pytest.mark.parametrize("top_k", [1, 0], ids=["greedy", "sampled"])
def test_the_decode_loop_samples_what_trl_generate_samples(smol_tokenizer, tmp_path, monkeypatch, top_k):
    """TRL's sampling through the project's loop: greedy (top_k=1), the very tensors, rewards and update that
    ``model.generate`` gives; sampled, the same shapes and padding rules (the RNG streams differ)."""
    from trl.experimental.online_dpo import OnlineDPOTrainer

    import expertchat.stages.dpo as dpo

    make_args = dpo.online_dpo_args

    def args_with_top_k(*a, **kw):
        args = make_args(*a, **kw)
        args.top_k = top_k
        return args

    monkeypatch.setattr(dpo, "online_dpo_args", args_with_top_k)
    generated = []

    def recorded(generate_fn):
        def _generate(self, *a, **kw):
            out = generate_fn(self, *a, **kw)
            generated.append([t.clone() for t in out[:4]])
            return out
        return _generate

    def run(path: str, generate_fn):
        generated.clear()
        seen = []
        reward_for = recording_reward(seen)
        monkeypatch.setattr(dpo.MaskedOnlineDPOTrainer, "_generate", recorded(generate_fn))
        policies = Policies(tiny_pair(smol_tokenizer), cfg(steps=2, bidirectional=False, max_new_tokens=8))
        train_round(policies, 0, fake_dialogues(), reward_for, DCFG, RunStore(tmp_path / path), seed=5)
        return [list(t) for t in generated], seen, lora_b(policies, "actor")

    ours = run("ours", dpo.MaskedOnlineDPOTrainer._generate)
    trl = run("trl", OnlineDPOTrainer._generate)
    for (p1, m1, c1, k1), (p2, m2, c2, k2) in zip(ours[0], trl[0]):
        assert torch.equal(p1, p2) and torch.equal(m1, m2)  # prompts: left-padded, each twice
        assert c1.shape[0] == c2.shape[0]
        for ids, mask in ((c1, k1), (c2, k2)):  # padded after the first stop token, which the mask includes
            lengths = mask.sum(-1)
            assert torch.equal(mask, (torch.arange(mask.shape[1]) < lengths[:, None]).long())
    if top_k == 1:
        assert all(torch.equal(a, b) for x, y in zip(ours[0], trl[0]) for a, b in zip(x, y))
        assert ours[1] == trl[1]  # the same completions scored
        assert all(torch.equal(a, b) for a, b in zip(ours[2], trl[2]))  # the same update


def test_prompts_encoded_once_give_trls_update(smol_tokenizer, tmp_path, monkeypatch):
    """The policy's and the reference's log-probs with each prompt encoded once for its two samples
    (``completion_logprobs``) train the adapter as TRL's forward over every row does: the same rewards, the same
    LoRA weights after two steps (up to float rounding), and both forwards went through it."""
    import expertchat.stages.dpo as dpo

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].training)
        return shared(*args, **kwargs)

    def run(path: str, fn):
        monkeypatch.setattr(dpo, "completion_logprobs", fn)
        seen = []
        reward_for = recording_reward(seen)
        policies = Policies(tiny_pair(smol_tokenizer), cfg(steps=2, bidirectional=False, max_new_tokens=8))
        train_round(policies, 0, fake_dialogues(), reward_for, DCFG, RunStore(tmp_path / path), seed=5)
        return seen, lora_b(policies, "actor")

    shared = dpo.completion_logprobs
    ours, trl = run("ours", counted), run("trl", trl_logprobs)
    assert calls.count(True) == 2 and calls.count(False) == 2  # policy (grad) and reference, both steps
    assert ours[0] == trl[0]
    assert any(torch.count_nonzero(b) > 0 for b in ours[1])
    for a, b in zip(ours[1], trl[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_trainer_logs_into_the_pipeline_tracker_and_the_run_folder(smol_tokenizer, tmp_path):
    store = RunStore(tmp_path)
    tracker = RecordingTracker()
    policies = Policies(tiny_pair(smol_tokenizer), cfg(steps=2))
    train_round(policies, 0, fake_dialogues(), length_reward, DCFG, store, tracker)
    train_round(policies, 1, fake_dialogues(), length_reward, DCFG, store, tracker)
    losses = [(step, m["train/judge/loss"]) for m, step in tracker.logged if "train/judge/loss" in m]
    assert [s for s, _ in losses] == [1, 2, 3, 4]  # explicit steps, continuing over rounds
    assert all(math.isfinite(v) for _, v in losses)
    assert any("train/actor/pairs/tied" in m for m, _ in tracker.logged)
    assert any("rounds/actor_reward_mean" in m for m, _ in tracker.logged)
    rows = [json.loads(line) for line in (tmp_path / TRAIN_METRICS_FILE).read_text().splitlines()]
    assert {(r["round"], r["role"]) for r in rows} == {(0, "actor"), (0, "judge"), (1, "actor"), (1, "judge")}


# ----------------------------------------------------------------------------------- GPU settings by hardware


def test_trainer_settings_follow_the_device_and_the_base(smol_tokenizer, tmp_path, monkeypatch):
    """On a CPU: no mixed precision, torch's AdamW, re-entrancy off when checkpointing; paged 8-bit AdamW is
    chosen on a GPU for a 4-bit base and refused without one (fp16 on a GPU: the gpu tier, tests/test_gpu.py)."""
    from expertchat.stages import dpo

    model = tiny_pair(smol_tokenizer)["actor"].model
    args = dpo.online_dpo_args(cfg(gradient_checkpointing=True), str(tmp_path), 64, 0, model)
    assert (args.bf16, args.fp16, args.optim.value) == (False, False, "adamw_torch")
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert dpo.optimizer(cfg(), model, cuda=False) == "adamw_torch"
    with pytest.raises(ExpertChatError, match="training.optimizer=paged_adamw_8bit needs a CUDA GPU"):
        dpo.optimizer(cfg(optimizer="paged_adamw_8bit"), model, cuda=False)
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(model, "is_loaded_in_4bit", True, raising=False)
    assert dpo.optimizer(cfg(), model, cuda=True) == "paged_adamw_8bit"
    assert dpo.optimizer(cfg(optimizer="adamw_torch"), model, cuda=True) == "adamw_torch"
    assert dpo.optimizer(cfg(method="full"), tiny_pair(smol_tokenizer)["actor"].model, cuda=True) == "paged_adamw_8bit"


@pytest.mark.parametrize("max_length", [1000, 9, 6, 4, 3])
def test_the_trainers_forward_is_trls_with_its_truncation_and_fallbacks(smol_tokenizer, monkeypatch, max_length):
    """``MaskedOnlineDPOTrainer._forward`` against TRL's own: the same log-probs when TRL cuts prompts from the
    left (``max_length`` below prompt + completion), when the cut leaves no prompt (TRL's path), and TRL's path
    under a data-parallel wrapper."""
    from types import SimpleNamespace

    from trl.experimental.online_dpo import OnlineDPOTrainer

    from expertchat.stages.dpo import MaskedOnlineDPOTrainer
    from tests.conftest import make_tiny_model

    model = make_tiny_model(smol_tokenizer, seed=7, hidden=32)
    trainer = object.__new__(MaskedOnlineDPOTrainer)  # only what _forward reads
    trainer.__dict__.update(max_length=max_length, args=SimpleNamespace(gradient_checkpointing=False, n_gpu=1),
                            accelerator=SimpleNamespace(num_processes=1), timing={"reference_seconds": 0.0})
    prompt_ids = torch.tensor([[0, 0, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26]]).repeat(2, 1)
    prompt_mask = (prompt_ids > 0).long()
    completion_ids = torch.tensor([[31, 32, 33], [41, 42, 2], [51, 52, 53], [61, 2, 0]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]])
    rows = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    import expertchat.stages.dpo as dpo

    calls, shared = [], dpo.completion_logprobs
    monkeypatch.setattr(dpo, "completion_logprobs", lambda *a, **k: calls.append(1) or shared(*a, **k))
    with torch.no_grad():
        theirs = OnlineDPOTrainer._forward(trainer, model, *rows)
        ours = MaskedOnlineDPOTrainer._forward(trainer, model, *rows)
        wrapped = MaskedOnlineDPOTrainer._forward(trainer, torch.nn.DataParallel(model), *rows)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wrapped, theirs, atol=1e-5, rtol=1e-5)
    assert len(calls) == (1 if max_length > 3 else 0)  # a cut that leaves no prompt (6 + 3 - 3 = 6): TRL's forward
