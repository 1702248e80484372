"""The run folder: flushed appends, stage markers, and resuming without duplicate records."""

from __future__ import annotations

import json

import pytest

from expertchat.errors import ExpertChatError
from expertchat.runs.store import STAGES_DIR, RunStore, marker_name, parse_marker


def test_append_is_flushed_and_readable(tmp_path):
    store = RunStore(tmp_path)
    store.append("turns.jsonl", {"round": 0, "text": "é"})
    assert json.loads((tmp_path / "turns.jsonl").read_text(encoding="utf-8")) == {"round": 0, "text": "é"}
    store.append("turns.jsonl", {"round": 1, "text": "b"})
    assert [r["text"] for r in store.read("turns.jsonl", round=1)] == ["b"]


def test_read_skips_a_line_cut_mid_write(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"a": 1}\n{"a": ')
    assert RunStore(tmp_path).read("x.jsonl") == [{"a": 1}]


def test_stage_markers(tmp_path):
    store = RunStore(tmp_path)
    assert not store.done(0, "dialogue")
    store.finish(0, "dialogue", {"turns": 8})
    assert store.done(0, "dialogue") and not store.done(1, "dialogue")
    assert store.stage_summary(0, "dialogue")["turns"] == 8
    assert store.stage_summary(0, "dialogue")["peak_rss_gb"] > 0  # the process's peak memory so far
    with pytest.raises(RuntimeError):
        store.begin(0, "dialogue", ["turns.jsonl"])


def test_restarting_an_interrupted_stage_moves_its_records_aside(tmp_path):
    store = RunStore(tmp_path)
    store.append("turns.jsonl", {"round": 0, "turn": 0})
    store.finish(0, "dialogue")
    store.append("turns.jsonl", {"round": 1, "turn": 0})  # round 1 was interrupted after one record
    (tmp_path / "turns.jsonl").open("a").write('{"round": 1, "tu')  # and a cut line
    store.begin(1, "dialogue", ["turns.jsonl", "missing.jsonl"])
    assert store.read("turns.jsonl") == [{"round": 0, "turn": 0}]
    aside = (tmp_path / "turns.incomplete.jsonl").read_text().splitlines()
    assert aside[0] == '{"round": 1, "turn": 0}' and len(aside) == 2


def test_write_json_is_atomic_and_leaves_no_temp_file(tmp_path):
    store = RunStore(tmp_path)
    store.write_json("a/b.json", {"x": 1})
    assert store.read_json("a/b.json") == {"x": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def test_resume_refuses_a_changed_config_unless_forced(tmp_path):
    store = RunStore(tmp_path)
    first = {"seed": 0, "rounds": 1, "progress": True, "training": {"learning_rate": 5e-5},
             "tracker": {"backend": "none"}}
    assert store.check_resume(first, ("progress", "rounds", "tracker"), force=False) == {}  # a new folder
    store.record_config(first, {})
    harmless = {**first, "rounds": 3, "progress": False, "tracker": {"backend": "wandb"}}
    assert store.check_resume(harmless, ("progress", "rounds", "tracker"), force=False) == {}
    changed = {**first, "seed": 1, "training": {"learning_rate": 1e-4}}
    with pytest.raises(Exception, match=r"seed \(0 -> 1\), training.learning_rate .*resume=force"):
        store.check_resume(changed, ("progress", "rounds", "tracker"), force=False)
    forced = store.check_resume(changed, ("progress", "rounds", "tracker"), force=True)
    assert forced == {"seed": [0, 1], "training.learning_rate": [5e-5, 1e-4]}
    store.record_config(changed, forced)
    assert json.loads((tmp_path / "resumes.jsonl").read_text())["changed"]["seed"] == [0, 1]


def test_marker_names_are_built_and_parsed_in_one_place(tmp_path):
    store = RunStore(tmp_path)
    store.finish("base", "evaluation")
    store.finish(2, "training")
    names = sorted(p.name for p in (tmp_path / STAGES_DIR).iterdir())
    assert names == ["base.evaluation.json", "round_2.training.json"]
    assert marker_name(2, "training") == f"{STAGES_DIR}/round_2.training.json"
    assert [parse_marker(n) for n in names] == [("base", "evaluation"), (2, "training")]
    assert parse_marker(".round_2.training.json.tmp1") is None and parse_marker("round_x.training.json") is None


def test_restarting_keeps_records_that_hold_unicode_line_separators(tmp_path):
    """Lines end at \\n only: a text holding U+2028 or U+0085 is one record, read and kept whole."""
    store = RunStore(tmp_path)
    text = "a\u2028b\x85c"
    store.append("turns.jsonl", {"round": 0, "text": text})
    store.finish(0, "dialogue")
    store.append("turns.jsonl", {"round": 1, "text": "x"})
    assert store.begin(1, "dialogue", ["turns.jsonl"]) == {"turns.jsonl": 1}
    assert store.read("turns.jsonl") == [{"round": 0, "text": text}]


@pytest.mark.parametrize("damage", [b"", b'{"round": 0, "stage": "dia', b"[1, 2]", b"\xff\xfe"])
def test_an_unreadable_marker_is_one_line_naming_the_file(tmp_path, damage):
    store = RunStore(tmp_path)
    store.finish(0, "dialogue", {"dialogues": 2})
    store.finish(0, "rating", {"rated": 4})
    store.check_markers()  # whole markers: nothing to say
    (tmp_path / "stages" / "round_0.rating.json").write_bytes(damage)
    with pytest.raises(ExpertChatError, match=rf"stage marker .*round_0\.rating\.json \({len(damage)} bytes\) .*delete "
                                              r"it to run that stage again"):
        store.check_markers()
    with pytest.raises(ExpertChatError, match="round_0.rating.json"):
        store.stage_summary(0, "rating")
    assert store.stage_summary(0, "dialogue")["dialogues"] == 2


def test_a_finished_publish_leaves_no_scratch_and_an_empty_one_is_no_leftover(tmp_path):
    store = RunStore(tmp_path)
    root = store.scratch() / "save-0-actor"
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "weights.bin").write_bytes(b"w")
    store.publish(root / "adapter", "adapters/round_0/actor", written_in=root)
    assert (tmp_path / "adapters/round_0/actor/weights.bin").exists() and not (tmp_path / ".scratch").exists()
    store.scratch()  # created and left empty (nothing was killed)
    assert store.clean_leftovers() == [] and not (tmp_path / ".scratch").exists()
