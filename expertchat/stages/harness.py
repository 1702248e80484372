"""The optional lm-evaluation-harness run of an evaluation point (``evaluation.lm_eval.tasks``): each role's model
as the run holds it (the base, or with its round's adapter; 4-bit, on its planned device map), handed to
``lm_eval.simple_evaluate`` as an already-loaded model (``HFLM(pretrained=model)``), never reloaded by path (which
would drop 4 bit and the device map, and load a second copy)."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from typing import Any

from expertchat.config.schema import ROLES, ExpertChatConfig
from expertchat.engine.models import LoadedModel
from expertchat.runs.store import RunStore, point_name

log = logging.getLogger(__name__)

LM_EVAL_DIR = "lm_eval"


@contextlib.contextmanager
def _module(lm: LoadedModel) -> Iterator[Any]:
    """The transformers model ``lm`` computes with: a view's merged copy or base with its adapter switched on
    (``policies.views.ModelView.active``), else the model itself."""
    active = getattr(lm.model, "active", None)
    if active is None:
        yield lm.model
    else:
        with active() as module:
            yield module


def run_lm_eval(cfg: ExpertChatConfig, store: RunStore, point: int | str,
                models: dict[str, LoadedModel]) -> dict[str, Any] | str:
    """lm-evaluation-harness (``lm_eval.simple_evaluate`` on ``lm_eval.models.huggingface.HFLM(pretrained=<the
    loaded model>, tokenizer=<its tokenizer>)``) for each role's model at ``point``; results in
    ``lm_eval/<point>.<role>.json``.

    Args:
        models: role -> the model as the run holds it (``Run.models``: views with the role's current adapter).

    Returns:
        ``{role: lm_eval's "results"}``, or the one line saying why it was skipped (not installed).
    """
    try:
        lm_eval = importlib.import_module("lm_eval")
        hflm = importlib.import_module("lm_eval.models.huggingface").HFLM
    except ImportError:
        line = (f"evaluation.lm_eval.tasks={list(cfg.evaluation.lm_eval.tasks)} skipped: lm-evaluation-harness is "
                f"not installed (pip install lm-eval)")
        log.warning("%s", line)
        return line
    le, out = cfg.evaluation.lm_eval, {}
    for role in ROLES:
        lm = models[role]
        with _module(lm) as module:
            wrapped = hflm(pretrained=module, tokenizer=lm.tokenizer, batch_size=le.batch_size,
                           max_length=lm.cfg.max_length)
            result = lm_eval.simple_evaluate(model=wrapped, tasks=list(le.tasks), limit=le.limit,
                                             num_fewshot=le.num_fewshot)
        store.write_json(f"{LM_EVAL_DIR}/{point_name(point)}.{role}.json", result.get("results", {}))
        out[role] = result.get("results", {})
    return out
