"""expertchat/modes/preflight.py: every job of a sweep is checked (config, models, memory plan) before anything is
queued, and the first that fails is named in one line."""

from __future__ import annotations

from dataclasses import replace

import pytest

from expertchat.errors import ExpertChatError
from expertchat.modes import preflight
from tests.conftest import compose_cfg


def test_every_job_of_the_sweep_is_planned_once_per_distinct_plan():
    lines = preflight.check_jobs(["+experiment=smoke", "hardware.memory_gb=64,32", "seed=1,2"])
    assert lines[0] == "checked 4 job(s) before queueing: models found, memory plan fits"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["job 0 (hardware.memory_gb=64 seed=1)",
                                                                   "job 2 (hardware.memory_gb=32 seed=1)"]
    assert all("hardware=cpu, needs " in line and " GB RAM of " in line for line in lines[1:])


def test_the_first_job_that_does_not_fit_is_named_with_the_plans_figure():
    with pytest.raises(ExpertChatError) as error:
        preflight.check_jobs(["+experiment=smoke", "hardware.memory_gb=64,1"])
    message = str(error.value)
    assert message.startswith("sweep refused before queueing: job 1 (hardware.memory_gb=1) does not fit hardware=cpu: "
                              "the plan needs ") and " GB RAM of 1.0 " in message
    assert message.endswith("nothing was queued") and "\n" not in message


def test_a_bad_value_in_a_later_job_is_named_by_its_job():
    with pytest.raises(ExpertChatError, match=r"^sweep refused before queueing: job 1 \(reward.zeta=7\): .*reward.zeta"):
        preflight.check_jobs(["+experiment=smoke", "reward.zeta=0.4,7"])


def test_models_must_be_where_an_offline_node_looks(tmp_path):
    cfg = compose_cfg("+experiment=smoke")
    preflight.check_models(cfg)  # the embedded SmolLM2, an installed package
    (tmp_path / "llama").mkdir()
    preflight.check_models(replace(cfg, actor=replace(cfg.actor, package=None, gguf_file=None,
                                                      path=str(tmp_path / "llama"))))
    with pytest.raises(ExpertChatError, match="no model folder at"):
        preflight.check_models(replace(cfg, judge=replace(cfg.judge, package=None, gguf_file=None,
                                                          path=str(tmp_path / "gone"))))
    hub = replace(cfg, judge=replace(cfg.judge, package=None, gguf_file=None, path="no-such-org/no-such-model"))
    with pytest.raises(ExpertChatError) as error:
        preflight.check_models(hub)
    assert str(error.value).startswith("judge.path=no-such-org/no-such-model is a hub id that is not in the Hugging "
                                       "Face cache here")
    assert "HF_HUB_DISABLE_XET=1 hf download --max-workers=1 no-such-org/no-such-model" in str(error.value)


def test_only_cluster_profiles_ask_for_the_hardware_and_an_account(monkeypatch):
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    monkeypatch.delenv("SBATCH_ACCOUNT", raising=False)
    monkeypatch.delenv("EXPERTCHAT_HOME", raising=False)  # check_profile sets it for sbatch; unset again after
    local = preflight.compose(["hydra/launcher=slurm_local"])
    assert preflight.is_slurm(local) and not preflight.asks_hardware(local.hydra.launcher)
    preflight.check_profile(local, "slurm_local")  # no account needed
    assert not preflight.is_slurm(preflight.compose([]))
    rorqual = preflight.compose(["+cluster=rorqual"])
    assert preflight.asks_hardware(rorqual.hydra.launcher)
    with pytest.raises(ExpertChatError, match="needs a Slurm account and SLURM_ACCOUNT is not set"):
        preflight.check_profile(rorqual, "rorqual")
    monkeypatch.setenv("SBATCH_ACCOUNT", "rrg-someone")  # sbatch's own variable counts too
    preflight.check_profile(preflight.compose(["+cluster=rorqual"]), "rorqual")
    monkeypatch.setenv("EXPERTCHAT_HOME", "/nowhere")
    with pytest.raises(ExpertChatError, match=r"EXPERTCHAT_HOME=/nowhere has none: source launchers/alliance/env.sh"):
        preflight.check_profile(rorqual, "rorqual")


def test_a_cluster_whose_hardware_a_later_option_replaced_is_one_line(monkeypatch):
    monkeypatch.setenv("SLURM_ACCOUNT", "def-someone")
    monkeypatch.delenv("EXPERTCHAT_HOME", raising=False)
    late = preflight.compose(["+cluster=rorqual", "+experiment=mixtral_vs_llama"])  # the experiment picks beluga
    with pytest.raises(ExpertChatError) as error:
        preflight.check_profile(late, "rorqual")
    assert str(error.value) == ("+cluster=rorqual selects hardware=rorqual, but an option after it picked "
                                "hardware=beluga (e.g. +experiment=mixtral_vs_llama): put +cluster=rorqual last")
    preflight.check_profile(preflight.compose(["+experiment=mixtral_vs_llama", "+cluster=rorqual"]), "rorqual")
