"""mode=analyze: the interaction of any run folder (one written before the stage existed included) measured
without training; rounds measured before are kept; bad input is one line."""

from __future__ import annotations

import pytest

from expertchat.errors import ExpertChatError
from expertchat.modes import analyze
from tests.conftest import compose_cfg
from tests.report_helpers import make_run


def analyze_cfg(folder, *overrides):
    cfg = compose_cfg("mode=analyze", f"analysis.run={folder}", "progress=false", *overrides)
    cfg.run_dir = str(folder.parent / "job")
    return cfg


def test_an_older_run_folder_gets_its_interaction_measured_and_reported(tmp_path):
    run = make_run(tmp_path / "run", rounds=2, dialogues=2, turns=3)  # no interaction stage: an older folder
    from expertchat.report.markdown import write_report

    assert f"`python -m expertchat mode=analyze analysis.run={run}` measures it" in write_report(run).read_text()
    cfg = analyze_cfg(run)
    run_cfg, rounds = analyze.check(cfg)
    assert rounds == [0, 1] and run_cfg.run_dir == str(run) and run_cfg.rounds == 2
    out = analyze.run(cfg, checked=(run_cfg, rounds))
    assert set(out) == {0, 1} and all(s["turns"] == 6 for s in out.values())
    lines = (run / "interaction.jsonl").read_text().splitlines()
    assert len(lines) == 12 and (run / "stages" / "round_1.interaction.json").exists()
    report = (run / "report.md").read_text()
    assert "## Interaction" in report and "| round | speaker | dialogues | turns | echo |" in report
    assert (run / "plots" / "interaction_turns.png").exists()
    analyze.run(cfg)  # again: measured rounds are kept, nothing written twice
    assert (run / "interaction.jsonl").read_text().splitlines() == lines


def test_bad_folders_are_one_line(tmp_path):
    with pytest.raises(ExpertChatError, match="analysis.run: no run folder at"):
        analyze.check(analyze_cfg(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExpertChatError, match=r"holds no dialogues \(turns.jsonl has no record of a complete round\)"):
        analyze.check(analyze_cfg(tmp_path / "empty"))
