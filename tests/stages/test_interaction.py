"""stages/interaction.py: per-turn records with the embedder's measures, on crafted dialogues: one that leaves its
topic drifts, two identical speakers converge fully; the stage's summary and log lines."""

from __future__ import annotations

import pytest

from expertchat.config.schema import EmbedderConfig
from expertchat.runs.store import RunStore
from expertchat.stages import interaction
from expertchat.stages.dialogue import TURNS_FILE

TOPIC = "How CRISPR base editing differs from classic Cas9 cutting"


def turns(dialogue_id: str, texts: list[str], topic: str = TOPIC, round_idx: int = 0) -> list[dict]:
    return [{"dialogue_id": dialogue_id, "round": round_idx, "turn": i, "role": ("actor", "judge")[i % 2],
             "model": "m", "topic": topic, "text": text} for i, text in enumerate(texts)]


LEAVES = ["CRISPR base editing changes a single DNA letter without the double-strand cut Cas9 makes.",
          "Base editors still make bystander edits near the target letter.",
          "Speaking of letters, my grandmother wrote wonderful letters about her garden.",
          "Her tomatoes and roses won prizes at the county fair every summer."]
SAME = "Base editors convert one DNA base into another without cutting the double helix."


@pytest.fixture(scope="module")
def measured():
    rows = interaction.measure(turns("d-leaves", LEAVES) + turns("d-same", [SAME] * 4), EmbedderConfig())
    return {d: [r for r in rows if r["dialogue_id"] == d] for d in ("d-leaves", "d-same")}


def test_a_dialogue_that_leaves_its_topic_drifts(measured):
    adherence = [r["adherence"] for r in measured["d-leaves"]]
    assert adherence[0] > 0.6 and adherence[1] > 0.3  # on topic (MiniLM: 0.82, 0.37)
    assert max(adherence[2:]) < 0.1 and adherence[3] < adherence[0] - 0.6  # gone (-0.02, -0.06)


def test_two_identical_speakers_converge_and_echo_fully(measured):
    same = measured["d-same"]
    assert same[0]["partner_similarity"] is None
    assert all(r["partner_similarity"] == pytest.approx(1.0, abs=1e-5) for r in same[1:])
    assert all(r["echo"] == 1.0 and r["novelty"] == 0.0 for r in same[1:])
    assert len({r["adherence"] for r in same}) == 1


def test_records_hold_the_ids_and_every_measure(measured):
    row = measured["d-leaves"][1]
    assert {k: row[k] for k in ("round", "dialogue_id", "turn", "role", "model", "topic")} == \
        {"round": 0, "dialogue_id": "d-leaves", "turn": 1, "role": "judge", "model": "m", "topic": TOPIC}
    assert {"echo", "agreement", "disagreement", "questions", "novelty", "introduced", "taken_up", "length_ratio",
            "vocab_overlap", "adherence", "partner_similarity", "steer"} <= set(row)


def test_the_stage_writes_one_record_per_turn_and_summarizes_per_speaker(tmp_path):
    store = RunStore(tmp_path)
    for t in turns("r0-d0", LEAVES) + turns("r1-d0", [SAME] * 2, round_idx=1):
        store.append(TURNS_FILE, t)
    summary = interaction.measure_round(store, 0, EmbedderConfig())
    assert [r["turn"] for r in store.read(interaction.INTERACTION_FILE)] == [0, 1, 2, 3]  # round 1 not measured
    assert (summary["turns"], summary["dialogues"], set(summary["speakers"])) == (4, 1, {"actor", "judge"})
    actor = summary["speakers"]["actor"]
    assert actor["turns"] == 2 and actor["drift"] < -0.4  # turn 2 left the topic turn 0 was on
    assert summary["speakers"]["judge"]["echo"] is not None and actor["echo"] is not None
    (line, _) = interaction.describe(summary)
    assert line.startswith("actor: echo ") and "topic adherence" in line and "(drift -0." in line
    assert interaction.headlines(summary)["interaction/actor_drift"] == actor["drift"]


def test_no_turns_no_records(tmp_path):
    assert interaction.measure([], EmbedderConfig()) == []
    assert interaction.summarize([]) == {"turns": 0, "dialogues": 0, "speakers": {}}
