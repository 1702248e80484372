"""The run-folder reader: records read by the one JSONL reader (bad lines counted per file), markers parsed by
the store's own rule."""

from __future__ import annotations

from expertchat.runs.reader import load
from expertchat.runs.store import RunStore


def test_load_counts_bad_lines_per_file_and_reads_the_markers(tmp_path):
    store = RunStore(tmp_path)
    store.append("turns.jsonl", {"round": 0, "turn": 0, "text": "a\u2028b"})
    (tmp_path / "turns.jsonl").open("a", encoding="utf-8").write('[1, 2]\n\n{"round": 0, "tu')  # not a record, cut
    (tmp_path / "ratings.jsonl").write_bytes(b'{"round": 0}\n{"text": "\xe9"}\n')  # a byte that is not UTF-8
    store.finish(0, "dialogue", {"turns": 1})
    store.finish("base", "evaluation", {"round": "base"})
    (tmp_path / "stages" / "notes.json").write_text("{}")
    data = load(tmp_path)
    assert data.turns == [{"round": 0, "turn": 0, "text": "a\u2028b"}] and data.ratings == [{"round": 0}]
    assert data.bad_lines == {"turns.jsonl": 1, "ratings.jsonl": 1}
    assert set(data.markers) == {(0, "dialogue")} and [e["round"] for e in data.evals] == ["base"]
