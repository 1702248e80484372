"""Adapters and views: one base with an adapter per role, views that restore the base's state, adapters saved
per round and reloaded on resume, the round-start reference and judge, full fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch

from expertchat.config.schema import LoraSettings, ModelConfig
from expertchat.engine.models import LoadedModel
from expertchat.errors import ExpertChatError
from expertchat.policies.adapters import Policies, check_saved, check_weights
from expertchat.policies.full import FullPolicies
from expertchat.policies.lora import LoraPolicies
from expertchat.runs.store import RunStore
from expertchat.stages.training import TRAIN_METRICS_FILE, train_round
from tests.conftest import make_tiny_model
from tests.training_helpers import DCFG, IDS, cfg, fake_dialogues, length_reward, logits, tiny_pair

# --------------------------------------------------------------------------------- adapters, rounds, roles


def test_policies_builds_the_class_of_the_training_method(smol_tokenizer):
    lora, full = Policies(tiny_pair(smol_tokenizer), cfg()), Policies(tiny_pair(smol_tokenizer), cfg(method="full"))
    assert type(lora) is LoraPolicies and type(full) is FullPolicies
    assert isinstance(lora, Policies) and isinstance(full, Policies)
    assert type(LoraPolicies(tiny_pair(smol_tokenizer), cfg())) is LoraPolicies  # a subclass named directly


def test_shared_base_keeps_one_model_with_two_adapters(smol_tokenizer, tmp_path):
    models = tiny_pair(smol_tokenizer, shared=True)
    policies = Policies(models, cfg())
    base = logits(policies.models["actor"], IDS)
    judges = []

    def reward_for(judge):
        judges.append(judge)
        return length_reward(judge)

    summary = train_round(policies, 0, fake_dialogues(), reward_for, DCFG, RunStore(tmp_path))
    assert set(summary["roles"]) == {"actor", "judge"}
    assert len(policies._peft) == 1
    peft = next(iter(policies._peft.values()))
    assert peft.base_model.model is models["actor"].model  # the one base, with LoRA layers injected in place
    assert {"actor", "judge"} <= set(peft.peft_config)
    actor, judge = logits(policies.models["actor"], IDS), logits(policies.models["judge"], IDS)
    assert not torch.equal(actor, base) and not torch.equal(judge, base) and not torch.equal(actor, judge)
    # in round 0 each judge was the base (no adapter yet at the start of the stage)
    assert [j.name for j in judges] == ["tiny", "tiny"]
    assert torch.equal(logits(judges[0], IDS), base) and torch.equal(logits(judges[1], IDS), base)
    assert summary["roles"]["actor"]["judge"] == "base, adapters disabled"


def test_views_restore_the_training_state(smol_tokenizer, tmp_path):
    policies = Policies(tiny_pair(smol_tokenizer), cfg())
    train_round(policies, 0, fake_dialogues(), length_reward, DCFG, RunStore(tmp_path))
    peft = next(iter(policies._peft.values()))
    peft.set_adapter("actor")
    peft.train()
    flags = {n: p.requires_grad for n, p in peft.named_parameters()}
    logits(policies.models["judge"], IDS)
    with torch.no_grad():
        policies.models["actor"].model.generate(torch.tensor([IDS]), max_new_tokens=2, do_sample=False)
    assert peft.active_adapter == "actor" and peft.training
    assert {n: p.requires_grad for n, p in peft.named_parameters()} == flags


def test_views_compute_what_peft_set_adapter_gives(smol_tokenizer, tmp_path):
    models = tiny_pair(smol_tokenizer)
    policies = Policies(models, cfg(lora=LoraSettings(merged_copies="never")))  # the switch (test_merging: copies)
    train_round(policies, 0, fake_dialogues(), length_reward, DCFG, RunStore(tmp_path))
    peft = next(iter(policies._peft.values()))
    views = {role: logits(policies.models[role], IDS) for role in ("actor", "judge")}
    with torch.no_grad():
        for role in ("actor", "judge"):
            peft.set_adapter(role)
            assert torch.equal(peft(torch.tensor([IDS])).logits[0].float(), views[role])
        with peft.disable_adapter():
            base = peft(torch.tensor([IDS])).logits[0].float()
    assert torch.equal(logits(policies.frozen("actor"), IDS), base)  # outside a stage: no snapshot, the base


def test_adapters_are_saved_per_round_and_reload_with_peft(smol_tokenizer, tmp_path):
    from peft import PeftModel

    store = RunStore(tmp_path)
    policies = Policies(tiny_pair(smol_tokenizer), cfg())
    train_round(policies, 0, fake_dialogues(), length_reward, DCFG, store)
    train_round(policies, 1, fake_dialogues(), length_reward, DCFG, store)
    for r in (0, 1):
        for role in ("actor", "judge"):
            assert (tmp_path / f"adapters/round_{r}/{role}/adapter_config.json").exists()
    trained = {role: logits(policies.models[role], IDS) for role in ("actor", "judge")}
    # plain PEFT on a fresh copy of the base
    fresh = PeftModel.from_pretrained(make_tiny_model(smol_tokenizer, seed=0), str(tmp_path / "adapters/round_1/judge"))
    assert torch.allclose(fresh(torch.tensor([IDS])).logits[0].float(), trained["judge"], atol=1e-5)
    # what a resumed run does
    for r in (0, 1):
        store.finish(r, "training", {})
    resumed = Policies(tiny_pair(smol_tokenizer), cfg())
    assert resumed.restore(store, rounds=3) == 1
    for role in ("actor", "judge"):
        assert torch.allclose(logits(resumed.models[role], IDS), trained[role], atol=1e-5)


def test_round_two_reference_is_the_previous_policy(smol_tokenizer, tmp_path):
    def first_kl(reference: str) -> float:
        store = RunStore(tmp_path / reference)
        policies = Policies(tiny_pair(smol_tokenizer), cfg(reference=reference, bidirectional=False))
        train_round(policies, 0, fake_dialogues(), length_reward, DCFG, store)
        summary = train_round(policies, 1, fake_dialogues(), length_reward, DCFG, store)
        assert summary["roles"]["actor"]["reference"] == (
            "actor adapter at round start (frozen copy 'actor_start')" if reference == "previous"
            else "base, adapters disabled")
        rows = [json.loads(line) for line in (tmp_path / reference / TRAIN_METRICS_FILE).read_text().splitlines()]
        return next(r for r in rows if r["round"] == 1 and "objective/kl" in r)["objective/kl"]

    assert first_kl("previous") == 0.0  # policy == reference at the first step of round 1
    assert first_kl("base") != 0.0


def test_round_two_judge_is_the_partner_at_round_start(smol_tokenizer, tmp_path):
    store = RunStore(tmp_path)
    policies = Policies(tiny_pair(smol_tokenizer), cfg())
    train_round(policies, 0, fake_dialogues(), length_reward, DCFG, store)
    at_start = {role: logits(policies.models[role], IDS) for role in ("actor", "judge")}
    seen = {}

    def reward_for(judge):
        role = "judge" if "judge_start" in repr(judge.model) else "actor"
        seen[role] = judge

        def reward(prompts, completions, **kwargs):
            seen[role + "_logits"] = logits(judge, IDS)
            return [float(len(c[0]["content"])) for c in completions]

        return reward

    summary = train_round(policies, 1, fake_dialogues(), reward_for, DCFG, store)
    assert summary["roles"]["judge"]["judge"] == "actor adapter at round start (frozen copy 'actor_start')"
    # the actor had already been trained this round when it judged the judge: still its round-start weights
    assert torch.equal(seen["actor_logits"], at_start["actor"])
    assert torch.equal(seen["judge_logits"], at_start["judge"])


# ---------------------------------------------------------------------------------------- full fine-tuning


def test_full_fine_tuning_saves_and_reloads_weights(smol_tokenizer, tmp_path):
    store = RunStore(tmp_path)
    models = tiny_pair(smol_tokenizer, shared=True)
    policies = Policies(models, cfg(method="full"))
    assert policies.base["judge"].model is not policies.base["actor"].model  # each role owns its weights
    base = logits(policies.models["actor"], IDS)
    train_round(policies, 0, fake_dialogues(), length_reward, DCFG, store)
    trained = logits(policies.models["actor"], IDS)
    assert not torch.equal(trained, base)
    assert (tmp_path / "adapters/round_0/actor/config.json").exists()
    store.finish(0, "training", {})
    resumed = Policies(tiny_pair(smol_tokenizer), cfg(method="full"))
    resumed.restore(store, rounds=1)
    assert torch.allclose(logits(resumed.models["actor"], IDS), trained, atol=1e-6)


def test_full_fine_tuning_trains_fp32_weights(smol_tokenizer, tmp_path):
    """Half-precision weights are upcast for full fine-tuning: bf16 AdamW would drop most updates."""
    model = make_tiny_model(smol_tokenizer, dtype=torch.bfloat16)
    lm = LoadedModel("tiny", model, smol_tokenizer, ModelConfig(name="tiny", max_length=512))
    policies = Policies({"actor": lm, "judge": lm}, cfg(method="full", bidirectional=False))
    assert {p.dtype for r in ("actor", "judge") for p in policies.base[r].model.parameters()} == {torch.float32}
    before = [p.detach().clone() for p in policies.base["actor"].model.parameters()]
    train_round(policies, 0, fake_dialogues(), length_reward, DCFG, RunStore(tmp_path))
    after = list(policies.base["actor"].model.parameters())
    assert all(p.dtype == torch.float32 for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_saved_adapters_travel_with_a_model_card(smol_tokenizer, tmp_path):
    """The adapter names its base by hub id (or the path the user gave), never a cache path of this machine; it
    loads onto the base found under another path on another machine; its model card says what trained it."""
    import json
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pair = tiny_pair(smol_tokenizer)
    for lm in pair.values():
        lm.cfg.hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    policies = Policies(pair, cfg())
    train_round(policies, 0, fake_dialogues(), length_reward, DCFG, RunStore(tmp_path / "run"),
                about={"reward": "zeta 0.4"})
    folder = tmp_path / "run" / "adapters/round_0/actor"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (folder / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    for fact in ("| role | actor |", "| round | 0 |", "| reward | zeta 0.4 |", "| steps | 1 |", "| judge | tiny"):
        assert fact in card, fact
    # "another machine": the base saved under another path, the adapter copied elsewhere
    make_tiny_model(smol_tokenizer, seed=0).save_pretrained(tmp_path / "elsewhere" / "base")
    shutil.copytree(folder, tmp_path / "elsewhere" / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "elsewhere" / "base")
    moved = PeftModel.from_pretrained(base, str(tmp_path / "elsewhere" / "adapter"))
    assert torch.allclose(moved(torch.tensor([IDS])).logits[0].float(), logits(policies.models["actor"], IDS),
                          atol=1e-5)


def test_cut_adapter_weights_are_one_line_naming_the_file(smol_tokenizer, tmp_path):
    """An interrupted copy leaves part of adapter_model.safetensors: loading names the file, not a traceback."""
    store = RunStore(tmp_path)
    train_round(Policies(tiny_pair(smol_tokenizer), cfg()), 0, fake_dialogues(), length_reward, DCFG, store)
    store.finish(0, "training", {})
    weights = tmp_path / "adapters/round_0/actor/adapter_model.safetensors"
    check_weights(weights.parent, tmp_path)  # whole: nothing to say
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ExpertChatError, match=rf"^adapters/round_0/actor/adapter_model\.safetensors is incomplete or "
                                              rf"corrupt \({size // 2} bytes; .*copy it again"):
        Policies(tiny_pair(smol_tokenizer), cfg()).restore(store, rounds=1)


def test_a_deleted_adapter_is_never_replaced_by_the_base(smol_tokenizer, tmp_path):
    """The marker says round 0 saved the actor's adapter; the folder is gone: a resume stops in one line."""
    import shutil

    store = RunStore(tmp_path)
    summary = train_round(Policies(tiny_pair(smol_tokenizer), cfg()), 0, fake_dialogues(), length_reward, DCFG, store)
    store.finish(0, "training", summary)
    check_saved(store, [0])  # all there
    shutil.rmtree(tmp_path / "adapters/round_0/actor")
    with pytest.raises(ExpertChatError, match=r"^adapters/round_0/actor is missing, but stages/round_0\.training\.json "
                                              r"says round 0 saved actor's policy there"):
        Policies(tiny_pair(smol_tokenizer), cfg()).restore(store, rounds=2)


# ------------------------------------------------------------------------------------ a Mixtral's experts


@pytest.mark.parametrize("four_bit", [False, True], ids=["fp32", "nf4"])
def test_one_dpo_step_adapts_mixtrals_attention_and_experts_and_round_trips(smol_tokenizer, tmp_path, four_bit):
    """LoRA on q/k/v/o and the per-expert w1/w2/w3 of a tiny Mixtral (engine/experts.py), in fp32 and on an nf4
    base (QLoRA; bitsandbytes' CPU backend): one online DPO step changes every adapted kind of layer; the saved
    adapter reloads onto a fresh load with the same logits."""
    from peft import PeftModel

    from expertchat.config.schema import TrainingConfig
    from expertchat.engine.models import load_model
    from tests.conftest import bnb_cpu, save_tiny_mixtral

    if four_bit:
        bnb_cpu()
    save_tiny_mixtral(smol_tokenizer, tmp_path / "mixtral")
    model_cfg = ModelConfig(name="mixtral", path=str(tmp_path / "mixtral"), dtype="float32", max_length=512,
                            load_in_4bit=four_bit, bnb_4bit_compute_dtype="float32", device=None if four_bit else "cpu")
    lm = load_model(model_cfg)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
    training = TrainingConfig(steps=1, max_new_tokens=6, learning_rate=1e-2, bidirectional=False,
                              lora=LoraSettings(target_modules=targets))
    store = RunStore(tmp_path / "run")
    policies = Policies({"actor": lm, "judge": lm}, training)
    summary = train_round(policies, 0, fake_dialogues(), length_reward, DCFG, store)
    assert summary["roles"]["actor"]["steps"] == 1
    peft = next(iter(policies._peft.values()))
    moved = {n.split(".lora_B.")[0].rpartition(".")[2] for n, p in peft.named_parameters()
             if ".lora_B.actor." in n and torch.count_nonzero(p)}
    assert moved == set(targets)  # B starts at 0: every target kind was reached and changed
    assert any(".experts.3.w2.lora_B.actor" in n for n, _ in peft.named_parameters())
    trained = logits(policies.models["actor"], IDS)
    fresh = PeftModel.from_pretrained(load_model(model_cfg).model, str(tmp_path / "run/adapters/round_0/actor"))
    assert torch.allclose(fresh(torch.tensor([IDS])).logits[0].float(), trained, atol=1e-5)


def test_the_dpo_reference_shows_the_forward_arguments_of_its_model(smol_tokenizer):
    """TRL's reference is a :class:`Reference` module whose forward takes ``**kwargs``; code that inspects the
    forward (the KV-cache argument's name: ``cache`` since transformers 5.25) sees the model under it, plain or
    PEFT-wrapped, and the reference's log-probs on a cache equal the model's own."""
    from peft import LoraConfig, get_peft_model

    from expertchat.engine.kvcache import forward_kwargs
    from expertchat.engine.logprobs import completion_logprobs
    from expertchat.policies.views import ModelView, Reference
    from tests.conftest import make_tiny_model

    plain = make_tiny_model(smol_tokenizer)
    wrapped = get_peft_model(make_tiny_model(smol_tokenizer), LoraConfig(r=2, target_modules=["q_proj"]))
    for model in (plain, wrapped):
        reference = Reference(ModelView(model, lambda: (None, None)))
        assert forward_kwargs(reference) == ("cache", True)
    ids, mask = torch.tensor([[5, 6, 7]] * 2), torch.ones(2, 3, dtype=torch.long)
    rows = (ids, mask, torch.tensor([[8, 9], [10, 11]]), torch.ones(2, 2, dtype=torch.long))
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(Reference(ModelView(plain, lambda: (None, None))), *rows),
                                   completion_logprobs(plain, *rows))
