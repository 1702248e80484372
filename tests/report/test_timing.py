"""The timing split: sums and rates per phase and role, tracker keys, the closing summary's line, report.md's table."""

from __future__ import annotations

import pytest

from expertchat.report import timing
from expertchat.report.timing import Split
from expertchat.runs.reader import table


def test_a_split_sums_seconds_and_work_per_phase_and_role():
    s = Split()
    s.add("generation", "actor", 1.0, tokens=30)
    s.add("generation", "actor", 2.0, tokens=60)
    s.add("judging", "judge", 0.25, ratings=50)
    s.add("training", "actor", 4.0)
    assert s.to_json() == {
        "generation": {"actor": {"seconds": 3.0, "tokens": 90, "tok_per_s": 30.0}},
        "judging": {"judge": {"seconds": 0.25, "ratings": 50, "s_per_1k_ratings": 5.0}},
        "training": {"actor": {"seconds": 4.0}}}


def test_rates_without_work_or_time_are_none():
    s = Split()
    s.add("generation", "actor", 0.0, tokens=5)
    s.add("judging", "judge", 1.0)
    assert s.to_json()["generation"]["actor"]["tok_per_s"] is None
    assert s.to_json()["judging"]["judge"]["s_per_1k_ratings"] is None


@pytest.mark.parametrize("phase, seconds, tokens", [("sampling", 1.0, 0), ("generation", -1.0, 0),
                                                    ("generation", float("nan"), 0), ("generation", 1.0, -3)])
def test_bad_timings_are_one_clear_error(phase, seconds, tokens):
    with pytest.raises(ValueError, match="timing"):
        Split().add(phase, "actor", seconds, tokens=tokens)


def test_measure_times_a_block_and_takes_its_counts():
    s = Split()
    with s.measure("judging", "judge") as work:
        work["ratings"] = 7
    with pytest.raises(RuntimeError), s.measure("generation", "actor"):
        raise RuntimeError("a failed block still counts its seconds")
    out = s.to_json()
    assert out["judging"]["judge"]["ratings"] == 7 and out["judging"]["judge"]["seconds"] >= 0
    assert out["generation"]["actor"]["tokens"] == 0


def test_merge_sums_stages_and_recomputes_rates():
    a = {"generation": {"actor": {"seconds": 1.0, "tokens": 10, "tok_per_s": 10.0}}, "stage_seconds": 2.0}
    b = {"generation": {"actor": {"seconds": 3.0, "tokens": 70, "tok_per_s": 23.3}},
         "judging": {"judge": {"seconds": 2.0, "ratings": 4, "s_per_1k_ratings": 500.0}}, "stage_seconds": 6.0}
    m = timing.merge([a, b, {}])
    assert m["generation"]["actor"] == {"seconds": 4.0, "tokens": 80, "tok_per_s": 20.0}
    assert m["judging"]["judge"]["s_per_1k_ratings"] == 500.0 and m["stage_seconds"] == 8.0


def test_metrics_are_timing_keys_per_stage_phase_and_role():
    t = {"generation": {"actor": {"seconds": 1.0, "tokens": 10, "tok_per_s": None}},
         "training": {"judge": {"seconds": 3.0}}, "stage_seconds": 5.0}
    assert timing.metrics("training", t) == {
        "timing/training/generation/actor/seconds": 1.0, "timing/training/generation/actor/tokens": 10,
        "timing/training/training/judge/seconds": 3.0, "timing/training/stage_seconds": 5.0}


def test_summary_line_names_each_phase_role_and_rate():
    t = {"generation": {"actor": {"seconds": 2.0, "tokens": 100, "tok_per_s": 50.0},
                        "judge": {"seconds": 1.0, "tokens": 40, "tok_per_s": 40.0}},
         "judging": {"judge": {"seconds": 0.5, "ratings": 100, "s_per_1k_ratings": 5.0}},
         "training": {"actor": {"seconds": 7.0}}}
    assert timing.summary_line(t) == ("generation 3.0 s (actor 2.0 s, 50 tok/s; judge 1.0 s, 40 tok/s); "
                                      "judging 0.5 s (judge 0.5 s, 5 s/1k ratings); training 7.0 s (actor 7.0 s)")
    assert timing.summary_line({}) == "no timing recorded"


def test_the_report_table_lists_points_in_run_order():
    markers = {(1, "dialogue"): {"timing": {"generation": {"actor": {"seconds": 1.0, "tokens": 5, "tok_per_s": 5.0}},
                                            "stage_seconds": 1.5}},
               (0, "training"): {"timing": {"training": {"judge": {"seconds": 2.0}}}},
               (0, "dialogue"): {"turns": 3},  # an older marker without timing: no row
               ("base", "evaluation"): {"timing": {"stage_seconds": 4.0}}}
    rows = timing.rows(markers)
    assert [r[:4] for r in rows] == [["base", "evaluation", "-", "-"], [0, "training", "training", "judge"],
                                     [1, "dialogue", "generation", "actor"]]
    assert rows[2][4:] == [1.0, 5, 5.0, None, None, 1.5]
    lines = timing.section(markers, table)
    assert lines[1] == "## Timing"
    assert "| 1 | dialogue | generation | actor | 1.0 | 5 | 5.0 | n/a | n/a | 1.5 |" in lines
    assert timing.section({(0, "dialogue"): {"turns": 3}}, table) == []
