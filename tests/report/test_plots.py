"""The figures: a PNG for data, nothing (None, no file) for no data, never an empty frame."""

from __future__ import annotations

from expertchat.report import plots
from expertchat.runs.reader import load
from tests.report_helpers import make_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_no_data_draws_no_figure(tmp_path):
    assert plots.eval_reward([], tmp_path / "a.png") is None
    assert plots.category_distributions({"r0 actor": {"knowledge": []}}, tmp_path / "b.png", "t") is None
    assert plots.similarity_vs_score({"x": {"actor": []}}, tmp_path / "c.png") is None
    assert plots.length_per_round({"actor": {"round 0": []}}, tmp_path / "d.png", "t") is None
    assert plots.training_curves([{"round": 0, "role": "actor", "step": 1, "final": True}], tmp_path / "e.png") is None
    assert plots.sweep_deltas([{"label": "zeta=0", "models": {}}], tmp_path / "f.png", "t") is None
    assert not list(tmp_path.iterdir())


def test_each_figure_is_a_png_and_leaves_no_temporary_file(tmp_path):
    made = [
        plots.category_distributions({"r0 actor": {"knowledge": [3.0, 5.0]}, "r0 judge": {"knowledge": [4.0]}},
                                     tmp_path / "cats.png", "t"),
        plots.similarity_vs_score({"rated": {"actor": [(4.0, 0.5), (6.0, 0.2)]}}, tmp_path / "sim.png"),
        plots.length_per_round({"actor": {"round 1": [9.0], "base": [8.0, 12.0]}}, tmp_path / "len.png", "t"),
        plots.sweep_deltas([{"label": "zeta=0", "models": {"actor": {"mean": 0.1, "ci": [0.0, 0.2]}}},
                            {"label": "zeta=1", "models": {}}], tmp_path / "sweep.png", "t"),
    ]
    assert all(p is not None and p.read_bytes()[:8] == PNG for p in made)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cats.png", "len.png", "sim.png", "sweep.png"]


def test_draw_makes_every_figure_a_run_folder_has_data_for(tmp_path):
    full = plots.draw(load(make_run(tmp_path / "full", rounds=2)))
    assert set(full) == {"eval_reward", "eval_categories", "rating_categories", "similarity_vs_score", "length",
                         "training"}
    bare = plots.draw(load(make_run(tmp_path / "bare", rounds=1, evaluation=False, stop_after=(0, "dialogue"))))
    assert set(bare) == {"length"}
