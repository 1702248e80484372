"""stages/league.py: pairing file names and the comparisons: two actor checkpoints, the same judge checkpoint and
topic; the higher mean reward wins, equal or missing rewards are no comparison."""

from __future__ import annotations

from expertchat.stages.league import comparisons, pairing_file, point_label


def test_names():
    assert point_label("base") == "base" and point_label(2) == "round_2"
    assert pairing_file(1, "base") == "league/round_1_vs_base.json"


def test_comparisons_only_within_a_judge_checkpoint_and_a_topic():
    results = [
        {"actor": "base", "judge": "base", "topics": ["t1", "t2"], "reward": [0.1, 0.5]},
        {"actor": 0, "judge": "base", "topics": ["t1", "t2"], "reward": [0.2, 0.5]},  # t2: a tie
        {"actor": 1, "judge": "base", "topics": ["t1", "t2"], "reward": [None, 0.0]},  # t1: unscored
        {"actor": 0, "judge": 0, "topics": ["t1", "t2"], "reward": [0.9, 0.9]},  # alone against judge 0
    ]
    assert sorted(comparisons(results, ["base", 0, 1])) == sorted([(1, 0, "t1"), (0, 2, "t2"), (1, 2, "t2")])
