"""Resuming, stopping and restarting the main job honestly (issue 20).

A resumed run refuses settings that differ from its config.json (the checkpoint holds
the old model, optimizer and schedule); the schedule never gives a negative or a
wasted zero lr; SIGTERM/SIGINT stop all ranks after a saved step; run files get the
usual file mode; TensorBoard shows each step once after a kill and a resume.
Launched runs (2 ranks under the deepspeed launcher, tiny model) are `slow`.
"""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, launch_env, wait_for_running_step
from gradpower_ds.jobs import compare
from gradpower_ds.jobs.files import atomic_open, write_json
from gradpower_ds.jobs.metrics import MetricsLog, read_metrics
from gradpower_ds.jobs.run_dir import SUMMARY_KEYS, RunDir, RunDirError, StopRequest, make_summary, summary_line
from gradpower_ds.jobs.schedules import lr_multiplier
from gradpower_ds.jobs.train import RESUME_MAY_CHANGE, changed_settings, prepare_run_dir, unbuilt_deepspeed_ops
from gradpower_ds.jobs.train_config import TrainConfig
from test_train import QUICKSTART, ROOT, TINY, deepspeed_train


# ---- the schedule ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_schedule_never_negative_and_no_zero_lr_step(schedule, min_ratio):
    steps = 20
    values = [lr_multiplier(s, schedule, steps, 4, decay_fraction=0.3, min_ratio=min_ratio) for s in range(3 * steps)]
    assert all(v >= 0.0 for v in values)
    run = values[:steps]
    assert run[3] == 1.0 and all(v > min_ratio for v in run)  # every step moves the weights: the last one too
    assert run[-1] < run[-2] and all(a >= b for a, b in zip(run[3:], run[4:]))
    # the decay reaches min_ratio at the end (after the last step) and stays there past it, never below 0
    assert all(v == pytest.approx(min_ratio, abs=1e-12) for v in values[steps:])


def test_schedule_wsd_decays_over_its_fraction():
    wsd = [lr_multiplier(s, "wsd", 100, 10, decay_fraction=0.2, min_ratio=0.0) for s in range(100)]
    assert all(v == 1.0 for v in wsd[10:80]) and all(a > b for a, b in zip(wsd[79:], wsd[80:]))
    assert wsd[80] == pytest.approx(1 - 1 / 21) and wsd[99] == pytest.approx(1 / 21)
    with pytest.raises(ValueError, match="min_ratio=-0.5 must be in"):
        lr_multiplier(50, "wsd", 100, 10, min_ratio=-0.5)


# ---- resuming: the run's own settings only ------------------------------------------------------------------------

def _run_dir(tmp_path, state="stopped", checkpoint=True, **settings) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    if checkpoint:
        (run_dir / "checkpoints" / "latest").write_text("step2")
    (run_dir / "config.json").write_text(json.dumps(TrainConfig(run_dir=str(run_dir), **settings).to_dict()))
    (run_dir / "status.json").write_text(json.dumps({"state": state, "step": 2}))
    return run_dir


def test_resume_refuses_changed_settings(tmp_path):
    run_dir = _run_dir(tmp_path, steps=10, warmup_steps=2, stop_at=5)
    cfg = TrainConfig(run_dir=str(run_dir), steps=10, warmup_steps=2, resume=True, power=1.5, lr=0.001)
    assert changed_settings(json.loads((run_dir / "config.json").read_text()), cfg) == [
        ("power", 1.2, 1.5), ("lr", 0.003, 0.001)]
    with pytest.raises(RunDirError, match=r"--resume true cannot change the settings of the run in .*: "
                                          r"power 1.2 -> 1.5, lr 0.003 -> 0.001\. .*start a new --run_dir"):
        prepare_run_dir(cfg)
    with pytest.raises(RunDirError, match=r"steps 10 -> 20 \(a run cannot be extended: .*--stop_at"):
        prepare_run_dir(TrainConfig(run_dir=str(run_dir), steps=20, warmup_steps=2, resume=True))
    # the allow-list: where to stop, how often to log/save/evaluate/measure the noise, progress, TensorBoard, the
    # collectives' timeout
    assert set(RESUME_MAY_CHANGE) == {"resume", "stop_at", "run_dir", "progress", "tensorboard", "log_every",
                                      "save_every", "eval_every", "noise_every", "dist_timeout", "resume_changes", "resume_tag"}
    same = TrainConfig(run_dir=str(run_dir), steps=10, warmup_steps=2, resume=True, stop_at=8, log_every=1, save_every=3,
                       eval_every=7, noise_every=2, progress=False, tensorboard=False)
    assert prepare_run_dir(same) == run_dir
    # a key the saved config lacks counts as its default
    saved = json.loads((run_dir / "config.json").read_text())
    del saved["expert_power"], saved["gpas"]
    assert changed_settings(saved, TrainConfig(steps=10, warmup_steps=2)) == []
    assert changed_settings(saved, TrainConfig(steps=10, warmup_steps=2, gpas=True)) == [("gpas", False, True)]


def test_resume_without_a_checkpoint(tmp_path):
    """Nothing to resume: a new or failed run starts from step 0 (train() says so); a finished one is refused."""
    assert prepare_run_dir(TrainConfig(run_dir=str(tmp_path / "new"), resume=True)) == tmp_path / "new"
    failed = _run_dir(tmp_path, state="failed", checkpoint=False)
    assert prepare_run_dir(TrainConfig(run_dir=str(failed), resume=True, power=1.5)) == failed
    (failed / "status.json").write_text(json.dumps({"state": "stopped", "step": 4}))
    with pytest.raises(RunDirError, match=r"holds a stopped run but no checkpoint \(.*latest is missing\), so it "
                                          r"cannot be resumed; start a new --run_dir"):
        prepare_run_dir(TrainConfig(run_dir=str(failed), resume=True))


# ---- signals, files, TensorBoard, the command line ----------------------------------------------------------------

def test_stop_request_records_signals():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)  # SIG_IGN where started in background
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # again (the launcher passes it on): still a graceful stop
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C: stop now
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_stop_request_flags_agree_on_one_signal():
    stop = StopRequest()
    assert stop.flags("cpu").tolist() == [0.0, 0.0] and StopRequest.agreed(stop.flags("cpu")) == 0
    stop.signum = signal.SIGINT
    assert stop.flags("cpu").tolist() == [0.0, 1.0]
    assert StopRequest.agreed([1.0, 1.0]) == signal.SIGTERM and StopRequest.agreed([0.0, 2.0]) == signal.SIGINT


def test_run_dir_files_and_end_line(tmp_path):
    """gradpower_ds.jobs.run_dir, as both jobs use it: status.json through a run's life, summary.json and loss.png only
    at completion, the one end line (also without a validation loss or a run folder); other ranks write nothing."""
    status = lambda: json.loads((tmp_path / "run" / "status.json").read_text())  # noqa: E731
    RunDir(tmp_path / "other", writer=False).start(0)
    RunDir(None).start(0)
    assert not (tmp_path / "other").exists()
    run = RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    run.start(0, config={"steps": 2}, tensorboard=False)
    assert status() == {"state": "running", "step": 0} and not (tmp_path / "run" / "summary.json").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"steps": 2}
    run.log(step=1, tokens=100, train_loss=3.0, val_loss=None, lr=1e-3, elapsed=2.0)
    run.running(1)
    assert status() == {"state": "running", "step": 1}
    assert read_metrics(tmp_path / "run" / "metrics.csv")[0]["tokens_per_s"] == 50.0
    run.failed(1, RuntimeError("boom"))
    assert status() == {"state": "failed", "step": 1, "error": "RuntimeError: boom", "rank": 0, "failed_ranks": 1}
    run.stopped(1, signal.SIGTERM)
    assert status() == {"state": "stopped", "step": 1, "signal": "SIGTERM"}
    run.stopped(1)
    assert status() == {"state": "stopped", "step": 1}
    run.log(step=2, tokens=200, train_loss=2.5, val_loss=2.25, lr=1e-3, elapsed=4.0, noise_scale=1234.5,
            snr_attention=0.25)
    run.close()
    rows = read_metrics(tmp_path / "run" / "metrics.csv")  # a measured step's noise; none on the others
    assert (rows[0]["noise_scale"], rows[1]["noise_scale"], rows[1]["snr_attention"], rows[1]["snr_ffn"]) == \
        (None, 1234.5, 0.25, None)
    summary = make_summary(val_loss=2.25, steps=2, resumed_at=1, tokens=200, train_seconds=4.0, world_size=2,
                           run_dir=tmp_path / "run", optimizer="adampower", gpas=True)
    assert tuple(summary) == SUMMARY_KEYS and summary["tokens_per_s"] == 50.0
    run.complete(summary, "adampower p=1.2")
    assert status() == {"state": "complete", "step": 2}
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert summary_line("job", summary) == (
        f"job: done | validation loss 2.2500 | 200 tokens in 4.0 s = 50 tokens/s on 2 ranks | {tmp_path / 'run'}/ "
        "(metrics.csv, loss.png, tensorboard/)")
    noisy = make_summary(val_loss=2.25, steps=2, resumed_at=0, tokens=200, train_seconds=4.0, world_size=2,
                         run_dir=None, optimizer="adampower", gpas=False, noise_scale=20480.4)
    assert summary_line("job", noisy).endswith(" | no run folder | gradient noise scale B_simple 20,480 tokens")
    empty = make_summary(val_loss=None, steps=2, resumed_at=2, tokens=200, train_seconds=0.0, world_size=1,
                         run_dir=None, optimizer="adam", gpas=False)
    assert summary_line("job", empty) == ("job: done | validation loss - | 200 tokens in 0.0 s = - tokens/s on 1 ranks"
                                          " | no run folder")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_files_get_the_usual_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "status.json", {"state": "running"})
        with atomic_open(tmp_path / "loss.png") as f:
            f.write(b"x")
        with open(tmp_path / "metrics.csv", "w"):
            pass
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(("status.json", "loss.png", "metrics.csv"), 0o666 & ~umask)


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    """A run killed after step 7 with its checkpoint at 4, resumed at 4: steps 5-7 of the killed run are gone
    from the event files (not only hidden by viewers that purge orphaned data)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path)
    for step in range(1, 8):
        log.log(step=step, tokens=step, train_loss=float(step), lr=1.0)
    log.close()
    log = MetricsLog(tmp_path, resume_step=4)
    for step in range(5, 9):
        log.log(step=step, tokens=step, train_loss=100.0 + step, lr=1.0)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), purge_orphaned_data=False)
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0), (8, 108.0)]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_main_help_exits_0(flag):
    proc = subprocess.run([sys.executable, "-m", "gradpower_ds", flag], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m gradpower_ds {train,compare,advise-p,verify-checkpoint}")
    assert "compare" in proc.stdout.split("commands:")[1]
    proc = subprocess.run([sys.executable, "-m", "gradpower_ds"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("usage:")


def test_unbuilt_deepspeed_ops(tmp_path, monkeypatch):
    """The 'DeepSpeed builds ... on first use' line is due when the extensions cache lacks the run's ops."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("checks the CPU accelerator's ops")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert unbuilt_deepspeed_ops(TrainConfig()) == ["deepspeed_shm_comm"]
    assert unbuilt_deepspeed_ops(TrainConfig(optimizer="adamw")) == ["deepspeed_shm_comm", "fused_adam"]
    for name in ("deepspeed_shm_comm", "fused_adam"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.so").write_bytes(b"")
    assert unbuilt_deepspeed_ops(TrainConfig(optimizer="adamw")) == []
    assert list(tmp_path.iterdir()) and not (tmp_path / "cpu_adam").exists()  # asking creates nothing


# ---- launched runs ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_with_other_settings_is_refused_and_nothing_changes(tmp_path):
    """Stop at 2 of 4 (resume on a new run_dir: warned, from step 0); resuming with another power is refused
    and changes nothing; resuming with the run's settings completes it with them."""
    run_dir = tmp_path / "r"
    proc = deepspeed_train(run_dir, "--steps", "4", "--resume", "true", "--stop_at", "2")
    assert f"no checkpoint in {run_dir / 'checkpoints'}: starting from step 0" in proc.stdout + proc.stderr
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "stopped", "step": 2}
    before = {name: (run_dir / name).read_bytes() for name in ("config.json", "status.json", "metrics.csv")}
    proc = deepspeed_train(run_dir, "--steps", "4", "--resume", "true", "--power", "1.5", check=False)
    assert proc.returncode != 0
    assert "--resume true cannot change the settings of the run in" in proc.stderr
    assert "power 1.2 -> 1.5" in proc.stderr and "start a new --run_dir" in proc.stderr
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    proc = deepspeed_train(run_dir, "--steps", "4", "--resume", "true")
    out = proc.stdout + proc.stderr
    assert "adampower p=1.2 | CPUAdamPower" in out and "resumed at step 2" in out
    assert json.loads((run_dir / "config.json").read_text())["power"] == 1.2
    assert json.loads((run_dir / "status.json").read_text()) == {"state": "complete", "step": 4}
    assert [r["step"] for r in read_metrics(run_dir / "metrics.csv")] == [1, 2, 3, 4]


def _rank_processes(launcher_pid: int, timeout: float = 120) -> list:
    """The training processes (not the launchers) under the deepspeed launcher, once both exist."""
    import psutil

    def command(process) -> str:
        try:
            return " ".join(process.cmdline())
        except psutil.Error:  # a short-lived child (e.g. a compiler) that exited, or is exiting, meanwhile
            return ""

    deadline = time.time() + timeout
    while time.time() < deadline:
        ranks = [p for p in psutil.Process(launcher_pid).children(recursive=True)
                 if "gradpower_ds.jobs.train" in command(p) and "deepspeed.launcher" not in command(p)]
        if len(ranks) == 2:
            return sorted(ranks, key=lambda p: "--local_rank=1" in p.cmdline())
        time.sleep(0.1)
    raise AssertionError("the ranks did not start")


@pytest.mark.slow
def test_sigterm_stops_after_a_saved_step_and_resume_continues_exactly(tmp_path):
    """SIGTERM to rank 1 only, while status.json counts the steps: all ranks stop after the same step with a
    checkpoint, the run is `stopped` (exit 143 through the launcher), and the resumed run logs what an
    uninterrupted run logs, in metrics.csv and in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = ["--steps", "40", "--eval_every", "20", "--save_every", "20"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    deepspeed_train(whole, *steps)
    cmd = compare.launch_command(2, free_port(), ["--config", str(QUICKSTART), *TINY, "--run_dir", str(split), *steps])
    proc = subprocess.Popen(cmd, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    try:
        rank0, rank1 = _rank_processes(proc.pid)
        status = wait_for_running_step(split, proc, 2, time.time() + 300)
        rank1.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status is not None and status["step"] >= 2, out[-4000:]  # status.json follows the steps
    assert proc.returncode == 143, out[-4000:]
    stopped = json.loads((split / "status.json").read_text())
    assert stopped["state"] == "stopped" and stopped["signal"] == "SIGTERM" and 2 <= stopped["step"] < 40, stopped
    step = stopped["step"]
    assert (split / "checkpoints" / "latest").read_text() == f"step{step}"
    assert f"stopped after step {step} of 40 by SIGTERM, checkpoint saved" in out
    assert [r["step"] for r in read_metrics(split / "metrics.csv")] == list(range(1, step + 1))

    deepspeed_train(split, "--resume", "true", *steps)
    rows_whole, rows_split = read_metrics(whole / "metrics.csv"), read_metrics(split / "metrics.csv")
    assert [r["step"] for r in rows_whole] == list(range(1, 41))
    for key in ("step", "tokens", "train_loss", "val_loss", "lr"):
        assert [r[key] for r in rows_split] == [r[key] for r in rows_whole], key
    assert all(r["lr"] > 0 for r in rows_whole)  # the last step too
    assert json.loads((split / "status.json").read_text()) == {"state": "complete", "step": 40}
    events = EventAccumulator(str(split / "tensorboard"), purge_orphaned_data=False)
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == list(range(1, 41))
