"""expertchat/report/dashboard.py: a sweep's W&B view and report, built offline with wandb-workspaces as a spec
(grouped by the swept keys, the last evaluation point's figures pinned, sweep.png in an offline run of its own)."""

from __future__ import annotations

import json

import pytest
import yaml

from expertchat.errors import ExpertChatError
from expertchat.report import dashboard
from expertchat.report import markdown as report
from tests.report_helpers import make_sweep, wandb_records

TASK = ["+experiment=smoke", "reward.zeta=0.0,1.0", "seed=1,2"]


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    root = make_sweep(tmp_path / "multirun" / "2026-12-06" / "10-00-00", TASK, {0: {}, 1: {}, 2: {}, 3: None})
    cfg = yaml.safe_load((root / "multirun.yaml").read_text())
    cfg["hydra"]["runtime"] = {"choices": {"experiment": "smoke"}}
    cfg["tracker"] = {"backend": "wandb", "project": "expertchat", "entity": None, "group": None}
    (root / "multirun.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_the_spec_groups_the_sweeps_runs_by_its_swept_keys(sweep, capsys):
    assert report.main([str(sweep), "--wandb-workspace"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == f"W&B dashboard spec: {sweep / dashboard.SPEC_FILE}"
    assert out[-1].startswith("offline: nothing was sent to W&B. To save this view and report: on a login node")
    assert f"python -m expertchat.report {sweep} --wandb-workspace --save --entity YOUR_ENTITY" in out[-1]
    spec = json.loads((sweep / dashboard.SPEC_FILE).read_text())
    assert spec["group"] == "smoke/2026-12-06_10-00-00" and spec["swept"] == ["reward.zeta", "seed"]
    view = spec["workspace"]
    assert view["displayName"] == "ExpertChat sweep smoke/2026-12-06_10-00-00" and view["project"] == "expertchat"
    (runset,) = view["spec"]["section"]["runSets"]
    assert runset["filters"]["filters"] == [{"key": {"section": "run", "name": "group"}, "op": "=",
                                             "value": "smoke/2026-12-06_10-00-00", "disabled": False}]
    assert runset["grouping"] == [{"section": "config", "name": "reward.value.zeta"},
                                  {"section": "config", "name": "seed.value"}]
    pinned = runset["runFeed"]["columnPinned"]
    for column in ("summary:final/actor/delta_vs_base/mean", "summary:final/actor/delta_vs_base/ci_lo",
                   "summary:final/judge/win_rate", "summary:final/judge/length_ratio"):
        assert pinned[column]
    sections = view["spec"]["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == ["Held-out evaluation (grouped by reward.zeta, seed)",
                                             "Length and diversity beside the reward", "Partner-rated rewards",
                                             "Training curves", "Sweep figure"]
    metrics = [m for s in sections for p in s["panels"] for m in p["config"].get("metrics", [])]
    assert {"final/actor/delta_vs_base/mean", "final/judge/win_rate", "train/actor/loss"} <= set(metrics)
    assert sections[-1]["panels"][0]["config"]["mediaKeys"] == ["sweep"]
    assert "reward.zeta=0.0 seed=1" in spec["report"]["markdown"] and spec["report"]["panels"][0]["type"] == "MediaBrowser"


def test_sweep_png_goes_to_an_offline_run_in_the_sweeps_group(sweep):
    assert dashboard.summary_run(sweep, dashboard.sweep_facts(sweep)) is None  # no sweep.png yet: no run
    assert report.main([str(sweep)]) == 0  # sweep.md and sweep.png
    dashboard.write(sweep)
    spec = json.loads((sweep / dashboard.SPEC_FILE).read_text())
    (log,) = (sweep / "wandb").glob("offline-run-*/run-*.wandb")
    assert spec["sweep_run"] == str(log.parent)
    run = next(r.run for r in wandb_records(log) if r.WhichOneof("record_type") == "run")
    assert run.run_group == "smoke/2026-12-06_10-00-00" and run.job_type == "sweep" and run.run_id.startswith("sweep-")
    history = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
               for r in wandb_records(log) if r.WhichOneof("record_type") == "history" for i in r.history.item}
    assert history["sweep/_type"] == "image-file" and history["sweep/format"] == "png"


def test_saving_without_an_entity_and_a_run_folder_are_one_line(sweep, tmp_path, capsys):
    with pytest.raises(ExpertChatError, match="--save needs a W&B entity: --entity NAME"):
        dashboard.write(sweep, save=True)
    assert report.main([str(sweep / "0"), "--wandb-workspace"]) == 2
    assert capsys.readouterr().err.strip().endswith("is not one")
    with pytest.raises(ExpertChatError, match="cannot read the sweep's overrides"):
        dashboard.sweep_facts(tmp_path)
