"""The run report: what a complete, an old-layout, a crashed and an empty run folder give; never an invented number;
and what goes to the tracker. The folders are written in the exact formats of the stages and contracts A/B
(tests/report_helpers.py); a real smoke run's folder is checked end to end in test_pipeline / the e2e tier."""

from __future__ import annotations

import json
import logging
import os

from expertchat.report import markdown as report
from expertchat.report.tracking import Tracker
from expertchat.runs.reader import load
from tests.report_helpers import make_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_complete_run_with_evaluation_gives_every_section_and_plot(tmp_path):
    run = make_run(tmp_path / "run", rounds=2)
    path = report.write_report(run)
    text = path.read_text()
    assert path == run / "report.md"
    assert "**State: done** (no status file; every stage marker present)" in text
    assert "`python -m expertchat +experiment=smoke rounds=2`" in text
    for section in ("## What was run", "## Held-out evaluation", "## Dialogues", "## Ratings per round and model",
                    "## Training (online DPO)", "## Sample dialogues", "### Best rated", "### Worst rated"):
        assert section in text, section
    summary = json.loads((run / "stages" / "round_1.evaluation.json").read_text())["models"]["actor"]
    d = summary["delta_vs_base"]
    assert f"{d['mean']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]" in text  # the summary's own CI, as written
    eval_header = next(line for line in text.splitlines() if line.startswith("| point | model"))
    for guard in ("tokens", "length ratio", "distinct-2", "cut", "copied"):  # hacking guards beside the reward
        assert guard in eval_header
    rating_header = next(line for line in text.splitlines() if line.startswith("| round | model | rated by"))
    for guard in ("reward", "tokens", "distinct-2", "cut", "copied"):
        assert guard in rating_header
    for name in ("eval_reward", "eval_categories", "rating_categories", "similarity_vs_score", "length", "training"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and f"](plots/{name}.png)" in text, name


def test_a_run_without_evaluation_says_so_and_invents_nothing(tmp_path):
    run = make_run(tmp_path / "run", rounds=1, evaluation=False)
    text = report.write_report(run).read_text()
    assert "No evaluation in this run." in text
    assert "Missing: evaluation" in text
    assert not (run / "plots" / "eval_reward.png").exists()
    assert "change vs base" not in text


def test_a_job_that_crashed_half_way_lists_what_is_missing(tmp_path):
    run = make_run(tmp_path / "run", rounds=2, stop_after=(0, "rating"))
    text = report.write_report(run).read_text()
    assert "**State: incomplete** (no status file; 4 stage(s) missing, first: round 0 training)" in text
    assert "stage marker: round 1 dialogue" in text
    assert "## Training" not in text  # no train_metrics.jsonl: no table, no zeros


def test_the_status_file_gives_the_state_and_its_error(tmp_path):
    status = {"status": "failed", "error": "CUDA out of memory", "overrides": [], "started": "2026-11-30T20:00:00"}
    run = make_run(tmp_path / "run", rounds=1, stop_after=(0, "dialogue"), status=status)
    assert "**State: failed** (status.json: CUDA out of memory)" in report.write_report(run).read_text()


def test_an_old_layout_folder_without_config_or_hydra_record(tmp_path):
    run = make_run(tmp_path / "run", rounds=1, evaluation=False)
    for name in ("config.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml"):
        (run / name).unlink()
    for marker in (run / "stages").iterdir():
        marker.unlink()
    (run / "turns.jsonl").write_text((run / "turns.jsonl").read_text() + '{"dialogue_id": "r0-d0\n')  # cut line
    text = report.write_report(run).read_text()
    assert "The command is not recorded" in text and "No recorded config" in text
    assert "**State: incomplete** (no config.yaml: the number of rounds is unknown)" in text
    assert "turns.jsonl: 1" in text  # the cut line is counted, not dropped silently
    assert "## Dialogues" in text


def test_nothing_to_report_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        assert report.main([str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("expertchat.report.markdown: error: ") and str(folder) in err
    assert not (tmp_path / "empty" / "report.md").exists()
    assert report.main([]) == 2


def test_the_command_rebuilds_the_report(tmp_path, capsys):
    run = make_run(tmp_path / "run", rounds=1)
    assert report.main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.md")


def test_a_report_failure_is_one_warning_line_never_a_failed_run(tmp_path, monkeypatch, caplog):
    run = make_run(tmp_path / "run", rounds=1)
    monkeypatch.setattr(report.plots, "draw", lambda data: 1 / 0)
    with caplog.at_level(logging.WARNING):
        assert report.after_run(run) is None
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "ZeroDivisionError" in line and f"python -m expertchat.report {run}" in line
    assert report.after_run(tmp_path / "nothing-here") is None


def test_a_rate_folder_reports_its_summary_with_cis(tmp_path):
    run = tmp_path / "rate"
    run.mkdir()
    rows = [{"id": i, "status": "ok", "score": 5.0 + i, "categories": {"knowledge": {"score": 5.0 + i}},
             "wim": "x", "similarity": 0.5, "reward": 0.1 * i, "answer_tokens": 10} for i in range(3)]
    (run / "ratings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = {"mean": 0.1, "ci95": [0.0, 0.2], "n": 3}
    (run / "rate_summary.json").write_text(json.dumps(
        {"records": 3, "rated": 3, "bad_records": 0, "skipped": 0, "judge_cut": 0, "input": "a.jsonl",
         "judge": "smollm2_135m", "score": m, "categories": {"knowledge": m}, "similarity": m, "reward": m}))
    text = report.write_report(run).read_text()
    assert "## Ratings (mode=rate)" in text and "| reward | 3 | 0.100 [0.000, 0.200] |" in text
    assert "**State: done** (rate_summary.json)" in text and "## Held-out evaluation" not in text


class Recorder(Tracker):
    def __init__(self):
        self.tables, self.summary, self.images = {}, {}, {}

    def log_table(self, name, columns, rows):
        self.tables[name] = (columns, rows)

    def log_summary(self, summary):
        self.summary.update(summary)

    def log_images(self, images):
        self.images.update(images)


def test_the_tracker_gets_the_tables_the_evaluation_summary_and_the_plots(tmp_path):
    run = make_run(tmp_path / "run", rounds=1)
    tracker = Recorder()
    assert report.after_run(run, tracker) == run / "report.md"
    columns, rows = tracker.tables["dialogues"]
    data = load(run)
    assert len(rows) == len(data.turns) and {"text", "reward", "wim", "score", "distinct_2", "cut"} <= set(columns)
    rated = [r for r in rows if r[columns.index("reward")] is not None]
    assert len(rated) == len(data.ratings)
    columns, rows = tracker.tables["evaluation"]
    assert len(rows) == len(data.eval_rows) and {"answer", "reward", "knowledge"} <= set(columns)
    actor = tracker.summary["evaluation"]["0"]["actor"]
    assert actor["delta_vs_base"]["ci_lo"] < actor["delta_vs_base"]["mean"] < actor["delta_vs_base"]["ci_hi"]
    assert set(tracker.images) >= {"eval_reward", "training", "length"}


def test_the_run_reports_itself_done_before_its_status_file_says_so(tmp_path):
    running = {"status": "running", "error": None, "overrides": [], "started": "2026-11-30T20:00:00"}
    run = make_run(tmp_path / "run", rounds=1, status=running)
    assert report.after_run(run, Tracker(), just_finished=True) == run / "report.md"
    assert "**State: done** (written by the run as it finished)" in (run / "report.md").read_text()
    report.write_report(run)  # rebuilt later while the status file still says running (e.g. killed since)
    assert "**State: killed** (status.json says running, but no lock is held: killed before it could record its end" \
        in (run / "report.md").read_text()
    from expertchat.runs.lock import RunLock

    with RunLock([run]):  # while the run holds its folder
        report.write_report(run)
        assert f"**State: running** (status.json, and the lock: process {os.getpid()} on this host is alive)" in \
            (run / "report.md").read_text()


def test_an_evaluated_run_misses_the_evaluation_points_it_lacks(tmp_path):
    import yaml

    run = make_run(tmp_path / "run", rounds=2)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "evaluation": {"enabled": True, "prompts": 6}}))
    assert load(run).state() == ("done", "no status file; every stage marker present")
    (run / "stages" / "round_1.evaluation.json").unlink()
    text = report.write_report(run).read_text()
    assert "first: round 1 evaluation" in text and "| evaluation.prompts | 6 |" in text


def test_the_timing_split_of_the_markers_is_a_table_in_run_order(tmp_path):
    run = make_run(tmp_path / "run", rounds=1, evaluation=False)
    assert "## Timing" not in report.write_report(run).read_text()  # an older run: no timing, no section
    path = run / "stages" / "round_0.training.json"
    marker = json.loads(path.read_text())
    marker["timing"] = {"generation": {"actor": {"seconds": 2.0, "tokens": 64, "tok_per_s": 32.0}},
                        "judging": {"judge": {"seconds": 3.0, "ratings": 8, "s_per_1k_ratings": 375.0}},
                        "training": {"actor": {"seconds": 5.0}}, "stage_seconds": 10.5}
    path.write_text(json.dumps(marker))
    text = report.write_report(run).read_text()
    assert "## Timing" in text
    assert "| 0 | training | judging | judge | 3.0 | n/a | n/a | 8 | 375.0 | 10.5 |" in text
