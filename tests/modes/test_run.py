"""The training stage in the pipeline loop: resuming a killed training stage without duplicated records, more
rounds added to a finished run, a judge failure that keeps the earlier stages."""

from __future__ import annotations

import json

import pytest

from expertchat.errors import ExpertChatError
from expertchat.stages.training import TRAIN_METRICS_FILE
from tests.conftest import pipeline_cfg, tiny_load_pair


def test_pipeline_resumes_training_without_duplicating_records(smol_tokenizer, tmp_path, monkeypatch):
    from expertchat.modes import run as pipeline

    monkeypatch.setattr(pipeline, "load_pair", tiny_load_pair(smol_tokenizer))
    cfg = pipeline_cfg(tmp_path, "rounds=2")
    summary = pipeline.run(cfg)
    assert set(summary["training"]["roles"]) == {"actor", "judge"}
    for r in (0, 1):
        for role in ("actor", "judge"):
            assert (tmp_path / f"adapters/round_{r}/{role}/adapter_config.json").exists()
    rewards = json.loads((tmp_path / "rewards_by_round.json").read_text())
    assert [(row["round"], row["model"]) for row in rewards] == [(0, "actor"), (0, "judge"), (1, "actor"),
                                                                  (1, "judge")]
    files = {name: (tmp_path / name).read_text() for name in ("turns.jsonl", "ratings.jsonl")}
    metrics = (tmp_path / TRAIN_METRICS_FILE).read_text().splitlines()

    # killed during round 1's training: its marker and adapters are missing; the rerun redoes only that stage
    (tmp_path / "stages/round_1.training.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "adapters/round_1")
    pipeline.run(cfg)
    assert {name: (tmp_path / name).read_text() for name in files} == files
    again = (tmp_path / TRAIN_METRICS_FILE).read_text().splitlines()
    assert len(again) == len(metrics)  # round 1's earlier lines moved aside, not duplicated
    assert len((tmp_path / "train_metrics.incomplete.jsonl").read_text().splitlines()) == sum(
        json.loads(line)["round"] == 1 for line in metrics)
    assert (tmp_path / "adapters/round_1/judge/adapter_config.json").exists()
    assert len(json.loads((tmp_path / "rewards_by_round.json").read_text())) == 4

    # continued with one more round: the topics used are kept, new ones added; earlier records untouched
    topics = json.loads((tmp_path / "topics.json").read_text())
    pipeline.run(pipeline_cfg(tmp_path, "rounds=3"))
    assert json.loads((tmp_path / "topics.json").read_text())[:len(topics)] == topics
    turns = [json.loads(line) for line in (tmp_path / "turns.jsonl").read_text().splitlines()]
    assert (tmp_path / "turns.jsonl").read_text().startswith(files["turns.jsonl"])
    assert {t["round"] for t in turns} == {0, 1, 2} and sum(t["round"] == 2 for t in turns) == 2 * 2
    assert (tmp_path / "adapters/round_2/actor/adapter_config.json").exists()


def test_pipeline_judge_failure_keeps_earlier_stages(smol_tokenizer, tmp_path, monkeypatch):
    from expertchat.judging import rewards
    from expertchat.modes import run as pipeline

    def broken_reward_for(judging, reward):
        def make(judge):
            def reward_fn(prompts, completions, **kwargs):
                raise RuntimeError("CUDA error: device-side assert")
            return reward_fn
        return make

    monkeypatch.setattr(pipeline, "load_pair", tiny_load_pair(smol_tokenizer))
    monkeypatch.setattr(rewards, "reward_for", broken_reward_for)
    cfg = pipeline_cfg(tmp_path)
    with pytest.raises(ExpertChatError, match=r"training round 0 \(actor\) stopped at step 1/1: the judge"):
        pipeline.run(cfg)
    assert (tmp_path / "stages/round_0.dialogue.json").exists() and (tmp_path / "stages/round_0.rating.json").exists()
    assert not (tmp_path / "stages/round_0.training.json").exists()
    assert len((tmp_path / "turns.jsonl").read_text().splitlines()) == 4


def test_a_stage_runs_once_and_is_tracked_only_when_it_ran(tmp_path):
    from expertchat.modes import run as pipeline
    from expertchat.report.tracking import Tracker
    from expertchat.runs.store import RunStore

    class Recording(Tracker):
        def __init__(self):
            self.logged = []

        def log(self, metrics, step):
            self.logged.append((metrics, step))

    calls = []
    stage = pipeline.Stage("probe", lambda run, r: calls.append(r) or {"value": 7}, ["probe.jsonl"],
                           lambda s: [f"value {s['value']}"], lambda s: {"probe/value": s["value"], "probe/none": None})
    run = pipeline.Run(None, RunStore(tmp_path), Recording(), [], None, None)
    (tmp_path / "probe.jsonl").write_text('{"round": 0, "left": "by a killed attempt"}\n')
    assert pipeline.run_stage(run, 0, stage)["value"] == 7
    assert pipeline.run_stage(run, 0, stage)["value"] == 7  # done: skipped
    assert calls == [0] and run.tracker.logged[0] == ({"probe/value": 7}, 0)
    [(timed, step)] = run.tracker.logged[1:]  # the stage's wall seconds, into its marker and the tracker
    assert step == 0 and list(timed) == ["timing/probe/stage_seconds"]
    assert timed["timing/probe/stage_seconds"] == run.store.stage_summary(0, "probe")["timing"]["stage_seconds"] >= 0
    assert (tmp_path / "probe.incomplete.jsonl").exists()  # the interrupted attempt's record set aside


def test_the_same_seed_gives_byte_identical_records(smol_tokenizer, tmp_path, monkeypatch):
    """Determinism on a CPU: the same seed and config give byte-identical turns.jsonl and ratings.jsonl (no
    wall-clock field in a record) and the same trained adapters' rewards to the printed digit."""
    from expertchat.modes import run as pipeline

    monkeypatch.setattr(pipeline, "load_pair", tiny_load_pair(smol_tokenizer))
    for name in ("a", "b"):
        pipeline.run(pipeline_cfg(tmp_path / name, "seed=5"))
    for file in ("turns.jsonl", "ratings.jsonl", "rewards_by_round.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file


def test_an_emptied_stage_marker_stops_the_rerun_before_anything_is_written(tmp_path):
    from expertchat.modes import run as pipeline

    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "round_0.evaluation.json").write_bytes(b"")  # a full disk, an interrupted copy
    with pytest.raises(ExpertChatError, match=r"round_0\.evaluation\.json \(0 bytes\) is not JSON"):
        pipeline.check(pipeline_cfg(tmp_path))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["round_0.evaluation.json", "stages"]


@pytest.mark.parametrize("name, damage, why", [
    ("topics.json", b'["CRISPR base edit', r"is not JSON"),  # cut by an interrupted copy
    ("topics.json", b"{}", r"holds a JSON dict that is not a list of topics"),
    ("eval_prompts.json", b"", r"is not JSON"),
    ("eval_prompts.json", b'{"settings": {}, "prompts": [{"id": 0}]}',
     r"holds a JSON dict that is not a record of the held-out"),
])
def test_damaged_topics_or_eval_prompts_stop_the_rerun_in_one_line(tmp_path, name, damage, why):
    """Never topics or held-out prompts chosen anew in place of the ones the folder's records were made on."""
    from expertchat.modes import run as pipeline

    (tmp_path / name).write_bytes(damage)
    with pytest.raises(ExpertChatError, match=rf"^{tmp_path}/{name.replace('.', '[.]')} \({len(damage)} bytes\) "
                                              rf"{why}.*: it was cut or emptied .*; restore it from a copy") as err:
        pipeline.check(pipeline_cfg(tmp_path, f"hydra.run.dir={tmp_path}"))
    assert "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("records, gone", [("turns.jsonl", "topics.json"), ("eval.jsonl", "eval_prompts.json")])
def test_a_deleted_topics_or_prompts_file_beside_its_records_stops_the_rerun(tmp_path, records, gone):
    """Topics or held-out prompts chosen anew would silently differ from those the folder's dialogues or answers
    were made on (e.g. topics=generated): one line instead."""
    from expertchat.modes import run as pipeline

    (tmp_path / records).write_text('{"round": 0, "dialogue_id": "0", "turn": 0}\n')
    with pytest.raises(ExpertChatError, match=rf"^{tmp_path}/{gone.replace('.', '[.]')} is gone but {records} holds "
                                              rf".*: restore it from a copy"):
        pipeline.check(pipeline_cfg(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [records]
