"""``mode=eval``: evaluate the adapters of an existing run folder without training, and the evaluation hooks
the pipeline shares with it (the frozen judge, one evaluation point, the optional lm-evaluation-harness run).

    python -m expertchat mode=eval evaluation.run=outputs/my_run                 every trained round
    python -m expertchat mode=eval evaluation.run=outputs/my_run "evaluation.rounds=[0,2]"

The run's own config (``<run>/config.yaml``: models, personas, rubric, reward, LoRA) is used, with the command's
``evaluation.*``, ``progress`` and ``tracker``. Results go into the run folder as in a run (``eval.jsonl``,
``eval_prompts.json``, ``stages/base.evaluation.json``, ``stages/round_<r>.evaluation.json``); points already
there are kept. A run that saved no adapter is evaluated at its base point only, and one line says so.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from expertchat import evaluation
from expertchat.adapters import Policies, adapter_dir
from expertchat.config import ExpertChatConfig, to_config
from expertchat.dialogue import ROLES
from expertchat.errors import ExpertChatError, first_line
from expertchat.models import LoadedModel, check_model, load_model, load_pair, local_folder
from expertchat.store import CONFIG_FILE, RunStore
from expertchat.tracking import Tracker

log = logging.getLogger(__name__)

LM_EVAL_DIR = "lm_eval"


def frozen_judge(cfg: ExpertChatConfig, policies: Policies) -> LoadedModel:
    """The evaluation's frozen judge: ``evaluation.judge`` when set; else the judge role's round-0 base, i.e. its
    weights with the adapters disabled (``Policies.frozen`` outside a training stage), or a fresh copy of them
    when ``training.method=full`` trains the weights in place."""
    if cfg.evaluation.judge is not None:
        return load_model(cfg.evaluation.judge)
    if cfg.training.method == "full":
        return load_model(cfg.judge)
    return policies.frozen("judge")


def evaluate_point(cfg: ExpertChatConfig, store: RunStore, models: dict[str, LoadedModel], judge: LoadedModel,
                   prompts: list[evaluation.EvalPrompt], point: int | str, tracker: Tracker) -> dict[str, Any]:
    """One evaluation point (:func:`expertchat.evaluation.evaluate`), then lm-evaluation-harness when
    ``evaluation.lm_eval.tasks`` asks for it (its results under ``lm_eval`` in the summary)."""
    summary = evaluation.evaluate(models, judge, prompts, cfg, store, point, tracker)
    if cfg.evaluation.lm_eval.tasks:
        summary["lm_eval"] = run_lm_eval(cfg, store, point)
    return summary


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
        name = "base" if point == "base" else f"round_{point}"
        store.write_json(f"{LM_EVAL_DIR}/{name}.{role}.json", result.get("results", {}))
        out[role] = result.get("results", {})
    return out


# ------------------------------------------------------------------------------------------------ mode=eval


def trained_rounds(store: RunStore) -> list[int]:
    """The rounds whose training stage is complete and saved at least one role's adapter (or weights)."""
    found = {int(m.group(1)) for p in store.path("stages").glob("round_*.training.json")
             if (m := re.fullmatch(r"round_(\d+)\.training\.json", p.name))}
    return sorted(r for r in found if any(store.path(adapter_dir(r, role)).is_dir() for role in ROLES))


def run_config(cfg: ExpertChatConfig) -> ExpertChatConfig:
    """The evaluated run's recorded config with this command's ``evaluation``, ``progress`` and ``tracker``.

    Raises:
        ExpertChatError: no folder, no recorded config in it (not a run folder, or an empty one), or a config
            this version cannot read.
    """
    folder = Path(cfg.evaluation.run or cfg.run_dir or ".").expanduser()
    if not folder.is_dir():
        raise ExpertChatError(f"evaluation.run: no run folder at {folder} (set evaluation.run=<a run folder>)")
    if not (folder / CONFIG_FILE).is_file():
        raise ExpertChatError(f"evaluation.run: {folder} holds no run ({CONFIG_FILE} missing): give the folder of "
                              f"a run that `python -m expertchat` wrote (evaluation.run=PATH)")
    mine = OmegaConf.structured(cfg)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExpertChatConfig), OmegaConf.load(folder / CONFIG_FILE),
                                 {"evaluation": mine.evaluation, "progress": cfg.progress, "tracker": mine.tracker,
                                  "mode": "eval", "run_dir": str(folder)})
    except OmegaConfBaseException as exc:
        raise ExpertChatError(f"{folder / CONFIG_FILE} cannot be read as a config of this version: "
                              f"{first_line(exc)}") from exc
    return to_config(merged)


def check(cfg: ExpertChatConfig) -> tuple[ExpertChatConfig, list[int], list[evaluation.EvalPrompt]]:
    """Before any model loads: the run's config, the rounds to evaluate and the held-out prompts.

    Raises:
        ExpertChatError: as :func:`run_config`; a requested round that saved no adapter; a missing model;
            evaluation settings that differ from those of the folder's earlier points.
    """
    run_cfg = run_config(cfg)
    store = RunStore(run_cfg.run_dir)
    trained = trained_rounds(store)
    wanted = trained if cfg.evaluation.rounds is None else list(cfg.evaluation.rounds)
    missing = [r for r in wanted if r not in trained]
    if missing:
        raise ExpertChatError(f"evaluation.rounds: round {missing[0]} saved no adapter in {store.root} (trained "
                              f"rounds: {', '.join(map(str, trained)) or 'none'})")
    for role in ROLES:
        check_model(getattr(run_cfg, role), role)
    if run_cfg.evaluation.judge is not None:
        check_model(run_cfg.evaluation.judge, "evaluation.judge")
    return run_cfg, wanted, evaluation.plan_prompts(run_cfg, store)


def run(cfg: ExpertChatConfig, tracker: Tracker | None = None,
        checked: tuple[ExpertChatConfig, list[int], list[evaluation.EvalPrompt]] | None = None) -> dict[str, Any]:
    """Evaluate the base models and each requested round's adapters of a run folder (what :func:`check` found);
    points already evaluated (their marker says so) are kept. Returns ``{point: summary}``."""
    run_cfg, rounds, prompts = checked if checked is not None else check(cfg)
    tracker = tracker or Tracker()
    store = RunStore(run_cfg.run_dir)
    if not rounds:
        log.info("%s saved no adapter (no trained round): evaluating the base models only", store.root)
    evaluation.record_prompts(run_cfg, store, prompts)
    actor, judge = load_pair(run_cfg.actor, run_cfg.judge)
    policies = Policies({"actor": actor, "judge": judge}, run_cfg.training)
    judge_lm = functools.cache(lambda: frozen_judge(run_cfg, policies))
    out: dict[str, Any] = {}
    for point in ["base", *rounds]:
        if _done(store, point):
            log.info("evaluation %s: done before, kept", point)
        else:
            if point != "base":
                for role in ROLES:
                    if store.path(adapter_dir(point, role)).is_dir():
                        policies.load(store, point, role)
            store.begin(point, "evaluation", [evaluation.EVAL_FILE])
            store.finish(point, "evaluation", evaluate_point(run_cfg, store, policies.models, judge_lm(), prompts,
                                                             point, tracker))
        out[point] = store.stage_summary(point, "evaluation")
        for line in evaluation.describe(out[point]):
            log.info("evaluation %s: %s", point, line)
    log.info("evaluated %d point(s) of %s: %s and %s", len(out), store.root, evaluation.EVAL_FILE,
             "stages/*.evaluation.json")
    return out


def _done(store: RunStore, point: int | str) -> bool:
    """A point is done when its marker holds a summary (a run's ``skipped`` marker is evaluated again)."""
    if not store.done(point, "evaluation"):
        return False
    if "skipped" in store.stage_summary(point, "evaluation"):
        store.path(f"stages/{'base' if point == 'base' else f'round_{point}'}.evaluation.json").unlink()
        return False
    return True
