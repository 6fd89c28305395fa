"""The resume policy (issue 35, item 4): a resume keeps the saved run's settings; a changed optimizer setting is
refused naming the setting, both values and the setting that accepts it, or with resume_changes "apply" used, with
a warning naming old -> new. The same in the library (AdamPower, CPUAdamPower: torch's load and DeepSpeed's ZeRO-2/3
engine.load_checkpoint), the main job (--resume_changes apply) and the Megatron job (--gradpower-resume-changes apply).
"""

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import MEGATRON_CPU_ENV, torchrun
from gradpower_ds import AdamPower, CPUAdamPower
from gradpower_ds.deepspeed.params import split_params
from gradpower_ds.jobs.run_dir import RunDirError
from gradpower_ds.jobs.train import prepare_run_dir
from gradpower_ds.jobs.train_config import ConfigError, TrainConfig
from gradpower_ds.jobs.metrics import read_metrics

JOBS = Path(__file__).parent / "jobs"


# ---- the optimizers ------------------------------------------------------------------------------------------------

def _trained(cls, powers, **kwargs):
    """(params, an optimizer of `cls` with one group per power, after one step)."""
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 4 + i)) for i in range(len(powers))]
    optimizer = cls([{"params": [p], "power": power} for p, power in zip(params, powers)], **kwargs)
    sum((p * p).sum() for p in params).backward()
    optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("cls", [AdamPower, CPUAdamPower])
def test_a_changed_power_is_refused_naming_group_setting_and_both_values(cls):
    params, saved = _trained(cls, [1.2, 1.1, 1.3])
    state = saved.state_dict()
    fresh = cls([{"params": [p], "power": power} for p, power in zip(params, [1.5, 1.1, 1.4])])
    with pytest.raises(ValueError) as refused:
        fresh.load_state_dict(state)
    message = str(refused.value)
    assert (f"{cls.__name__}: the checkpoint was saved with other settings: group 0: power 1.2 (checkpoint) -> "
            "1.5 (this optimizer); group 2: power 1.3 (checkpoint) -> 1.4 (this optimizer). Pass "
            "resume_changes=\"apply\"") in message
    assert "group 1" not in message  # its p did not change
    assert not fresh.state and [g["power"] for g in fresh.param_groups] == [1.5, 1.1, 1.4]  # nothing was loaded


@pytest.mark.parametrize("cls", [AdamPower, CPUAdamPower])
def test_apply_uses_the_new_settings_with_a_warning(cls, caplog):
    params, saved = _trained(cls, [1.2, 1.1])
    state = saved.state_dict()
    fresh = cls([{"params": [params[0]], "power": 1.5}, {"params": [params[1]], "power": 1.1}], betas=(0.8, 0.99),
                eps=1e-6, weight_decay=0.05, power_eps=1e-3, resume_changes="apply")
    with caplog.at_level(logging.WARNING, logger="gradpower_ds.optimizer_base"):
        fresh.load_state_dict(state)
    assert [(g["power"], g["betas"], g["eps"], g["weight_decay"], g["power_eps"]) for g in fresh.param_groups] == [
        (1.5, (0.8, 0.99), 1e-6, 0.05, 1e-3), (1.1, (0.8, 0.99), 1e-6, 0.05, 1e-3)]
    warning = caplog.text
    assert f"{cls.__name__}: resume_changes=\"apply\": using this optimizer's settings, not the checkpoint's" in warning
    assert "group 0: power 1.2 (checkpoint) -> 1.5 (this optimizer)" in warning
    assert "group 1: betas (0.9, 0.999) (checkpoint) -> (0.8, 0.99) (this optimizer)" in warning
    assert "group 1: power " not in warning
    for p in params:  # the moments and steps are the checkpoint's
        assert torch.equal(fresh.state[p]["exp_avg"], saved.state[p]["exp_avg"])
        assert fresh.state[p]["step"].item() == 1.0


def test_lr_is_the_schedulers_and_missing_settings_are_filled_not_refused(caplog):
    params, saved = _trained(AdamPower, [1.2])
    state = saved.state_dict()
    fresh = AdamPower([{"params": params, "power": 1.2}], lr=0.5)
    fresh.load_state_dict(state)  # lr is not compared: the lr scheduler's own state sets it on a resume
    assert fresh.param_groups[0]["lr"] == saved.param_groups[0]["lr"]
    adamw = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)  # AdamPower's defaults, but p
    adamw.step()
    other = AdamPower(params, power=1.5)
    with caplog.at_level(logging.WARNING, logger="gradpower_ds.optimizer_base"):
        other.load_state_dict(adamw.state_dict())  # saved by AdamW: no power to compare, it is filled
    assert other.param_groups[0]["power"] == 1.5 and "has no adam_w_mode, power, power_eps" in caplog.text


def test_an_unchanged_resume_is_silent(caplog):
    params, saved = _trained(AdamPower, [1.2])
    fresh = AdamPower([{"params": params, "power": 1.2}], resume_changes="apply")
    with caplog.at_level(logging.WARNING, logger="gradpower_ds.optimizer_base"):
        fresh.load_state_dict(saved.state_dict())
    assert caplog.text == ""


def test_the_setting_is_checked_where_it_enters():
    with pytest.raises(ValueError, match=r"AdamPower: invalid resume_changes='keep': must be one of refuse, apply"):
        AdamPower([torch.nn.Parameter(torch.ones(1))], resume_changes="keep")
    others, powers = split_params("AdamPower", {"power": 1.5, "resume_changes": "apply"})
    assert others == {"resume_changes": "apply"} and powers["power"] == 1.5
    with pytest.raises(ValueError, match=r"DeepSpeed optimizer 'AdamPower' params: invalid resume_changes='yes'"):
        split_params("AdamPower", {"resume_changes": "yes"})


# ---- the main job's settings ----------------------------------------------------------------------------------------

def _saved_run(tmp_path, **settings) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step2")
    (run_dir / "config.json").write_text(json.dumps(TrainConfig(run_dir=str(run_dir), **settings).to_dict()))
    (run_dir / "status.json").write_text(json.dumps({"state": "stopped", "step": 2}))
    return run_dir


def test_main_job_refuses_optimizer_changes_naming_resume_changes_apply(tmp_path):
    run_dir = _saved_run(tmp_path, steps=10, warmup_steps=2)
    base = dict(run_dir=str(run_dir), steps=10, warmup_steps=2, resume=True)
    with pytest.raises(RunDirError, match=r"power 1.2 -> 1.5, lr 0.003 -> 0.001\. .*; resume with those settings, "
                                          r"pass --resume_changes apply to train on with the new power, lr"):
        prepare_run_dir(TrainConfig(**base, power=1.5, lr=0.001))
    assert prepare_run_dir(TrainConfig(**base, power=1.5, lr=0.001, betas=(0.8, 0.9), resume_changes="apply")) \
        == run_dir
    # apply accepts only the optimizer settings: the others are refused as before, and apply is not suggested
    with pytest.raises(RunDirError, match=r"cannot change the settings of the run in .*: gpas false -> true\. "
                                          r"Its checkpoint holds .*; resume with those settings, or start a new"):
        prepare_run_dir(TrainConfig(**base, power=1.5, gpas=True, resume_changes="apply"))
    config = TrainConfig(resume_changes="apply").deepspeed_config()
    assert config["optimizer"]["params"]["resume_changes"] == "apply"
    assert "resume_changes" not in TrainConfig(optimizer="adamw").deepspeed_config()["optimizer"]["params"]


def test_main_job_setting_is_checked():
    with pytest.raises(ConfigError, match=r"resume_changes='always' is unknown; choose one of \['refuse', 'apply'\]"):
        TrainConfig(resume_changes="always")
    with pytest.raises(ConfigError, match=r"resume_changes apply with optimizer adamw: only adampower applies"):
        TrainConfig(optimizer="adamw", resume_changes="apply")


# ---- the Megatron job's comparison ----------------------------------------------------------------------------------

def _megatron_args(**changes):
    values = dict(optimizer="adampower", gradpower_p=1.2, gradpower_p_expert=None, gradpower_p_adam=None,
                  adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1, lr=3e-4,
                  gradpower_resume_changes="refuse")
    return argparse.Namespace(**{**values, **changes})


def test_megatron_compares_the_saved_settings(caplog):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from megatron_patches.optimizer import check_resume, resume_settings

    saved = json.loads(json.dumps(resume_settings(_megatron_args())))  # as the checkpoint's plain state holds it
    assert saved == {"power": 1.2, "expert_power": 1.2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                     "lr": 3e-4}
    assert check_resume(saved, _megatron_args()) == {}
    assert check_resume({}, _megatron_args(gradpower_p=1.5)) == {}  # a checkpoint from before: nothing to compare
    with pytest.raises(ValueError, match=r"--gradpower-p 1.2 \(checkpoint\) -> 1.5 \(this run\); --gradpower-p-expert "
                                         r"1.2 \(checkpoint\) -> 1.5 \(this run\)\. Pass --gradpower-resume-changes "
                                         r"apply"):
        check_resume(saved, _megatron_args(gradpower_p=1.5))
    with caplog.at_level(logging.WARNING, logger="megatron_patches.optimizer"):
        changes = check_resume(saved, _megatron_args(adam_beta2=0.99, lr=1e-3, gradpower_resume_changes="apply"))
    assert set(changes) == {"betas", "lr"}
    assert "--adam-beta1/--adam-beta2 [0.9, 0.95] (checkpoint) -> [0.9, 0.99] (this run)" in caplog.text


# ---- launched: DeepSpeed ZeRO-2/3, the main job, the Megatron job ---------------------------------------------------

@pytest.mark.slow
def test_deepspeed_zero_load_checkpoint_follows_the_policy(tmp_path):
    """tests/jobs/ds_resume_policy.py, one 2-rank launch: a power-1.2 checkpoint loaded with power 1.5 is refused
    (ZeRO-2 and ZeRO-3, the checkpoint and its universal conversion), and with "resume_changes": "apply" trains on
    with 1.5 (unlike one loaded with 1.2); the same for MuonPower's power and adam_power (ZeRO 0, 2, 3)."""
    from jobs import ds_resume_policy as job

    torchrun(JOBS / "ds_resume_policy.py", tmp_path, tmp_path / "out.pt")
    results = torch.load(tmp_path / "out.pt", weights_only=False)
    assert sorted(results) == sorted([f"z{stage} {load}" for stage in job.STAGES for load in job.LOADS]
                                     + [f"muon z{stage}" for stage in job.MUON_STAGES])
    for stage in job.MUON_STAGES:
        res = results.pop(f"muon z{stage}")
        assert res["refused"].startswith("MuonPower: the checkpoint was saved with other settings: group "), res
        assert "power 1.5 (checkpoint) -> 0.9 (this optimizer)" in res["refused"], res["refused"]
        assert "power 1.2 (checkpoint) -> 1.0 (this optimizer)" in res["refused adam"], res["refused adam"]
        assert res["applied muon power"] == 0.9 and res["same muon power"] == 1.5
        assert {p for muon, p in res["applied groups"] if muon} == {0.9}
        assert {p for muon, p in res["applied groups"] if not muon} == {1.2}  # adam_power, unchanged
        assert any("power 1.5 (checkpoint) -> 0.9 (this optimizer)" in m for m in res["applied warnings"])
        assert res["same warnings"] == []
        assert any(not torch.equal(res["applied"][k], res["same"][k]) for k in res["same"])  # it stepped with 0.9
    for res in results.values():
        assert "AdamPower: the checkpoint was saved with other settings: group 0: power 1.2 (checkpoint) -> 1.5 " \
               "(this optimizer)" in res["refused"], res["refused"]
        assert "\"resume_changes\": \"apply\"" in res["refused"]
        assert set(res["applied groups"]) == {1.5} and set(res["same groups"]) == {1.2}
        assert any("power 1.2 (checkpoint) -> 1.5 (this optimizer)" in m for m in res["applied warnings"])
        assert res["same warnings"] == []
        assert all(torch.isfinite(torch.tensor(res["applied losses"])))
        assert any(not torch.equal(res["applied"][k], res["same"][k]) for k in res["same"])  # it stepped with 1.5


@pytest.mark.slow
def test_main_job_resume_with_another_power(tmp_path):
    """Stop at 2 of 4; --power 1.5 is refused naming both values and --resume_changes apply; with it the run
    completes, its log warns of the change (the optimizer's groups and the lr schedule's base lrs)."""
    from test_train import deepspeed_train

    run_dir = tmp_path / "r"
    deepspeed_train(run_dir, "--steps", "4", "--stop_at", "2")
    proc = deepspeed_train(run_dir, "--steps", "4", "--resume", "true", "--power", "1.5", check=False)
    assert proc.returncode != 0
    assert "power 1.2 -> 1.5" in proc.stderr and "pass --resume_changes apply" in proc.stderr, proc.stderr[-3000:]
    proc = deepspeed_train(run_dir, "--steps", "4", "--resume", "true", "--power", "1.5", "--lr", "0.001",
                           "--resume_changes", "apply")
    out = proc.stdout + proc.stderr
    assert "resumed at step 2" in out and "adampower p=1.5" in out
    assert "resume_changes=\"apply\": using this optimizer's settings, not the checkpoint's: group 0: power 1.2 " \
           "(checkpoint) -> 1.5 (this optimizer)" in out, out[-4000:]
    assert "resume_changes apply: the lr schedule uses this run's base lrs, not the checkpoint's: group 0: " \
           "0.003 -> 0.001" in out, out[-4000:]
    rows = read_metrics(run_dir / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["lr"] <= 0.001 < rows[1]["lr"]  # step 3 ran at the new lr
    assert json.loads((run_dir / "config.json").read_text())["power"] == 1.5


@pytest.mark.slow
def test_megatron_job_resume_with_another_power(tmp_path):
    """The Megatron job on 2 CPU ranks: a --load with another --gradpower-p is refused naming both values and
    --gradpower-resume-changes apply; with it (and --lr doubled) the run trains on at the new lr, and its log
    warns."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from test_megatron_pretrain import TINY, metrics

    common = ["-m", "gradpower_ds.jobs.train_megatron", *TINY, "--optimizer", "adampower", "--train-iters", "4"]
    first = tmp_path / "first"
    torchrun(*common, "--gradpower-p", "1.2", "--save", first, "--save-interval", "2", env=MEGATRON_CPU_ENV,
             timeout=600)
    resume = [*common, "--gradpower-p", "1.5", "--load", first, "--ckpt-step", "2"]
    with pytest.raises(AssertionError) as refused:
        torchrun(*resume, "--save", tmp_path / "refused", env=MEGATRON_CPU_ENV, timeout=600)
    assert "--gradpower-p 1.2 (checkpoint) -> 1.5 (this run)" in str(refused.value)
    assert "Pass --gradpower-resume-changes apply" in str(refused.value)
    applied = torchrun(*resume, "--save", tmp_path / "applied", "--gradpower-resume-changes", "apply", "--lr",
                       "0.002", env=MEGATRON_CPU_ENV, timeout=600)
    out = applied.stdout + applied.stderr
    assert "--gradpower-resume-changes apply: this run's optimizer settings replace the checkpoint's: --gradpower-p " \
           "1.2 (checkpoint) -> 1.5 (this run)" in out, out[-4000:]
    assert "--lr 0.001 (checkpoint) -> 0.002 (this run)" in out
    assert "resumed at iteration 2" in out
    assert json.loads((tmp_path / "applied" / "status.json").read_text()) == {"state": "complete", "step": 4}
    before, after = metrics(first), metrics(tmp_path / "applied")
    for step in (3, 4):  # the schedule of the new lr (the first run's, doubled)
        assert float(after[step]["lr"]) == pytest.approx(2 * float(before[step]["lr"])), (before, after)
