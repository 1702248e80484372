"""report/audit.py: the "Pairwise verdicts" and "Judge audit" sections from evaluation summaries, the flat
categories of the training ratings, and a folder without an audit."""

from __future__ import annotations

from pathlib import Path

from expertchat.report import audit as section
from expertchat.runs.reader import RunData
from expertchat.stages import audit
from tests.audit_helpers import crafted_ratings, verdict
from tests.conftest import compose_cfg


def audited(point, content_rows, base_rows):
    cfg = compose_cfg()
    rows = content_rows + [{**v, "kind": "pairwise", "rater": r} for r in ("actor", "judge")
                           for v in [verdict(0.9, 0.1)] * 10]  # a slot-biased judge
    anchor = {(r["author"], r["prompt_id"], r["sample"]): r["score"] for r in content_rows if r["rater"] == "judge"}
    return audit.audit_figures(cfg, rows, base_rows, anchor, point, "big (anchor)")


def crafted_run() -> RunData:
    base_rows = crafted_ratings(5, 5, content="base")
    now = crafted_ratings(6, 5, bias_actor=1.0, content=0) + [{**r, "score": r["score"] + 0.5} for r in base_rows]
    outcomes = [{"outcome": o, "x_tokens": 20 + i, "y_tokens": 20, "p_x_first": 0.7 if o else 0.3,
                 "p_x_second": 0.6 if o else 0.4} for i, o in enumerate([1.0] * 14 + [0.0] * 6)]
    evals = [{"round": "base", "judge": "big", "models": {}, "audit": audited("base", base_rows, base_rows)},
             {"round": 0, "judge": "big", "models": {}, "audit": audited(0, now, base_rows),
              "pairwise": {"actor": audit.pairwise_figures(outcomes, 200, 0)}}]
    ratings = [{"round": 0, "rater": "judge", "categories": {"knowledge": {"score": float(k % 9 + 1)},
                                                             "human_expert_likeness": {"score": 4.8 + 0.01 * (k % 3)}}}
               for k in range(30)]
    return RunData(Path("run"), config={}, evals=evals, ratings=ratings)


def test_the_pairwise_section_has_one_row_per_round_and_model():
    lines = section.pairwise_section(crafted_run())
    assert lines[1] == "## Pairwise verdicts"
    row = [line for line in lines if line.startswith("| 0 | actor |")]
    assert len(row) == 1 and "| 20 | 14/0/6 | 0.700 [" in row[0] and "| 1.00 [1.00, 1.00] |" in row[0]
    assert section.pairwise_section(RunData(Path("run"), evals=[{"round": "base", "models": {}}])) == []


def test_the_audit_section_shows_each_judge_and_flags_a_flat_category():
    text = "\n".join(section.audit_section(crafted_run()))
    assert "## Judge audit" in text and "big (anchor)" in text
    assert "| base | actor | 0.00 [0.00, 0.00] | 1.00 [1.00, 1.00] |" in text  # slot-biased: never consistent
    assert "| 0 | actor |" in text and "| 0.50 [0.50, 0.50] |" in text  # inflation of the base answers: +0.5
    assert "| 0 | 0.50 [0.50, 0.50] | actor 1." in text  # self-preference: half the actor's +1
    flat = [line for line in text.splitlines() if "human_expert_likeness" in line and line.startswith("| 0 | judge")]
    assert len(flat) == 1 and flat[0].endswith("FLAT: no signal |")
    assert not [line for line in text.splitlines() if "| knowledge |" in line and "FLAT" in line]


def test_a_folder_without_an_audit_says_how_to_get_one():
    data = crafted_run()
    data.evals = [{"round": "base", "models": {}}]
    text = "\n".join(section.audit_section(data))
    assert "Not audited in this folder" in text and "mode=eval evaluation.run=run" in text
    assert "FLAT: no signal" in text  # the training ratings are still shown
    assert section.audit_section(RunData(Path("run"))) == []
