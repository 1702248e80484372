"""A sweep's W&B dashboard, built with ``wandb-workspaces``: a saved workspace view of the sweep's runs grouped by its
swept keys, and a report that embeds ``sweep.png`` and the ``sweep.md`` table.

    python -m expertchat.report multirun/2026-12-06/10-00-00 --wandb-workspace          # offline: writes the spec
    python -m expertchat.report multirun/2026-12-06/10-00-00 --wandb-workspace --save   # a login node, online

The view selects the runs of the sweep's W&B group (``<experiment>/<sweep folder>``, as ``report.tracking`` names it),
groups them by the swept keys (their config values) and pins the table's columns to the last evaluation point of each
model (``final/<role>/...``: the held-out reward change vs base with its 95% CI, the win rate, the length and
distinct-2 ratios). Its sections: the held-out evaluation (bar charts of those figures; W&B draws the spread of the
runs of a group), the partner-rated rewards per round, the training curves (DPO loss, reward margin, KL against
``train/step``) and the sweep's figure. ``sweep.png`` reaches W&B through an offline run of its own in the sweep folder
(job type ``sweep``, same group), which ``launchers/alliance/sync_wandb.sh`` or ``wandb-osh`` uploads with the jobs.

Offline (the default, and on compute nodes) nothing is sent: ``<sweep>/wandb_workspace.json`` holds the workspace in
W&B's own view format (``Workspace._spec``) and the report's title, text and panels; ``--save`` (after the runs are
synced, on a machine with internet and ``wandb login``) saves both and prints their URLs. The report cannot be
rendered offline: ``wandb-workspaces`` looks up the project through the API to build it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from expertchat.errors import ExpertChatError

SPEC_FILE = "wandb_workspace.json"
ROLES = ("actor", "judge")
EVAL_FIGURES = ("delta_vs_base/mean", "delta_vs_base/ci_lo", "delta_vs_base/ci_hi", "win_rate", "length_ratio",
                "distinct_2_ratio")
TRAIN_CURVES = ("loss", "rewards/margins", "objective/kl")


def sweep_facts(sweep_dir: Path, entity: str | None = None, project: str | None = None) -> dict[str, Any]:
    """What the dashboard needs from a multirun folder's ``multirun.yaml``: the swept keys, the W&B group, project
    and entity (arguments first, then the sweep's ``tracker.*``, then ``WANDB_ENTITY``).

    Raises:
        ExpertChatError: no readable ``multirun.yaml``.
    """
    import yaml

    from expertchat.report.tracking import sweep_group
    from expertchat.runs.reader import sweep_overrides

    path = sweep_dir / "multirun.yaml"
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        task = [str(o) for o in cfg["hydra"]["overrides"]["task"] or []]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ExpertChatError(f"no W&B dashboard: cannot read the sweep's overrides from {path} "
                              f"({type(exc).__name__}): is it the folder of a multirun?") from exc
    tracker = cfg.get("tracker") or {}
    swept = [k.lstrip("+~") for k in sweep_overrides(task)[0]]
    experiment = ((cfg["hydra"].get("runtime") or {}).get("choices") or {}).get("experiment")
    return {"swept": swept, "group": tracker.get("group") or sweep_group(experiment, sweep_dir),
            "project": project or tracker.get("project") or "expertchat",
            "entity": entity or tracker.get("entity") or os.environ.get("WANDB_ENTITY"),
            "sweep_dir": str(sweep_dir), "tracker": tracker.get("backend")}


def sections(swept: list[str]) -> list[Any]:
    """The workspace's sections (``wandb_workspaces`` objects), in order."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    evaluation = [wr.BarPlot(title=f"{role}: held-out reward change vs base (last point)",
                             metrics=[f"final/{role}/delta_vs_base/mean"]) for role in ROLES]
    evaluation += [wr.BarPlot(title=f"{role}: win rate vs base (last point)", metrics=[f"final/{role}/win_rate"])
                   for role in ROLES]
    guards = [wr.BarPlot(title=f"{role}: length and distinct-2 ratio to the base",
                         metrics=[f"final/{role}/length_ratio", f"final/{role}/distinct_2_ratio"]) for role in ROLES]
    rated = [wr.LinePlot(title="partner-rated reward per round", x="rating/step",
                         y=[f"rating/{role}_reward_mean" for role in ROLES])]
    training = [wr.LinePlot(title=f"{role}: DPO {curve}", x="train/step", y=[f"train/{role}/{curve}"])
                for role in ROLES for curve in TRAIN_CURVES]
    figure = [wr.MediaBrowser(title="sweep.png: held-out change per job", media_keys=["sweep"])]
    grouped = f" (grouped by {', '.join(swept)})" if swept else ""
    return [ws.Section(name=f"Held-out evaluation{grouped}", panels=evaluation, is_open=True),
            ws.Section(name="Length and diversity beside the reward", panels=guards, is_open=True),
            ws.Section(name="Partner-rated rewards", panels=rated, is_open=False),
            ws.Section(name="Training curves", panels=training, is_open=False),
            ws.Section(name="Sweep figure", panels=figure, is_open=True)]


def workspace(facts: dict[str, Any]) -> Any:
    """The saved view (``wandb_workspaces.workspaces.Workspace``) of the sweep's runs."""
    import wandb_workspaces.workspaces as ws

    pinned = [f"summary:final/{role}/{figure}" for role in ROLES for figure in EVAL_FIGURES]
    return ws.Workspace(
        entity=facts["entity"] or "YOUR_ENTITY", project=facts["project"], name=f"ExpertChat sweep {facts['group']}",
        sections=sections(facts["swept"]),
        settings=ws.WorkspaceSettings(x_axis="train/step"),
        runset_settings=ws.RunsetSettings(filters=f"Group == '{facts['group']}'",
                                          groupby=[ws.Config(key) for key in facts["swept"]],
                                          pinned_columns=pinned))


def report_spec(facts: dict[str, Any], sweep_md: str) -> dict[str, Any]:
    """The report: title, description, the ``sweep.md`` text, and the panels (``sweep.png`` first) over the sweep's
    runs grouped by the swept keys; :func:`build_report` turns it into a ``wandb_workspaces`` report."""
    return {"title": f"ExpertChat sweep {facts['group']}",
            "description": f"Sweep folder {facts['sweep_dir']}; swept: {', '.join(facts['swept']) or 'nothing'}.",
            "markdown": sweep_md, "filters": f"Group == '{facts['group']}'", "groupby": facts["swept"],
            "panels": [{"type": "MediaBrowser", "media_keys": ["sweep"], "title": "sweep.png"}]
            + [{"type": "BarPlot", "metrics": [f"final/{role}/{f}"], "title": f"{role} {f}"}
               for role in ROLES for f in ("delta_vs_base/mean", "win_rate", "length_ratio")]}


def build_report(facts: dict[str, Any], spec: dict[str, Any]) -> Any:
    """``wandb_workspaces.reports.v2.Report`` of :func:`report_spec` (needs the W&B API: online only)."""
    import wandb_workspaces.reports.v2 as wr

    kinds = {"MediaBrowser": wr.MediaBrowser, "BarPlot": wr.BarPlot}
    panels = [kinds[p["type"]](**{k: v for k, v in p.items() if k != "type"}) for p in spec["panels"]]
    runset = wr.Runset(entity=facts["entity"], project=facts["project"], name=facts["group"],
                       filters=spec["filters"], groupby=spec["groupby"])
    return wr.Report(entity=facts["entity"], project=facts["project"], title=spec["title"],
                     description=spec["description"],
                     blocks=[wr.PanelGrid(runsets=[runset], panels=panels), wr.MarkdownBlock(text=spec["markdown"])])


def summary_run(sweep_dir: Path, facts: dict[str, Any]) -> Path | None:
    """An offline W&B run in ``<sweep>/wandb/`` (job type ``sweep``, the sweep's group) holding ``sweep.png`` as
    ``sweep``, so that the view and the report can show it once synced; its folder, or None without ``sweep.png``.
    Its id is the sweep folder's (``sweep-<hash>``): a later call's offline folder updates the same W&B run."""
    import wandb

    png = sweep_dir / "sweep.png"
    if not png.is_file():
        return None
    run_id = "sweep-" + hashlib.sha1(str(sweep_dir.resolve()).encode()).hexdigest()[:8]  # one run per sweep folder
    run = wandb.init(project=facts["project"], entity=facts["entity"], group=facts["group"], job_type="sweep",
                     name=f"sweep {facts['group']}", dir=str(sweep_dir), mode="offline", reinit="create_new",
                     id=run_id, resume="allow",
                     config={"sweep": {"dir": facts["sweep_dir"], "swept_keys": facts["swept"]}})
    try:
        run.log({"sweep": wandb.Image(str(png))})
        folder = Path(run.dir).parent
    finally:
        run.finish()
        wandb.teardown()
    return folder


def write(sweep_dir: str | Path, save: bool = False, entity: str | None = None, project: str | None = None) -> Path:
    """Write ``<sweep>/wandb_workspace.json`` (and the offline ``sweep`` run); with ``save``, save the view and the
    report to W&B. Returns the spec's path.

    Raises:
        ExpertChatError: wandb-workspaces is not installed, no ``multirun.yaml``, or ``save`` without an entity or
            a W&B login.
    """
    from expertchat.engine.models import require

    require("wandb_workspaces", "wandb", "--wandb-workspace")
    root = Path(sweep_dir)
    facts = sweep_facts(root, entity, project)
    view = workspace(facts)
    md = root / "sweep.md"
    spec = {"workspace": view._spec, "report": report_spec(facts, md.read_text(encoding="utf-8") if md.is_file()
                                                                else ""),
            "group": facts["group"], "swept": facts["swept"], "project": facts["project"], "entity": facts["entity"]}
    run = summary_run(root, facts)
    spec["sweep_run"] = str(run) if run else None
    path = root / SPEC_FILE
    path.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    if save:
        if not facts["entity"]:
            raise ExpertChatError("--save needs a W&B entity: --entity NAME (or tracker.entity, or WANDB_ENTITY)")
        try:
            saved = view.save()
            report = build_report(facts, spec["report"]).save()
        except Exception as exc:  # noqa: BLE001 - the W&B API raises many types (no login, no network, no project)
            raise ExpertChatError(f"could not save the W&B dashboard ({str(exc).splitlines()[0]}): sync the runs "
                                  f"first (bash launchers/alliance/sync_wandb.sh {root}), `wandb login`, and run "
                                  f"this on a machine with internet") from None
        spec.update(workspace_url=saved.url, report_url=report.url)
        path.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    return path


def how_to_save(sweep_dir: str | Path) -> str:
    """The line the offline command ends with."""
    return (f"offline: nothing was sent to W&B. To save this view and report: on a login node (internet), "
            f"`wandb login` once, sync the runs (bash launchers/alliance/sync_wandb.sh {sweep_dir}, or let wandb-osh "
            f"do it), then: python -m expertchat.report {sweep_dir} --wandb-workspace --save --entity YOUR_ENTITY")
