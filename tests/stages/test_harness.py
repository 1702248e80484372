"""The lm-evaluation-harness hook: one line and nothing written without the package; each role's base, or its
round's adapter, handed to ``lm_eval.simple_evaluate`` as the loaded model (``HFLM(pretrained=model)``)."""

from __future__ import annotations

import json
import logging
import sys
import types

from expertchat.runs.store import RunStore
from expertchat.stages import harness
from tests.conftest import compose_cfg, tiny_pair


def test_lm_eval_not_installed_is_one_line_and_skipped(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    cfg = compose_cfg("progress=false", "evaluation.lm_eval.tasks=[ifeval]")
    with caplog.at_level(logging.WARNING, logger="expertchat"):
        result = harness.run_lm_eval(cfg, RunStore(tmp_path), "base", {})
    assert "skipped: lm-evaluation-harness is not installed" in result and "ifeval" in result
    assert [r.message for r in caplog.records] == [result]
    assert not (tmp_path / harness.LM_EVAL_DIR).exists()


def test_lm_eval_evaluates_the_loaded_models_not_a_reload(tmp_path, monkeypatch, smol_tokenizer):
    """HFLM gets each role's model as the run holds it: a view's module with the role's adapter switched on
    (what ``ModelView.active`` yields), the plain model otherwise; nothing is loaded by path."""
    import contextlib

    calls, wrapped = [], []

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size, max_length):
            wrapped.append((pretrained, tokenizer, batch_size, max_length, getattr(pretrained, "switched", None)))

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {"results": {"ifeval": {"acc": 0.25}}, "config": {}}

    monkeypatch.setitem(sys.modules, "lm_eval", types.SimpleNamespace(simple_evaluate=simple_evaluate))
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", types.SimpleNamespace(HFLM=HFLM))
    pair = tiny_pair(smol_tokenizer, shared=False)
    base = pair["actor"].model

    class View:  # the shape of policies.views.ModelView: active() yields the module with the adapter on
        @contextlib.contextmanager
        def active(self):
            base.switched = "actor adapter"
            yield base
            base.switched = None

    pair["actor"].model = View()
    cfg = compose_cfg("progress=false", "evaluation.lm_eval.tasks=[ifeval,mmlu]", "evaluation.lm_eval.limit=5")
    out = harness.run_lm_eval(cfg, RunStore(tmp_path), 2, pair)
    assert [c["tasks"] for c in calls] == [["ifeval", "mmlu"]] * 2 and calls[0]["limit"] == 5
    assert calls[0]["num_fewshot"] is None and all(isinstance(c["model"], HFLM) for c in calls)
    assert wrapped[0][0] is base and wrapped[0][4] == "actor adapter" and wrapped[0][2] == 1
    assert wrapped[1][0] is pair["judge"].model and wrapped[1][1] is smol_tokenizer
    assert out["actor"] == {"ifeval": {"acc": 0.25}}
    assert json.loads((tmp_path / "lm_eval/round_2.actor.json").read_text()) == {"ifeval": {"acc": 0.25}}
