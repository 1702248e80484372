"""interaction.py: each measure on crafted dialogues whose answer is known (a turn that copies its partner, two
identical speakers, a question, assent, words one speaker introduces and the other takes up)."""

from __future__ import annotations

import pytest

from expertchat.interaction import agrees, content_words, dialogue_measures, disagrees, questions, steering, words

TOPIC = "CRISPR base editing"


def test_a_turn_that_copies_its_partner_echoes_it_wholly():
    said = "Base editors change a single letter of DNA without cutting both strands."
    (first, copy) = dialogue_measures(TOPIC, [said, said])
    assert first["echo"] is None and first["vocab_overlap"] is None and first["length_ratio"] is None
    assert copy["echo"] == 1.0 and copy["vocab_overlap"] == 1.0 and copy["length_ratio"] == 1.0
    assert copy["novelty"] == 0.0 and copy["introduced"] == 0


def test_an_unrelated_answer_echoes_nothing_and_is_all_new():
    m = dialogue_measures(TOPIC, ["Base editors change one letter of DNA.", "Sourdough needs a lively starter."])[1]
    assert m["echo"] == 0.0 and m["vocab_overlap"] == 0.0 and m["novelty"] == 1.0
    assert m["length_ratio"] == pytest.approx(5 / 7, abs=1e-6)


def test_words_the_partner_takes_up_say_who_steers():
    texts = ["Bystander edits limit base editing precision.",  # introduces bystander, edits, limit, precision
             "Bystander edits matter, and delivery matters too.",  # takes up bystander, edits; introduces delivery...
             "Delivery by lipid nanoparticles works."]  # takes up delivery
    m = dialogue_measures(TOPIC, texts)
    assert m[0]["introduced"] == 4 and m[0]["taken_up"] == 2  # "base"/"editing" are the topic's: not new
    assert m[1]["taken_up"] == 1  # "delivery", taken up in turn 2
    assert steering(m, ["actor", "judge", "actor"]) == {"actor": pytest.approx(2 / 3, abs=1e-6),
                                                         "judge": pytest.approx(1 / 3, abs=1e-6)}
    assert steering(dialogue_measures(TOPIC, ["a", "b"]), ["actor", "judge"]) == {"actor": None, "judge": None}


@pytest.mark.parametrize("text, agree, disagree", [
    ("Your interpretation is spot on.", True, False),
    ("I couldn't agree more with that.", True, False),
    ("Exactly, and the data show it.", True, False),
    ("I disagree: the effect is small.", False, True),
    ("I'm not sure that holds for primates.", False, True),
    ("The spot is on the map, exactly where?", True, False),  # "exactly" assents even here: a lexicon's limit
    ("Base editors change one letter.", False, False),
])
def test_the_agreement_lexicon(text, agree, disagree):
    assert (agrees(text), disagrees(text)) == (agree, disagree)


def test_questions_words_and_content_words():
    assert questions("Why? And how would it scale?? It would not.") == 2
    assert questions("No question here.") == 0
    assert words("It’s CRISPR's edge-case") == ["it's", "crispr's", "edge", "case"]
    assert content_words("The base editor is a tool of the lab") == {"base", "editor", "tool", "lab"}


def test_empty_turns_are_measured_without_dividing_by_zero():
    m = dialogue_measures(TOPIC, ["", ""])
    assert m[1]["echo"] is None and m[1]["novelty"] is None and m[1]["length_ratio"] is None
    assert m[1]["vocab_overlap"] is None and m[1]["words"] == 0


def test_the_lexicon_on_the_crafted_agreement_pairs():
    """tests/data/agreement_pairs.jsonl (experiments/agreement): exact on replies that say so with a marker; blind
    to assent in content only, where it reads agreement as none (a floor, as the README of the experiment says)."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(__file__).parent / "data" / "agreement_pairs.jsonl").read_text()
            .splitlines()]
    called = [agrees(r["reply"]) and not disagrees(r["reply"]) for r in rows]
    marked = [c == r["agrees"] for c, r in zip(called, rows) if r["marked"]]
    unmarked = [(c, r["agrees"]) for c, r in zip(called, rows) if not r["marked"]]
    assert len(rows) == 32 and all(marked) and len(marked) == 16
    assert not any(c and not a for c, a in unmarked)  # never calls a disagreeing reply agreeing
    assert sum(c == a for c, a in unmarked) == 9  # 8 disagreeing right, 1 of the 8 agreeing ("indeed")
