"""Keep your trainer: "type": "AdamPower" under the Hugging Face Trainer and accelerate, and the runner's edges.

- Hugging Face ``Trainer`` with ``TrainingArguments(deepspeed=CONFIG)``, started as HF documents it but through the
  runner: ``deepspeed --num_gpus 2 --module gradpower_ds.jobs.run hf_trainer_job.py --deepspeed CONFIG`` (the script
  knows nothing of gradpower_ds);
- ``accelerate launch`` with a DeepSpeed plugin (an accelerate config naming the DeepSpeed config file), the
  script calling ``gradpower_ds.deepspeed.register()`` at its top, or started through the runner
  (``accelerate launch ... -m gradpower_ds.jobs.run``);

both with the optimizer built by DeepSpeed from the config's "optimizer" section, on 2 CPU ranks (gloo) with a tiny
LLaMA built from a transformers config. Also: ``python -m gradpower_ds.jobs.run`` with no launcher (one process; issue
20 item 4), and the hint for DeepSpeed's "AdamPower is not a supported DeepSpeed Optimizer" (item 8).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, launch_env
from gradpower_ds.jobs import processes
from gradpower_ds.deepspeed import UNREGISTERED_HINT, explain_unregistered

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "tests" / "jobs"
BIN = Path(sys.executable).parent
TIMEOUT = 300
POWER = 1.3  # not the default 1.2, so the power seen in the optimizer must come from the config
STEPS = 3
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", *processes.CLUSTER_ENV)


def check(proc: subprocess.CompletedProcess, what: str) -> None:
    """Fails with the tail of the output when a launch exited non-zero."""
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-8000:]}"


def clean_env() -> dict:
    """launch_env() without any launcher's variables: what `python script.py` in a fresh shell sees."""
    return {k: v for k, v in launch_env().items() if k not in LAUNCHER_ENV}


def records(out: Path) -> list[dict]:
    """rank0.json and rank1.json written by a job."""
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def check_adampower_trained(recs: list[dict]) -> None:
    """Both ranks: DeepSpeed's engine stepped our optimizer STEPS times with the configured power, losses finite."""
    for rec in recs:
        assert rec["engine"] == "DeepSpeedEngine"
        assert rec["optimizer"] == "CPUAdamPower"  # what DeepSpeed's CPU accelerator gets for "AdamPower"
        assert rec["powers"] == [POWER]
        assert rec["steps"] == [float(STEPS)]  # every parameter's state: our optimizer took every step
        assert rec["world_size"] == 2
        assert len(rec["losses"]) == STEPS and rec["all_finite"] and all(math.isfinite(x) for x in rec["losses"])


# ---- issue 20 item 4: python -m gradpower_ds.jobs.run with no launcher ----

def test_default_to_world_of_one_only_without_a_launcher(monkeypatch):
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    assert processes.default_to_world_of_one()
    assert {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == dict(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("MASTER_PORT", "12345")
    assert processes.default_to_world_of_one() and os.environ["MASTER_PORT"] == "12345"  # the user's port is kept
    for launcher_var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):  # torchrun/deepspeed, MPI
        for name in LAUNCHER_ENV:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(launcher_var, "4")
        assert not processes.default_to_world_of_one() and "MASTER_PORT" not in os.environ


@pytest.mark.slow
def test_runner_trains_in_one_process_without_launcher_env(tmp_path):
    """docs/deepspeed.md: `python -m gradpower_ds.jobs.run train.py --deepspeed_config ds.json`: DeepSpeed used to try MPI
    discovery and fail with "No module named 'mpi4py'"."""
    from jobs import ds_toy

    (tmp_path / "ds.json").write_text(json.dumps(ds_toy.ds_config(2, params=dict(ds_toy.LR_WD, power=POWER))))
    proc = subprocess.run([sys.executable, "-m", "gradpower_ds.jobs.run", str(JOBS / "ds_train_script.py"),
                           "--deepspeed_config", str(tmp_path / "ds.json"), "--steps", "1", "--out", str(tmp_path)],
                          env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    check(proc, "python -m gradpower_ds.jobs.run")
    assert "one process, world size 1" in proc.stderr
    result = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert result["launch"]["world_size"] == 1
    assert result["ds"]["optimizer"] == "CPUAdamPower" and result["ds"]["groups"][0]["power"] == POWER
    assert all(math.isfinite(x) for x in result["ds"]["losses"])


# ---- issue 20 item 8: what a user who forgot register() sees ----

def test_explain_unregistered_adds_the_hint_to_deepspeeds_error_only():
    err = AssertionError("AdamPower is not a supported DeepSpeed Optimizer")  # DeepSpeed 0.19.8's text
    assert explain_unregistered(err) and err.__notes__ == [UNREGISTERED_HINT]
    assert not explain_unregistered(err) and err.__notes__ == [UNREGISTERED_HINT]  # once
    assert explain_unregistered(RuntimeError("ProcessRaisedException: ... adamwpower is not a supported DeepSpeed "
                                             "Optimizer"))
    other = AssertionError("Lion2 is not a supported DeepSpeed Optimizer")
    assert not explain_unregistered(other) and not hasattr(other, "__notes__")
    assert "gradpower_ds.deepspeed.register()" in UNREGISTERED_HINT and "-m gradpower_ds.jobs.run" in UNREGISTERED_HINT


UNREGISTERED_SCRIPT = """import deepspeed, torch
import gradpower_ds.deepspeed
gradpower_ds.deepspeed.unregister()  # stands for a process the runner's register() did not reach (mp.spawn)
model = torch.nn.Linear(4, 4)
deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
    "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamPower", "params": {"lr": 1e-3}}})
"""


@pytest.mark.slow
def test_runner_adds_the_hint_to_deepspeeds_unregistered_error(tmp_path):
    (tmp_path / "train.py").write_text(UNREGISTERED_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "gradpower_ds.jobs.run", "train.py"], env=clean_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1
    assert "AssertionError: AdamPower is not a supported DeepSpeed Optimizer" in proc.stderr  # DeepSpeed's, kept
    assert UNREGISTERED_HINT in proc.stderr


@pytest.mark.parametrize("target", [["-m", "torch.distributed.run"], [str(BIN / "torchrun")],
                                    [str(BIN / "deepspeed")], ["-m", "accelerate.commands.launch"]])
def test_runner_refuses_a_launcher_as_its_script(tmp_path, target):
    """`python -m gradpower_ds.jobs.run torchrun ... train.py` would register in the launcher only; its ranks would fail
    with "AdamPower is not a supported DeepSpeed Optimizer"."""
    (tmp_path / "train.py").write_text("raise SystemExit('the launcher ran')\n")
    proc = subprocess.run([sys.executable, "-m", "gradpower_ds.jobs.run", *target, "--nproc_per_node", "1", "train.py"],
                          env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is a launcher: put gradpower_ds.jobs.run after it" in proc.stderr


# ---- issue 20 item 10: Hugging Face Trainer and accelerate ----

HF_DS_CONFIG = {  # as HF documents it: "auto" values filled from TrainingArguments; the power from here
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto", "zero_optimization": {"stage": 2},
    "optimizer": {"type": "AdamPower", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto", "power": POWER}}}


@pytest.mark.slow
def test_hf_trainer_deepspeed_config_builds_adampower(tmp_path):
    (tmp_path / "ds_config.json").write_text(json.dumps(HF_DS_CONFIG))
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
           "gradpower_ds.jobs.run", str(JOBS / "hf_trainer_job.py"), "--deepspeed", str(tmp_path / "ds_config.json"),
           "--steps", str(STEPS), "--out", str(tmp_path / "out")]
    check(subprocess.run(cmd, env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT),
          "deepspeed --module gradpower_ds.jobs.run hf_trainer_job.py")
    recs = records(tmp_path / "out")
    check_adampower_trained(recs)
    assert sorted(rec["process_index"] for rec in recs) == [0, 1]


ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {ds_config}
  zero3_init_flag: false
num_machines: 1
num_processes: 2
machine_rank: 0
main_process_ip: 127.0.0.1
main_process_port: {port}
"""


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["register", "runner"])
def test_accelerate_deepspeed_plugin_builds_adampower(tmp_path, hook):
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                 "zero_optimization": {"stage": 2},
                 "optimizer": {"type": "AdamPower", "params": {"lr": 1e-2, "betas": [0.9, 0.95],
                                                               "weight_decay": 0.1, "power": POWER}}}
    (tmp_path / "ds_config.json").write_text(json.dumps(ds_config))
    (tmp_path / "accelerate.yaml").write_text(ACCELERATE_CONFIG.format(ds_config=tmp_path / "ds_config.json",
                                                                       port=free_port()))
    runner = ["-m", "gradpower_ds.jobs.run"] if hook == "runner" else []
    job_args = ["--no_hook"] if hook == "runner" else []
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(tmp_path / "accelerate.yaml"), *runner,
           str(JOBS / "accelerate_job.py"), *job_args, "--steps", str(STEPS), "--out", str(tmp_path / "out")]
    check(subprocess.run(cmd, env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT),
          " ".join(cmd[1:4] + runner))
    recs = records(tmp_path / "out")
    check_adampower_trained(recs)
    assert all(rec["distributed_type"] == "DistributedType.DEEPSPEED" for rec in recs)
    assert recs[0]["losses"] != recs[1]["losses"]  # each rank its own shard of the data
