"""The lm-evaluation-harness hook: one line and nothing written without the package; each role's base, or its
round's adapter, handed to ``lm_eval.simple_evaluate``."""

from __future__ import annotations

import json
import logging
import sys
import types

from expertchat.runs.store import RunStore
from expertchat.stages import harness
from tests.conftest import compose_cfg


def test_lm_eval_not_installed_is_one_line_and_skipped(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    cfg = compose_cfg("progress=false", "evaluation.lm_eval.tasks=[ifeval]")
    with caplog.at_level(logging.WARNING, logger="expertchat"):
        result = harness.run_lm_eval(cfg, RunStore(tmp_path), "base")
    assert "skipped: lm-evaluation-harness is not installed" in result and "ifeval" in result
    assert [r.message for r in caplog.records] == [result]
    assert not (tmp_path / harness.LM_EVAL_DIR).exists()


def test_lm_eval_gets_each_roles_base_and_adapter(tmp_path, monkeypatch):
    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {"ifeval": {"acc": 0.25}}, "config": {}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    monkeypatch.setattr(harness, "local_folder", lambda cfg: f"/models/{cfg.name}")
    (tmp_path / "adapters/round_2/actor").mkdir(parents=True)
    (tmp_path / "adapters/round_2/actor/adapter_config.json").write_text("{}")
    cfg = compose_cfg("progress=false", "evaluation.lm_eval.tasks=[ifeval,mmlu]", "evaluation.lm_eval.limit=5")
    out = harness.run_lm_eval(cfg, RunStore(tmp_path), 2)
    assert [c["model"] for c in calls] == ["hf", "hf"] and calls[0]["tasks"] == ["ifeval", "mmlu"]
    assert calls[0]["limit"] == 5 and calls[0]["batch_size"] == 1 and calls[0]["num_fewshot"] is None
    assert calls[0]["model_args"] == (f"pretrained=/models/smollm2_135m,dtype=auto,"
                                      f"peft={tmp_path / 'adapters/round_2/actor'}")
    assert "peft=" not in calls[1]["model_args"]  # the judge saved no adapter in round 2: its base
    assert out["actor"] == {"ifeval": {"acc": 0.25}}
    assert json.loads((tmp_path / "lm_eval/round_2.actor.json").read_text()) == {"ifeval": {"acc": 0.25}}
