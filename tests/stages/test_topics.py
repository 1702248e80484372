"""Topic sources: built-in, JSONL (incl. the real MT-Bench file), Hugging Face cache, model-generated."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertchat.config.schema import TopicsConfig
from expertchat.errors import ExpertChatError
from expertchat.stages.topics import first_sentence, get_field, load_topics
from tests.conftest import DATA


def test_builtin_cycles_when_shorter():
    cfg = TopicsConfig(items=["a", "b", " "])
    assert load_topics(cfg, 5) == ["a", "b", "a", "b", "a"]


def test_builtin_shuffle_is_seeded():
    cfg = TopicsConfig(items=[str(i) for i in range(20)], shuffle=True)
    assert load_topics(cfg, 20, seed=1) == load_topics(cfg, 20, seed=1) != load_topics(cfg, 20, seed=2)


def test_empty_topic_list_is_an_error():
    with pytest.raises(ExpertChatError, match="no topics"):
        load_topics(TopicsConfig(items=[]), 3)


def test_mt_bench_questions_with_turns_0():
    path = DATA / "mt_bench_questions.jsonl"
    topics = load_topics(TopicsConfig(source="jsonl", path=str(path), field="turns[0]"), 80)
    first = json.loads(path.read_text().splitlines()[0])["turns"][0]
    assert topics[0] == first.strip() and len(set(topics)) == 80


@pytest.mark.parametrize("record, path, value", [
    ({"a": {"b": [1, 2]}}, "a.b[1]", 2), ({"turns": ["x"]}, "turns.0", "x"), ({"t": "v"}, "t", "v"),
])
def test_get_field(record, path, value):
    assert get_field(record, path) == value


def test_missing_file_and_field_name_the_path(tmp_path):
    with pytest.raises(ExpertChatError, match="topics file not found: .*nope.jsonl"):
        load_topics(TopicsConfig(source="jsonl", path=str(tmp_path / "nope.jsonl")), 1)
    f = tmp_path / "t.jsonl"
    f.write_text('{"question": "q1"}\n\n{"other": 1}\n')
    with pytest.raises(ExpertChatError, match=r"t\.jsonl:3: no field 'question'"):
        load_topics(TopicsConfig(source="jsonl", path=str(f), field="question"), 1)
    with pytest.raises(ExpertChatError, match="topics.path is not set"):
        load_topics(TopicsConfig(source="jsonl"), 1)


def test_bad_json_names_the_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"topic": "a"}\n{broken\n')
    with pytest.raises(ExpertChatError, match=r"t\.jsonl:2: not valid JSON"):
        load_topics(TopicsConfig(source="jsonl", path=str(f)), 1)


def test_hf_dataset_not_cached_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ExpertChatError, match="not in the local cache"):
        load_topics(TopicsConfig(source="hf", dataset="no-such-org/no-such-dataset"), 1)


def test_first_sentence():
    assert first_sentence('"The ethics of AI." And more') == "The ethics of AI."
    assert first_sentence("no stop") == "no stop"


@given(st.lists(st.text(min_size=1, max_size=3000), min_size=1, max_size=4))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_topics_of_any_unicode_and_length_fit_the_context(smol_tokenizer, texts):
    """Any unicode, any length: every topic comes back as a string of at most a quarter of the context."""
    from expertchat.stages.topics import fit_topics

    out = fit_topics(texts, smol_tokenizer, max_length=256)
    assert len(out) == len(texts) and all(isinstance(t, str) for t in out)
    assert all(len(smol_tokenizer(t, add_special_tokens=False)["input_ids"]) <= 64 + 2 for t in out)
    assert [t for t, s in zip(out, texts) if len(smol_tokenizer(s, add_special_tokens=False)["input_ids"]) <= 64] \
        == [s for s in texts if len(smol_tokenizer(s, add_special_tokens=False)["input_ids"]) <= 64]


def test_a_very_long_topic_is_cut_with_a_warning(smol_tokenizer, caplog):
    from expertchat.stages.topics import fit_topics

    long = "Why the Byzantine Empire lasted a thousand years after the fall of Rome. " * 200
    out = fit_topics([long, "Soil carbon"], smol_tokenizer, max_length=2048)
    assert out[1] == "Soil carbon" and len(smol_tokenizer(out[0])["input_ids"]) <= 512 + 2
    assert out[0].startswith("Why the Byzantine Empire") and "1 of 2 topics were longer than 512 tokens" in caplog.text
