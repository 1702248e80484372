"""Progress: a tqdm bar on a terminal, periodic plain log lines without one (a Slurm log), and every long stage
(dialogue turns, rated turns in both judging modes, DPO steps with the current reward) really showing it."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from expertchat.config.judging import ParseConfig
from expertchat.config.schema import DialogueConfig, GenerationConfig, JudgingConfig
from expertchat.judging.judge import Judge, RatingItem
from expertchat.report import console
from tests.conftest import make_tiny_model


@pytest.fixture
def no_terminal(monkeypatch):
    monkeypatch.setattr(console.sys, "stderr", SimpleNamespace(isatty=lambda: False))


def lines(caplog, word: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if word in r.getMessage()]


def test_without_a_terminal_progress_is_a_log_line_every_tenth(no_terminal, caplog):
    with caplog.at_level(logging.INFO, logger="expertchat"):
        with console.progress_bar(100, True, "round 0 dialogues", unit="turn") as bar:
            for i in range(100):
                bar.set_postfix(reward=f"{i / 100:.2f}")
                bar.update(1)
    got = lines(caplog, "round 0 dialogues")
    assert len(got) == 10
    assert got[0].startswith("round 0 dialogues: 10/100 turns (") and "s left" in got[0] and "; reward 0.09" in got[0]
    assert got[-1].startswith("round 0 dialogues: 100/100 turns") and "s left" not in got[-1]


def test_a_slow_stage_logs_at_least_every_five_minutes(no_terminal, caplog, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(console.time, "perf_counter", lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="expertchat"):
        bar = console.open_progress(1000, True, "round 0 training actor", unit="step")
        for step in range(1, 6):
            clock[0] += 100.0  # 100 s per step: far from a tenth of 1000 steps
            bar.update(1)
    got = lines(caplog, "training actor")
    assert [g.split(" (")[0] for g in got] == ["round 0 training actor: 3/1000 steps"]  # at 300 s


def test_a_terminal_gets_a_tqdm_bar_and_disabled_progress_shows_nothing(monkeypatch, caplog):
    from tqdm.auto import tqdm

    monkeypatch.setattr(console.sys, "stderr", SimpleNamespace(isatty=lambda: True, write=lambda s: None,
                                                               flush=lambda: None))
    bar = console.open_progress(3, True, "x")
    assert isinstance(bar, tqdm)
    bar.close()
    with caplog.at_level(logging.INFO, logger="expertchat"):
        with console.progress_bar(5, False, "quiet") as bar:
            bar.update(5)
    assert not lines(caplog, "quiet")


def test_the_dialogue_stage_shows_its_turns(no_terminal, caplog, smol_tokenizer, tmp_path):
    from expertchat.runs.store import RunStore
    from expertchat.stages.dialogue import run_dialogues
    from tests.conftest import two_tiny_models

    with caplog.at_level(logging.INFO, logger="expertchat"):
        run_dialogues(two_tiny_models(smol_tokenizer), ["tides", "compilers"], DialogueConfig(turns=2),
                      GenerationConfig(max_new_tokens=2), RunStore(tmp_path), progress=True)
    assert lines(caplog, "round 0 dialogues")[-1].startswith("round 0 dialogues: 4/4 turns")


@pytest.mark.parametrize("mode", ["expected", "parse"])
def test_the_judge_shows_its_rated_turns_in_both_modes(no_terminal, caplog, smol_tokenizer, mode):
    from expertchat.config.schema import ModelConfig
    from expertchat.engine.models import LoadedModel

    lm = LoadedModel("tiny", make_tiny_model(smol_tokenizer), smol_tokenizer, ModelConfig(name="tiny"))
    cfg = JudgingConfig(mode=mode, wim=False, batch_size=2, parse=ParseConfig(max_new_tokens=2))
    items = [RatingItem(f"question {i}", f"answer {i}", {}) for i in range(5)]
    with caplog.at_level(logging.INFO, logger="expertchat"):
        Judge(lm, cfg).rate(items, progress=True, desc="round 0 rating actor")
    got = [line.split(" (")[0] for line in lines(caplog, "round 0 rating actor")]
    # expected mode: one pass over the 5 turns; parse mode: the likelihood pass, then the generating parse pass
    done = "5/5" if mode == "expected" else "10/10"
    assert got[-1] == f"round 0 rating actor: {done} turns" and len(got) >= (2 if mode == "parse" else 1)


def test_dpo_steps_show_the_current_reward(no_terminal, caplog):
    from expertchat.stages.dpo import StepProgress

    progress = StepProgress("round 0 training actor", enabled=True)
    state = SimpleNamespace(max_steps=2, global_step=0)
    with caplog.at_level(logging.INFO, logger="expertchat"):
        progress.on_train_begin(None, state, None)
        for step, reward in ((1, 0.125), (2, 0.25)):
            state.global_step = step
            progress.on_log(None, state, None, logs={"loss": 0.69, "objective/scores": reward, "pairs/kept": 0.5})
        progress.on_train_end(None, state, None)
    got = lines(caplog, "training actor")
    assert len(got) == 2 and "reward 0.250" in got[-1] and "masked 50%" in got[-1] and "2/2 steps" in got[-1]


def test_the_closing_summary_says_what_the_speakers_did_to_each_other(tmp_path):
    from expertchat.report.console import summary_lines

    speakers = {"actor": {"echo": 0.17, "agreement": 0.06, "adherence": 0.4, "drift": -0.25},
                "judge": {"echo": 0.15, "agreement": 0.25, "adherence": 0.3, "drift": None}}
    lines = summary_lines(tmp_path, 1, {"interaction": {"speakers": speakers}}, 12.0)
    (line,) = [x for x in lines if x.startswith("  interaction ")]
    assert line == ("  interaction actor echo 0.17, agrees 0.06, topic adherence 0.40 (drift -0.25); judge echo 0.15, "
                    "agrees 0.25, topic adherence 0.30 (drift n/a)")


def test_the_closing_summary_gives_the_pairwise_verdict_and_the_audit(tmp_path):
    from expertchat.report.console import summary_lines

    pairwise = {"actor": {"preference": 0.56, "lc_win_rate": 0.53, "consistency": {"value": 0.2}}}
    audit = {"self_preference": {"index": 0.12}, "agreement": {"mutual": {"rho": 0.4}},
             "flat": {"actor": {"depth": {"flat": True}, "knowledge": {"flat": False}},
                      "judge": {"depth": {"flat": True}}}}
    lines = summary_lines(tmp_path, 1, {"evaluation": {"models": {}, "pairwise": pairwise, "audit": audit}}, 3.0)
    assert "  pairwise    actor vs base: preference 0.56, length-controlled 0.53, position-consistent 0.20" in lines
    assert ("  judge audit self-preference 0.12, mutual rho 0.40, flat categories: depth (report.md: Judge audit)"
            in lines)


def test_the_closing_summary_gives_the_rounds_timing_split(tmp_path):
    from expertchat.report.console import summary_lines

    summary = {"dialogue": {"timing": {"generation": {"actor": {"seconds": 2.0, "tokens": 100, "tok_per_s": 50.0}},
                                       "stage_seconds": 2.5}},
               "training": {"timing": {"generation": {"actor": {"seconds": 1.0, "tokens": 20, "tok_per_s": 20.0}},
                                       "judging": {"judge": {"seconds": 4.0, "ratings": 8, "s_per_1k_ratings": 500.0}},
                                       "training": {"actor": {"seconds": 3.0}}, "stage_seconds": 8.5}},
               "base": {"timing": {"generation": {"actor": {"seconds": 99.0, "tokens": 1}}}}}  # not this round's
    (line,) = [x for x in summary_lines(tmp_path, 1, summary, 12.0) if x.startswith("  timing ")]
    assert line == ("  timing      generation 3.0 s (actor 3.0 s, 40 tok/s); judging 4.0 s (judge 4.0 s, 500 s/1k "
                    "ratings); training 3.0 s (actor 3.0 s); stages 11.0 s")
