"""``mode=rate``: reading (question, answer) records, bad records by line number, the summary with bootstrap CIs,
and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from expertchat.config.schema import ExpertChatConfig, JudgingConfig, ModelConfig, RateConfig, RewardConfig
from expertchat.engine.models import LoadedModel
from expertchat.errors import ExpertChatError
from expertchat.modes import rate
from tests.conftest import make_tiny_model, run_cli, smollm2_config

ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


RECORDS = [
    {"id": "a", "question": "Why is the sky blue?", "answer": "Rayleigh scattering favours short wavelengths."},
    "",  # blank lines are not records
    "{not json",
    {"id": "c", "question": "What is 2 + 2?"},
    {"id": "d", "question": "Name a prime.", "answer": "   "},
    {"question": "What is DNA?", "answer": "The molecule that carries genetic information."},
    [1, 2, 3],
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
                  {"role": "assistant", "content": "Lima."}], "id": 7},
    {"messages": [{"role": "user", "content": "Hi"}]},
    {"question": 3, "answer": "three"},
]


def test_read_records_reports_bad_lines(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    items, bad = rate.read_records(str(path), RateConfig())
    assert [it.meta["id"] for it in items] == ["a", 6, 7]
    assert [it.meta["line"] for it in items] == [1, 6, 8]
    assert items[2].context == "Capital of Peru?" and items[2].answer == "Lima."
    reasons = {b["line"]: b["reason"] for b in bad}
    assert set(reasons) == {3, 4, 5, 7, 9, 10}
    assert "not valid JSON" in reasons[3] and "no field 'answer'" in reasons[4] and reasons[5] == "empty answer"
    assert "not a JSON object" in reasons[7] and "no assistant message" in reasons[9] and "strings" in reasons[10]


def test_read_records_with_configured_fields_and_limit(tmp_path, mt_bench):
    path = write_jsonl(tmp_path / "mt.jsonl", [{**q, "reply": "An answer."} for q in mt_bench[:5]])
    cfg = RateConfig(question_field="turns[0]", answer_field="reply", id_field="question_id", limit=3)
    items, bad = rate.read_records(str(path), cfg)
    assert len(items) == 3 and not bad and items[0].meta["id"] == mt_bench[0]["question_id"]
    assert items[0].context == mt_bench[0]["turns"][0]


def test_missing_input_file_is_one_clear_error(tmp_path):
    with pytest.raises(ExpertChatError, match="rate.input not found"):
        rate.read_records(str(tmp_path / "nope.jsonl"), RateConfig())


def test_bootstrap_ci():
    assert rate.bootstrap_ci([1.0]) is None
    lo, hi = rate.bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0] * 10, resamples=500)
    assert lo < 3.0 < hi and hi - lo < 1.5
    assert rate.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_rate_mode_writes_rows_and_summary(tmp_path, smol_tokenizer, monkeypatch, capsys):
    tiny = LoadedModel("tiny", make_tiny_model(smol_tokenizer, dtype=torch.float32), smol_tokenizer,
                       ModelConfig(name="tiny"))
    monkeypatch.setattr("expertchat.engine.models.load_model", lambda cfg: tiny)
    path = write_jsonl(tmp_path / "in.jsonl", RECORDS)
    cfg = ExpertChatConfig(mode="rate", judge=smollm2_config(), rate=RateConfig(input=str(path), bootstrap=200),
                           judging=JudgingConfig(batch_size=2), reward=RewardConfig(zeta=0.0),
                           run_dir=str(tmp_path / "run"))
    summary = rate.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "ratings.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", 6, 7] and all(1 <= r["score"] <= 10 for r in rows)
    assert all(set(r["categories"]) == set(cfg.judging.active()) and -1 <= r["reward"] <= 1 for r in rows)
    saved = json.loads((tmp_path / "run" / rate.SUMMARY_FILE).read_text())
    assert saved["rated"] == 3 and saved["bad_records"] == 6 and saved["records"] == 9
    assert [b["line"] for b in saved["bad"]] == [3, 4, 5, 7, 9, 10]
    for cat in cfg.judging.active():
        m = saved["categories"][cat]
        assert m["n"] == 3 and m["ci95"][0] <= m["mean"] <= m["ci95"][1]
    assert summary["score"]["mean"] == saved["score"]["mean"]
    out = capsys.readouterr().out
    assert "rated 3 of 9 records (6 bad" in out and "bad record at line 3" in out


def test_a_file_without_a_good_record_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"question": "q"}])
    cfg = ExpertChatConfig(mode="rate", judge=smollm2_config(),
                           rate=RateConfig(input=str(path)), run_dir=str(tmp_path / "run"))
    with pytest.raises(ExpertChatError, match=r"no record to rate .*2 bad records \(line 1: not valid JSON"):
        rate.run(cfg)


def test_rating_into_a_dialogue_run_folder_is_refused_and_keeps_its_ratings(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    run = tmp_path / "run"
    run.mkdir()
    (run / "ratings.jsonl").write_text('{"rater": "judge"}\n')
    cfg = ExpertChatConfig(mode="rate", judge=smollm2_config(), rate=RateConfig(input=str(path)), run_dir=str(run))
    with pytest.raises(ExpertChatError, match="holds the ratings of a dialogue run"):
        rate.run(cfg)
    assert (run / "ratings.jsonl").read_text() == '{"rater": "judge"}\n'


@pytest.mark.e2e
@pytest.mark.parametrize("args, expected", [
    (["mode=rate"], "rate.input is not set"),
    (["mode=rate", "rate.input=/nonexistent/answers.jsonl"], "rate.input not found: /nonexistent/answers.jsonl"),
    (["reward.zeta=2"], "reward.zeta is 2.0; it must be in [0, 1]"),
    (["judging.mode=vote"], "judging.mode is 'vote'"),
])
def test_cli_errors_are_one_line(tmp_path, args, expected):
    proc = run_cli(f"hydra.run.dir={tmp_path / 'run'}", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert expected in lines[-1] and lines[-1].startswith("expertchat: error:")


@pytest.mark.e2e
def test_cli_rates_mt_bench_answers_with_smollm2(tmp_path, mt_bench):
    """The real command on answers nobody here wrote (MT-Bench reference answers), with the embedded judge."""
    records = [{"id": q["question_id"], "question": q["turns"][0], "answer": q["reference"][0]}
               for q in mt_bench if q.get("reference") and q["reference"][0].strip()][:6]
    path = write_jsonl(tmp_path / "mt.jsonl", records + ["{broken"])
    proc = run_cli("mode=rate", f"rate.input={path}", f"hydra.run.dir={tmp_path / 'run'}", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "ratings.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert all(1 <= r["score"] <= 10 and r["wim_status"] in {"ok", "empty", "truncated"} for r in rows)
    assert "1 bad" in proc.stdout and "score (weighted)" in proc.stdout
    assert "## Ratings (mode=rate)" in (tmp_path / "run" / "report.md").read_text()  # rate runs end with a report
