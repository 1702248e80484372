"""The optional lm-evaluation-harness run of an evaluation point (``evaluation.lm_eval.tasks``): each role's model,
the base or with its round's adapter, through ``lm_eval.simple_evaluate``'s ``hf`` backend."""

from __future__ import annotations

import logging
from typing import Any

from expertchat.config.schema import ROLES, ExpertChatConfig
from expertchat.engine.models import local_folder
from expertchat.policies.adapters import adapter_dir
from expertchat.runs.store import RunStore, point_name

log = logging.getLogger(__name__)

LM_EVAL_DIR = "lm_eval"


def run_lm_eval(cfg: ExpertChatConfig, store: RunStore, point: int | str) -> dict[str, Any] | str:
    """lm-evaluation-harness (``lm_eval.simple_evaluate``, the ``hf`` backend) on each role's model at ``point``:
    the base, plus ``peft=<adapter folder>`` for a round; results in ``lm_eval/<point>.<role>.json``.

    Returns:
        ``{role: lm_eval's "results"}``, or the one line saying why it was skipped (not installed).
    """
    try:
        import lm_eval
    except ImportError:
        line = (f"evaluation.lm_eval.tasks={list(cfg.evaluation.lm_eval.tasks)} skipped: lm-evaluation-harness is "
                f"not installed (pip install lm-eval)")
        log.warning("%s", line)
        return line
    le, out = cfg.evaluation.lm_eval, {}
    for role in ROLES:
        model_cfg = getattr(cfg, role)
        args = f"pretrained={local_folder(model_cfg)},dtype={model_cfg.dtype}"
        adapter = None if point == "base" else store.path(adapter_dir(int(point), role))
        if adapter is not None and (adapter / "adapter_config.json").exists():
            args += f",peft={adapter}"
        result = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=list(le.tasks), limit=le.limit,
                                         num_fewshot=le.num_fewshot, batch_size=le.batch_size)
        store.write_json(f"{LM_EVAL_DIR}/{point_name(point)}.{role}.json", result.get("results", {}))
        out[role] = result.get("results", {})
    return out
