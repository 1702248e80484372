"""The evaluation stage: held-out prompts never used by a dialogue, the base and every round answered the same way
and scored by the frozen judge, the rows and summaries of the issue's contract, paired statistics with bootstrap
CIs, resume by stage."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from expertchat.errors import ExpertChatError
from expertchat.runs.store import RunStore
from expertchat.stages import evaluation, heldout
from tests.conftest import DATA, eval_cfg, read_rows, tiny_load_pair

ROW_KEYS = {"round", "role", "model", "prompt_id", "prompt", "sample", "answer", "tokens", "cut", "copied_fraction",
            "distinct_1", "distinct_2", "scores", "score", "rating", "wim", "similarity", "reward"}
MODEL_KEYS = {"n", "reward_mean", "reward_ci", "scores", "delta_vs_base", "win", "tie", "loss", "win_rate",
              "tokens_mean", "length_ratio", "distinct_1", "distinct_2", "distinct_2_ratio", "cut_fraction",
              "copied_fraction"}


def test_a_run_evaluates_the_base_and_every_round_on_held_out_topics(smol_tokenizer, tmp_path, monkeypatch):
    from expertchat.modes import run as pipeline

    monkeypatch.setattr(pipeline, "load_pair", tiny_load_pair(smol_tokenizer))
    cfg = eval_cfg(tmp_path, "rounds=2")
    pipeline.run(cfg)
    rows = read_rows(tmp_path / "eval.jsonl")
    assert all(set(r) == ROW_KEYS for r in rows)
    assert Counter((r["round"], r["role"]) for r in rows) == {(p, role): 3 for p in ("base", 0, 1)
                                                              for role in ("actor", "judge")}
    # held out: never a dialogue's topic, recorded with the settings, drawn from the topics source
    held = json.loads((tmp_path / "eval_prompts.json").read_text())
    topics = {p["topic"] for p in held["prompts"]}
    assert len(topics) == 3 and not topics & set(json.loads((tmp_path / "topics.json").read_text()))
    assert topics <= set(cfg.topics.items) and held["settings"]["max_new_tokens"] == 4
    assert {r["prompt"] for r in rows} == {cfg.dialogue.opening.format(topic=t) for t in topics}
    assert all(r["tokens"] <= 4 and isinstance(r["cut"], bool) and 0 <= r["copied_fraction"] <= 1 for r in rows)
    # the summaries: the base has no delta; a round's delta is the mean of its paired reward differences
    base = json.loads((tmp_path / "stages/base.evaluation.json").read_text())
    assert base["round"] == "base" and base["prompts"] == 3 and base["samples"] == 1 and base["judge"] == "tiny"
    assert set(base["models"]) == {"actor", "judge"}
    assert all(set(m) >= MODEL_KEYS and m["delta_vs_base"] is None and m["win_rate"] is None
               for m in base["models"].values())
    for r in (0, 1):
        s = json.loads((tmp_path / f"stages/round_{r}.evaluation.json").read_text())
        for role, m in s["models"].items():
            before = {x["prompt_id"]: x["reward"] for x in rows if x["round"] == "base" and x["role"] == role}
            deltas = [x["reward"] - before[x["prompt_id"]] for x in rows if x["round"] == r and x["role"] == role]
            assert m["delta_vs_base"]["mean"] == pytest.approx(sum(deltas) / 3, abs=1e-4)
            assert m["win"] + m["tie"] + m["loss"] == m["delta_vs_base"]["pairs"] == 3
            assert m["length_ratio"] == pytest.approx(m["tokens_mean"] / base["models"][role]["tokens_mean"], 1e-3)


def test_a_resumed_run_redoes_only_the_missing_evaluation(smol_tokenizer, tmp_path, monkeypatch):
    from expertchat.modes import run as pipeline

    monkeypatch.setattr(pipeline, "load_pair", tiny_load_pair(smol_tokenizer))
    cfg = eval_cfg(tmp_path)
    pipeline.run(cfg)
    before = (tmp_path / "eval.jsonl").read_text()
    prompts = (tmp_path / "eval_prompts.json").read_text()
    (tmp_path / "stages/round_0.evaluation.json").unlink()  # killed during round 0's evaluation
    pipeline.run(cfg)
    assert (tmp_path / "eval.jsonl").read_text() == before  # greedy: the same answers, none twice
    assert (tmp_path / "eval_prompts.json").read_text() == prompts
    assert len(read_rows(tmp_path / "eval.incomplete.jsonl")) == 2 * 3  # the interrupted point's rows, aside
    assert (tmp_path / "stages/round_0.evaluation.json").exists()


def test_evaluation_can_be_turned_off(smol_tokenizer, tmp_path, monkeypatch):
    from expertchat.modes import run as pipeline

    monkeypatch.setattr(pipeline, "load_pair", tiny_load_pair(smol_tokenizer))
    pipeline.run(eval_cfg(tmp_path, "evaluation.enabled=false", "training.steps=0"))
    assert not (tmp_path / "eval.jsonl").exists() and not (tmp_path / "stages/base.evaluation.json").exists()
    assert json.loads((tmp_path / "stages/round_0.evaluation.json").read_text())["skipped"]


# ------------------------------------------------------------------------------------------- the prompts


def test_held_out_topics_avoid_used_ones_and_leave_some_for_the_dialogues():
    source = [f"t{i}" for i in range(10)]
    held = heldout.held_out_topics(source, 4, seed=3)
    assert len(held) == 4 and held == [t for t in source if t in held]
    assert held == heldout.held_out_topics(source, 4, seed=3) != heldout.held_out_topics(source, 4, seed=4)
    assert not set(heldout.held_out_topics(source, 4, seed=3, used=held)) & set(held)
    with pytest.raises(ExpertChatError, match="evaluation.holdout=10 leaves no topic"):
        heldout.held_out_topics(source, 10, seed=0)
    with pytest.raises(ExpertChatError, match="evaluation.source=jsonl"):
        heldout.held_out_topics(source, 2, seed=0, used=source)


def test_questions_from_a_jsonl_file(tmp_path):
    from tests.conftest import compose_cfg

    cfg = compose_cfg("evaluation.source=jsonl", f"evaluation.path={DATA / 'mt_bench_questions.jsonl'}",
                      "evaluation.limit=5")
    prompts = heldout.plan_prompts(cfg, RunStore(tmp_path))
    first = json.loads((DATA / "mt_bench_questions.jsonl").read_text().splitlines()[0])
    assert [p.id for p in prompts] == list(range(5)) and prompts[0].question == first["turns"][0]
    assert heldout.held_out(cfg, prompts) == frozenset()  # the dialogues keep every topic


def test_a_folder_keeps_its_prompts_and_refuses_other_settings(tmp_path):
    from tests.conftest import compose_cfg

    cfg, store = compose_cfg(), RunStore(tmp_path)
    prompts = heldout.plan_prompts(cfg, store)
    heldout.record_prompts(cfg, store, prompts)
    assert heldout.plan_prompts(compose_cfg("seed=9"), store) == prompts  # recorded: the seed no longer draws
    with pytest.raises(ExpertChatError, match=r"evaluation\.max_new_tokens is 9 but .*eval_prompts\.json") as info:
        heldout.plan_prompts(compose_cfg("evaluation.max_new_tokens=9"), store)
    assert "\n" not in str(info.value)


def test_generated_topics_need_a_questions_file(tmp_path):
    from tests.conftest import compose_cfg

    with pytest.raises(ExpertChatError, match="topics=generated set evaluation.source=jsonl"):
        heldout.plan_prompts(compose_cfg("topics=generated"), RunStore(tmp_path))


@pytest.mark.parametrize("override, key", [("evaluation.samples=3", "evaluation.samples"),
                                           ("evaluation.source=jsonl", "evaluation.path"),
                                           ("evaluation.strategy=beam", "evaluation.strategy")])
def test_bad_evaluation_settings_name_the_key(override, key):
    from tests.conftest import compose_cfg

    with pytest.raises(ExpertChatError, match=key.replace(".", r"\.")):
        compose_cfg(override)


def test_decoding_is_greedy_or_seeded_sampling():
    from tests.conftest import compose_cfg

    greedy = evaluation.decoding(compose_cfg())
    assert (greedy.strategy, greedy.top_k) == ("sample", 1)
    sample = evaluation.decoding(compose_cfg("evaluation.strategy=sample", "evaluation.samples=2"))
    assert (sample.top_k, sample.temperature) == (0, 0.7)


# ------------------------------------------------------------------------------------------- statistics


def row(prompt_id, reward, tokens=10, cut=False, copied=0.0, sample=0):
    return {"prompt_id": prompt_id, "sample": sample, "reward": reward, "tokens": tokens, "cut": cut,
            "copied_fraction": copied, "scores": {"knowledge": None if reward is None else 5 + reward}}


def test_the_paired_summary_counts_wins_ties_and_losses():
    from tests.conftest import compose_cfg

    cfg = compose_cfg("judging.rubric.human_expert_likeness.weight=0")
    base_rows = [row(0, 0.1), row(1, 0.2), row(2, 0.3), row(3, None)]
    base = evaluation.role_summary(base_rows, [[1, 2, 3]] * 4, None, None, cfg)
    assert base["delta_vs_base"] is None and base["n"] == 3 and base["reward_mean"] == pytest.approx(0.2)
    rows = [row(0, 0.2, tokens=20, cut=True, copied=0.5), row(1, 0.205), row(2, 0.1), row(3, 0.4)]
    s = evaluation.role_summary(rows, [[1, 2, 1, 2]] * 4, base, base_rows, cfg)
    assert (s["win"], s["tie"], s["loss"], s["win_rate"]) == (1, 1, 1, 0.5)  # the unscored base answer: no pair
    assert s["delta_vs_base"]["pairs"] == 3
    assert s["delta_vs_base"]["mean"] == pytest.approx((0.1 + 0.005 - 0.2) / 3, abs=1e-5)
    lo, hi = s["delta_vs_base"]["ci"]
    assert lo <= s["delta_vs_base"]["mean"] <= hi
    assert s["length_ratio"] == pytest.approx(12.5 / 10) and s["cut_fraction"] == 0.25
    assert s["copied_fraction"] == pytest.approx(10 / 50)  # of answer tokens, not of answers
    assert s["distinct_2_ratio"] == pytest.approx((2 / 12) / (2 / 8), abs=1e-4)  # corpus distinct-2 over answers
    assert s["scores"]["knowledge"]["mean"] == pytest.approx(5 + (0.2 + 0.205 + 0.1 + 0.4) / 4)


def test_bootstrap_intervals_hold_the_mean_and_narrow_with_more_data():
    import numpy as np

    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 1, 20).tolist(), rng.normal(0.3, 1, 400).tolist()
    ci_small, ci_large = (evaluation.bootstrap_ci(v, 1000, 0) for v in (small, large))
    assert ci_small[0] < np.mean(small) < ci_small[1] and ci_large[0] < np.mean(large) < ci_large[1]
    assert ci_large[1] - ci_large[0] < ci_small[1] - ci_small[0]
    assert evaluation.bootstrap_ci(small, 1000, 0) == ci_small  # seeded
    assert evaluation.bootstrap_ci([0.0, 0.0, 1e-9, 0.0], 1000, 0) is not None  # nearly degenerate: no NaN
