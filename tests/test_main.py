"""``python -m expertchat`` as a user runs it: a real smoke experiment, and bad input as one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "expertchat", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=900)


def test_smoke_experiment_writes_complete_turns(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "turns.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2
    assert {(r["dialogue_id"], r["turn"]) for r in rows} == {(f"r0-d00{i}", t) for i in range(2) for t in range(2)}
    assert all(r["model"] == "smollm2_135m" and r["new_tokens"] <= 8 and r["text"] for r in rows)
    assert (out / "stages" / "round_0.dialogue.json").exists()
    assert len(list((out / "dialogues").glob("*.md"))) == 2
    assert json.loads((out / "topics.json").read_text())[0].startswith("How CRISPR")
    # rerunning into the same folder resumes: nothing is regenerated or duplicated
    again = run_cli("+experiment=smoke", f"hydra.run.dir={out}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((out / "turns.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("args, expected", [
    (["generation=greedy"], "unknown option 'greedy' for config group 'generation' (choose from: contrastive, "
                            "high_temp)"),
    (["model@actor=gpt5"], "unknown option 'gpt5' for config group 'model'"),
    (["dialogue.turns=abc"], "dialogue.turns"),
    (["dialogue.turns=0"], "dialogue.turns is 0; it must be > 0"),
    (["generation.temprature=2"], "temprature"),
    (["topics=jsonl"], "topics.path is not set"),
    (["topics=jsonl", "topics.path=/nonexistent/t.jsonl"], "topics file not found: /nonexistent/t.jsonl"),
    (["topics.items=[]"], "no topics found in topics.items"),
    (["actor.path=/nonexistent/model", "actor.package=null", "actor.gguf_file=null"],
     "no model folder at /nonexistent/model"),
])
def test_bad_input_is_one_line_and_keeps_the_run_folder(tmp_path, args, expected):
    out = tmp_path / "run"
    out.mkdir()
    (out / "turns.jsonl").write_text('{"round": 0}\n')
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={out}", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("expertchat: error: "), proc.stderr[-2000:]
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert (out / "turns.jsonl").read_text() == '{"round": 0}\n'


def test_missing_field_in_mt_bench_names_the_field(tmp_path):
    data = ROOT.parent / "shared" / "data" / "mt_bench_questions.jsonl"
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={tmp_path}", "topics=jsonl", f"topics.path={data}",
                   "topics.field=question")
    assert proc.returncode == 2
    assert "mt_bench_questions.jsonl:1: no field 'question'" in proc.stderr


def test_full_error_shows_the_traceback(tmp_path):
    proc = run_cli("+experiment=smoke", f"hydra.run.dir={tmp_path}", "dialogue.turns=0",
                   env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr
