"""report/interaction.py: means over dialogues (not turns) with bootstrap CIs, the per-topic table ranked by the
partner's reward, the drift curve by turn, and the section of a folder measured or not."""

from __future__ import annotations

import pytest

from expertchat.report import interaction as section


def row(dialogue, turn, role, topic="t", **measures):
    return {"round": 0, "dialogue_id": dialogue, "turn": turn, "role": role, "topic": topic, "agreement": False,
            "echo": None, "adherence": 0.5, **measures}


def test_each_dialogue_is_one_observation():
    rows = [row("a", 0, "actor", echo=1.0), row("a", 2, "actor", echo=1.0), row("a", 4, "actor", echo=1.0),
            row("b", 0, "actor", echo=0.0)]
    assert sorted(section.by_dialogue(rows, "echo")) == [0.0, 1.0]  # not 3 of 4 turns: 1 of 2 dialogues
    assert section.by_dialogue([row("a", 0, "actor", agreement=True)], "agreement") == [1.0]
    assert section.mean_ci([], ".2f") == "-" and section.mean_ci([0.5], ".2f") == "0.50"
    text = section.mean_ci([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], ".2f")
    lo, hi = (float(x) for x in text.split("[")[1].rstrip("]").split(", "))
    assert text.startswith("0.35 [") and lo < 0.35 < hi


def test_topics_are_ranked_by_the_partners_reward():
    rows = [row("a", 0, "actor", topic="good", adherence=0.8, echo=0.1), row("b", 0, "actor", topic="bad")]
    ratings = [{"dialogue_id": "a", "turn": 0, "reward": 0.4}, {"dialogue_id": "b", "turn": 0, "reward": -0.2}]
    assert section.topic_rows(rows, ratings) == [["good", 1, "0.400", "0.800", "10%", "0%"],
                                                 ["bad", 1, "-0.200", "0.500", "-", "0%"]]


def test_the_drift_curve_by_turn():
    rows = [row("a", 0, "actor", adherence=0.8), row("b", 0, "actor", adherence=0.6),
            row("a", 1, "judge", adherence=0.2), row("b", 1, "judge", adherence=0.0)]
    (curve,) = section.turn_curve(rows, "adherence").values()
    assert [(t, round(m, 6)) for t, m, _ in curve] == [(0, 0.7), (1, 0.1)]
    assert curve[0][2] is not None


def test_the_section_of_a_measured_and_an_unmeasured_folder(tmp_path):
    from expertchat.runs.reader import RunData

    data = RunData(tmp_path, turns=[{"round": 0}])
    (hint,) = [line for line in section.section(data, lambda *n: []) if line.startswith("Not measured")]
    assert f"mode=analyze analysis.run={tmp_path}" in hint
    data.interaction = [row("a", 0, "actor", adherence=0.8), row("a", 1, "judge", echo=0.5, adherence=0.4)]
    text = "\n".join(section.section(data, lambda *n: ["![x](x.png)"]))
    assert "## Interaction" in text and "| 0 | judge | 1 | 1 | 50% |" in text and "![x](x.png)" in text
    assert section.section(RunData(tmp_path), lambda *n: []) == []


@pytest.mark.parametrize("rounds", [1, 2])
def test_the_figure_is_drawn(tmp_path, rounds):
    from expertchat.runs.reader import RunData

    rows = [{**row(f"d{r}", t, ("actor", "judge")[t % 2], adherence=0.5 - 0.1 * t), "round": r,
             "partner_similarity": None if t == 0 else 0.3} for r in range(rounds) for t in range(3)]
    assert section.figure(RunData(tmp_path, interaction=rows), tmp_path / "f.png").stat().st_size > 1000
    assert section.figure(RunData(tmp_path), tmp_path / "g.png") is None


def test_the_speaking_order_table_of_a_counterbalanced_run(tmp_path):
    from expertchat.runs.reader import RunData

    rows = [{**row(d, t, role, adherence=0.5), "opener": opener}
            for d, opener in (("a", "actor"), ("a-j", "judge"))
            for t, role in enumerate((opener, "judge" if opener == "actor" else "actor"))]
    ratings = [{"dialogue_id": "a", "turn": 0, "reward": 0.4}, {"dialogue_id": "a-j", "turn": 1, "reward": 0.1}]
    lines = section.order_section(RunData(tmp_path, interaction=rows, ratings=ratings))
    text = "\n".join(lines)
    assert "| actor | opens | 1 | 0.400 |" in text and "| actor | responds | 1 | 0.100 |" in text
    assert section.order_section(RunData(tmp_path, interaction=[{**r, "opener": "actor"} for r in rows])) == []
