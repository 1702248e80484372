"""The one reader of input records (topics, rate input), on the real-world inputs the product mishandled
(tests/data/cases, from ../shared/cases) and on the other inputs of the same kinds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertchat.config.schema import RateConfig, TopicsConfig
from expertchat.errors import ExpertChatError
from expertchat.modes import rate
from expertchat.runs.inputs import message_text, read_records
from expertchat.stages.topics import load_topics
from tests.conftest import DATA, ROOT  # noqa: F401

CASES = DATA / "cases"


def topics(path: Path, field: str = "topic") -> list[str]:
    return load_topics(TopicsConfig(source="jsonl", path=str(path), field=field), 2)


def rated(path: Path, **fields) -> tuple[list, list]:
    return rate.read_records(str(path), RateConfig(**fields))


def test_a_byte_order_mark_is_skipped():
    items, bad = rated(CASES / "utf8-bom" / "bom.jsonl")
    assert [it.meta["id"] for it in items] == ["q1", "q2", "q3"] and bad == []
    assert topics(CASES / "utf8-bom" / "topics_bom.jsonl") == [
        "How glaciers record past climate", "Why concrete cracks"]


def test_a_raw_line_separator_inside_a_string_is_legal_json():
    loaded = topics(CASES / "topics-u2028" / "topics_u2028.jsonl")
    assert loaded == ["Line one\u2028line two of the same topic", "Why concrete cracks"]


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e", "\x0c", "\x0b"])
def test_jsonl_splits_on_newline_only(tmp_path, char):
    """Every character Python's str.splitlines() would split on, raw inside a JSON string."""
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"topic": f"a{char}b"}, ensure_ascii=False) + "\n" + '{"topic": "c"}\n',
                    encoding="utf-8")
    records = read_records(path)
    assert [v["topic"] for _, v in records.good] == [f"a{char}b", "c"] and records.bad == []


def test_a_non_utf8_byte_is_one_line_for_topics_and_a_bad_record_for_rating():
    with pytest.raises(ExpertChatError, match=r"topics_latin1.jsonl:1: not UTF-8: byte 0xe8 at byte 20 of .*UTF-8"):
        topics(CASES / "non-utf8-bytes" / "topics_latin1.jsonl")
    items, bad = rated(CASES / "non-utf8-bytes" / "latin1.jsonl")
    assert [it.meta["id"] for it in items] == ["q1"]
    assert [b["line"] for b in bad] == [2] and "not UTF-8: byte 0xe9" in bad[0]["reason"]


def test_a_lone_surrogate_is_a_bad_record(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"question": "q", "answer": "bad \\ud800 half"}\n{"question": "q", "answer": "fine"}\n')
    items, bad = rated(path)
    assert [it.answer for it in items] == ["fine"] and [b["line"] for b in bad] == [1]
    assert "lone surrogate" in bad[0]["reason"]


def test_chat_content_parts_are_joined_and_other_parts_refused(tmp_path):
    items, bad = rated(CASES / "chat-content-parts" / "chat_parts.jsonl")
    assert bad == [] and items[0].answer.startswith("The Shockley-Queisser limit") and "[{" not in items[0].answer
    assert items[0].context.startswith("What limits the efficiency")
    image = {"messages": [{"role": "user", "content": "Describe it."}, {"role": "assistant", "content": [
        {"type": "text", "text": "A cat."}, {"type": "image_url", "image_url": {"url": "x"}}]}]}
    path = tmp_path / "img.jsonl"
    path.write_text(json.dumps(image) + "\n")
    items, bad = rated(path)
    assert items == [] and "'image_url' content part" in bad[0]["reason"]
    assert message_text([{"type": "text", "text": "a"}, "b"]) == "a\n\nb"


def test_a_json_array_of_records_is_read():
    items, bad = rated(CASES / "alpaca-json-array" / "alpaca_outputs.json", question_field="instruction",
                       answer_field="output")
    assert len(items) == 3 and bad == [] and [it.meta["line"] for it in items] == [1, 2, 3]


def test_crlf_and_blank_lines_are_fine(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b'{"topic": "a"}\r\n\r\n   \r\n{"topic": "b"}\r\n')
    assert topics(path) == ["a", "b"]


def test_lines_that_are_arrays_are_jsonl_not_one_array(tmp_path):
    path = tmp_path / "arrays.jsonl"
    path.write_text('["a", 1]\n["b", 2]\n')
    records = read_records(path)
    assert not records.array and [v for _, v in records.good] == [["a", 1], ["b", 2]]


def test_long_answers_say_they_were_cut_and_the_judge_sees_their_ends(smol_tokenizer, tmp_path, monkeypatch,
                                                                     caplog):
    """tests/data/cases/silent-answer-truncation: two long answers with the same start and opposite endings.
    The judge reads each one's first and last halves, so they no longer score the same; every row says that the
    judge (and the embedder) saw it cut, with its token count; the summary counts them and the log warns."""
    import torch

    from expertchat.config.schema import ExpertChatConfig, JudgingConfig, ModelConfig, RewardConfig
    from expertchat.engine.models import LoadedModel
    from tests.conftest import make_tiny_model, smollm2_config

    class ShortWindowEmbedder:
        def fits(self, texts):
            return [len(t) < 1000 for t in texts]

        def similarity(self, a, b):
            return [0.5 for _ in a]

    tiny = LoadedModel("tiny", make_tiny_model(smol_tokenizer, dtype=torch.float32), smol_tokenizer,
                       ModelConfig(name="tiny"))
    monkeypatch.setattr("expertchat.engine.models.load_model", lambda cfg: tiny)
    monkeypatch.setattr("expertchat.judging.rewards.load_embedder", lambda cfg: ShortWindowEmbedder())
    cfg = ExpertChatConfig(mode="rate", judge=smollm2_config(),
                           rate=RateConfig(input=str(CASES / "silent-answer-truncation" /
                                                                  "long_answers.jsonl"), bootstrap=0),
                           judging=JudgingConfig(max_answer_tokens=64, wim_max_new_tokens=4), reward=RewardConfig(),
                           run_dir=str(tmp_path / "run"))
    summary = rate.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "ratings.jsonl").read_text().splitlines()]
    assert all(r["judge_saw_whole"] is False and r["answer_tokens"] == 64 and r["answer_total_tokens"] > 64
               for r in rows)
    assert all(r["embedder_saw_whole"] is False for r in rows)
    assert rows[0]["score"] != rows[1]["score"]  # the endings differ, and the judge read them
    assert summary["judge_cut"] == 2 and summary["embedder_cut"] == 2
    assert "the judge saw 2 cut" in caplog.text
