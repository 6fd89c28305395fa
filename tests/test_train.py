"""The main job (gradpower_ds.jobs.train), its settings, schedules, metrics, and the compare tool.

Launched runs use a tiny model on the embedded stdlib corpus with 2 ranks under the
deepspeed launcher (experts sharded over both); they are `slow`.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, launch_env, run_launched
from gradpower_ds.jobs import compare
from gradpower_ds.jobs.metrics import MetricsLog, plot_curves, read_metrics
from gradpower_ds.jobs.precision import resolve_precision
from gradpower_ds.jobs.run_dir import SUMMARY_KEYS
from gradpower_ds.jobs.schedules import lr_multiplier
from gradpower_ds.jobs.train_config import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.json"
TINY = ["--dim", "32", "--n_layers", "2", "--n_heads", "2", "--ffn_dim", "64", "--seq_len", "32", "--micro_batch", "2",
        "--steps", "8", "--warmup_steps", "2", "--eval_every", "4", "--eval_batches", "4", "--log_every", "1",
        "--save_every", "4", "--progress", "false", "--tensorboard", "true"]


def deepspeed_train(run_dir, *args, nproc=2, check=True):
    """Runs gradpower_ds.jobs.train under the deepspeed launcher; returns the CompletedProcess."""
    cmd = compare.launch_command(nproc, free_port(), ["--config", str(QUICKSTART), *TINY, "--run_dir", str(run_dir),
                                                      *map(str, args)])
    proc = run_launched(cmd, 600, env=launch_env(), cwd=ROOT)
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


# ---- settings ---------------------------------------------------------------------------------------------------

def test_config_file_and_flags(tmp_path):
    cfg = load_config(["--config", str(QUICKSTART), "--steps", "50", "--gpas", "true", "--betas", "0.8", "0.9",
                       "--expert_power", "1.1"])
    assert cfg.steps == 50 and cfg.gpas is True and cfg.betas == (0.8, 0.9) and cfg.expert_power == 1.1
    assert cfg.optimizer == "adampower" and cfg.power == 1.2 and cfg.schedule == "wsd"
    ds = cfg.deepspeed_config()
    assert ds["optimizer"] == {"type": "AdamPower", "params": {"lr": 0.003, "betas": [0.8, 0.9], "eps": 1e-8,
                                                               "weight_decay": 0.1, "power": 1.2, "expert_power": 1.1}}
    assert cfg.precision == "auto"  # quickstart.json: bf16 where this machine computes it natively, else fp32
    assert ds["zero_optimization"] == {"stage": 2} and not ds["fp16"]["enabled"]
    assert ds["bf16"]["enabled"] is (cfg.effective_precision == "bf16")
    assert load_config(["--config", str(QUICKSTART), "--precision", "bf16"]).deepspeed_config()["bf16"]["enabled"]
    adamw = TrainConfig(optimizer="adamw", offload_optimizer=True, deepspeed_overrides={"zero_optimization":
                                                                                         {"stage": 1}})
    ds = adamw.deepspeed_config()
    assert ds["optimizer"]["type"] == "AdamW" and "power" not in ds["optimizer"]["params"]
    assert ds["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu"}}


@pytest.mark.parametrize("values, message", [
    ({"optimizer": "lion"}, r"optimizer='lion' is unknown; choose one of \['adampower', 'adamw', 'muon', 'muonpower'\]"),
    ({"power": 0}, r"invalid power=0: must be a finite number > 0"),
    ({"schedule": "linear"}, r"schedule='linear' is unknown"),
    ({"steps": 0}, r"steps=0 must be > 0"),
    ({"stop_at": 500}, r"stop_at=500 must be in \[0, steps=300\]"),
    ({"zero_stage": 3}, r"needs zero_stage 1 or 2"),
    ({"top_k": 5}, r"top_k=5 must be in \[1, num_experts=4\]"),
])
def test_bad_settings_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


def test_unknown_key_in_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"steps": 10, "learning_rate": 1e-3}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]; accepted keys are .*'lr'"):
        load_config(["--config", str(path)])


def test_expert_placement():
    cfg = TrainConfig(num_experts=4)
    assert [cfg.expert_parallel_size(w) for w in (1, 2, 3, 4, 8)] == [1, 2, 1, 4, 4]
    assert TrainConfig(num_experts=0).expert_parallel_size(8) == 1
    with pytest.raises(ValueError, match=r"ep_size=4 cannot be placed: .*world size \(2 ranks\)"):
        TrainConfig(num_experts=4, ep_size=4).expert_parallel_size(2)
    with pytest.raises(ValueError, match=r"ep_size=3 cannot be placed"):
        TrainConfig(num_experts=4, ep_size=3).expert_parallel_size(3)


def test_schedules():
    wsd = [lr_multiplier(s, "wsd", 100, 10, decay_fraction=0.2, min_ratio=0.1) for s in range(100)]
    assert wsd[0] == pytest.approx(0.1) and wsd[9] == 1.0
    # the decay reaches min_ratio one step after the last, so the last step still trains (issue 20)
    assert all(v == 1.0 for v in wsd[10:80]) and wsd[99] == pytest.approx(0.1 + 0.9 / 21)
    assert all(a > b for a, b in zip(wsd[80:], wsd[81:]))
    cos = [lr_multiplier(s, "cosine", 100, 10, min_ratio=0.0) for s in range(100)]
    assert cos[9] == 1.0 and cos[54] == pytest.approx(0.5, abs=0.02) and 0 < cos[99] < 1e-3
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))
    assert lr_multiplier(50, "constant", 100, 10) == 1.0


# ---- metrics and the compare tool's aggregation ----------------------------------------------------------------------

def test_metrics_log_resume_drops_later_rows_and_plot(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 7):
        log.log(step=step, tokens=10 * step, train_loss=1.0 / step, val_loss=0.5 if step % 3 == 0 else None, lr=1e-3)
    log.close()
    MetricsLog(tmp_path, resume_step=3, tensorboard=False).close()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["val_loss"] == 0.5 and rows[0]["val_loss"] is None
    assert rows[1]["tokens"] == 20 and rows[1]["train_loss"] == 0.5
    plot_curves({"a": rows}, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_aggregates_seeds(tmp_path):
    runs = {}
    for label, losses in (("adamw", [3.0, 3.2]), ("adampower-p1.2", [2.9, 2.95])):
        runs[label] = []
        for seed, loss in enumerate(losses):
            run_dir = tmp_path / label / f"seed{seed}"
            log = MetricsLog(run_dir.mkdir(parents=True) or run_dir, tensorboard=False)
            log.log(step=5, tokens=50, train_loss=loss + 1, val_loss=loss + 1)
            log.log(step=10, tokens=100, train_loss=loss, val_loss=loss)
            log.close()
            (run_dir / "summary.json").write_text(json.dumps({"val_loss": loss, "tokens_per_s": 100.0 + seed,
                                                              "tokens": 100}))
            runs[label].append(run_dir)
    table, curves = compare.aggregate(runs)
    assert table["adamw"]["val_loss_mean"] == pytest.approx(3.1)
    assert table["adamw"]["val_loss_std"] == pytest.approx(math.sqrt(0.02))
    assert table["adampower-p1.2"]["tokens_per_s"] == pytest.approx(100.5)
    assert [r["step"] for r in curves["adamw"]] == [5, 10] and curves["adamw"][0]["val_loss"] == pytest.approx(4.1)
    text = compare.format_table(table, "adamw")
    assert "-0.1750" in text and "3.1000 ± 0.1414 (n=2)" in text


def test_compare_variants():
    assert compare.parse_variant("adampower:1.4") == ("adampower", 1.4)
    assert compare.parse_variant("adampower") == ("adampower", 1.2)
    assert compare.parse_variant("adamw") == ("adamw", None)
    assert compare.variant_label("adampower", 1.4, True) == "adampower-p1.4-gpas"
    assert compare.variant_label("adamw", None, False, True) == "adamw-bw"
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        compare.parse_variant("sgd")
    with pytest.raises(ValueError, match="only adampower and muonpower take a power"):
        compare.parse_variant("adamw:1.2")
    assert compare.parse_variant("muonpower:0.9") == ("muonpower", 0.9)
    assert compare.parse_variant("muon") == ("muon", None)
    with pytest.raises(ValueError, match=r"'muonpower': muonpower needs power, MuonPower's p"):
        compare.parse_variant("muonpower")
    with pytest.raises(ValueError, match=r"'muonpower:0': invalid power=0: must be .* \(1.0 is plain Muon\)"):
        compare.parse_variant("muonpower:0")


# ---- launched runs ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_resume_continues_the_curve_exactly(tmp_path):
    """2 ranks, experts sharded, blockwise lrs: an uninterrupted run and one stopped at step 4 and resumed log the
    same curve, the gradient noise included (measured at steps 3 and 6: its averages come back from the
    checkpoint); the lr column is the schedule's base lr. (The SIGTERM test in test_train_resume.py resumes a run
    without blockwise lrs.)"""
    whole = tmp_path / "whole"
    proc = deepspeed_train(whole, "--noise_every", "3", "--blockwise_lr", "true")
    assert "gradpower_ds.jobs.train: done | validation loss" in proc.stdout + proc.stderr
    precision, why = resolve_precision("auto")  # quickstart.json's: what this machine computes fast
    assert f"gradpower_ds.jobs.train: precision {precision} ({why})" in proc.stdout + proc.stderr
    assert f"2 ranks, ZeRO-2, {precision}, adampower p=1.2 + blockwise lr | CPUAdamPower" in proc.stdout + proc.stderr
    assert re.search(r"gradpower_ds\.jobs\.train: done \| validation loss \d+\.\d{4} \| [\d,]+ tokens in [\d.]+ s = "
                     rf"[\d,]+ tokens/s on 2 ranks \| {re.escape(str(whole))}/ \(metrics\.csv, loss\.png, "
                     r"tensorboard/\) \| gradient noise scale B_simple [\d,]+ tokens", proc.stdout)
    split = tmp_path / "split"
    deepspeed_train(split, "--stop_at", "4", "--noise_every", "3", "--blockwise_lr", "true")
    assert json.loads((split / "status.json").read_text()) == {"state": "stopped", "step": 4}
    assert not (split / "summary.json").exists()
    deepspeed_train(split, "--resume", "true", "--noise_every", "3", "--blockwise_lr", "true")
    rows_whole, rows_split = read_metrics(whole / "metrics.csv"), read_metrics(split / "metrics.csv")
    assert [r["step"] for r in rows_whole] == list(range(1, 9))
    cfg = load_config(["--config", str(QUICKSTART), *TINY])
    schedule = [lr_multiplier(step, cfg.schedule, cfg.steps, cfg.warmup_steps, cfg.decay_fraction, cfg.min_lr_ratio)
                for step in range(cfg.steps)]
    assert [r["lr"] for r in rows_whole] == pytest.approx([cfg.lr * m for m in schedule])  # not a block's multiple
    for key in ("step", "tokens", "train_loss", "val_loss", "lr", "noise_scale", "snr_attention", "snr_embedding"):
        assert [r[key] for r in rows_split] == [r[key] for r in rows_whole], key
    measured = [r for r in rows_whole if r["snr_attention"] is not None]
    assert [r["step"] for r in measured] == [3, 6] and all(r["snr_output"] > 0 for r in measured)
    assert rows_whole[0]["train_loss"] > rows_whole[-1]["train_loss"]
    assert [r["step"] for r in rows_whole if r["val_loss"] is not None] == [4, 8]
    for run in (whole, split):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["val_loss"] == rows_whole[-1]["val_loss"] and summary["world_size"] == 2
        assert tuple(summary) == SUMMARY_KEYS and summary["steps"] == 8  # the same keys as the Megatron job's
        assert summary["resumed_at"] == (4 if run == split else 0)
        assert summary["noise_scale"] == json.loads((whole / "summary.json").read_text())["noise_scale"] > 0
        assert json.loads((run / "status.json").read_text())["state"] == "complete"
        assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        assert (run / "checkpoints" / "latest").read_text() == "step8"


@pytest.mark.slow
def test_train_muon_power(tmp_path):
    """The main job with MuonPower on 2 ranks (experts sharded; the expert matrices are Muon's too), stopped at step
    4 and resumed: the same curve as an uninterrupted run."""
    flags = ["--optimizer", "muonpower", "--power", "0.9", "--grad_clip", "0"]
    whole = tmp_path / "whole"
    out = deepspeed_train(whole, *flags)
    log = out.stdout + out.stderr
    assert re.search(r"gradpower_ds: MuonPower built \(power 0\.9 on \d+ Muon matrices; auxiliary CPUAdamPower, "
                     r"adam_power 1\.2\)", log)
    assert "muonpower p=0.9 adam p=1.2 | MuonPower" in log
    split = tmp_path / "split"
    deepspeed_train(split, *flags, "--stop_at", "4")
    deepspeed_train(split, *flags, "--resume", "true")
    rows_whole, rows_split = read_metrics(whole / "metrics.csv"), read_metrics(split / "metrics.csv")
    for key in ("step", "train_loss", "val_loss", "lr"):
        assert [r[key] for r in rows_split] == [r[key] for r in rows_whole], key
    assert rows_whole[0]["train_loss"] > rows_whole[-1]["train_loss"]
    assert json.loads((whole / "summary.json").read_text())["optimizer"] == "muonpower"


@pytest.mark.slow
def test_train_refuses_bad_runs_without_leaving_a_run_dir(tmp_path):
    """Experts that cannot be placed, a missing data path, an existing run without --resume: clear errors."""
    run_dir = tmp_path / "r"
    proc = deepspeed_train(run_dir, "--ep_size", "4", check=False)
    assert proc.returncode != 0 and "ep_size=4 cannot be placed" in proc.stderr and not run_dir.exists()
    proc = deepspeed_train(run_dir, "--data", tmp_path / "missing.txt", check=False)
    assert proc.returncode != 0 and "data path not found" in proc.stderr and not run_dir.exists()
    proc = subprocess.run([sys.executable, "-m", "gradpower_ds", "train", "--optimizer", "lion"], env=launch_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "optimizer='lion' is unknown" in proc.stderr
    run_dir.mkdir()
    (run_dir / "status.json").write_text(json.dumps({"state": "complete"}))
    proc = deepspeed_train(run_dir, nproc=1, check=False)
    assert proc.returncode != 0 and "already holds a run (state: complete); pass --resume true" in proc.stderr


@pytest.mark.slow
def test_quickstart_script_and_compare(tmp_path):
    """launch/quickstart.sh end to end at a tiny size, then the compare tool over 2 variants x 2 seeds."""
    env = launch_env(NUM_GPUS="2", MASTER_PORT=str(free_port()))
    env.pop("OMP_NUM_THREADS")
    proc = subprocess.run(["bash", str(ROOT / "launch" / "quickstart.sh"), *TINY, "--run_dir", str(tmp_path / "q")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "gradpower_ds.jobs.train: done | validation loss" in proc.stdout
    out = tmp_path / "compare"
    args = ["--optimizers", "adamw", "adampower:1.2", "--seeds", "0", "1", "--nproc", "1", "--out", str(out),
            "--master_port", str(free_port()), "--", "--config", str(QUICKSTART), *TINY, "--num_experts", "2"]
    proc = subprocess.run([sys.executable, "-m", "gradpower_ds", "compare", *args], env=launch_env(),
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    table = json.loads((out / "compare.json").read_text())
    assert set(table) == {"adamw", "adampower-p1.2"} and all(row["seeds"] == 2 for row in table.values())
    for label in table:
        losses = [json.loads((out / label / f"seed{s}" / "summary.json").read_text())["val_loss"] for s in (0, 1)]
        assert table[label]["val_losses"] == losses and losses[0] != losses[1]  # the seeds differ
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "adampower-p1.2" in proc.stdout and "± " in proc.stdout
    rerun = subprocess.run([sys.executable, "-m", "gradpower_ds", "compare", *args], env=launch_env(),
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert rerun.returncode == 0 and rerun.stdout.count("already complete, reused") == 4


def test_deepspeed_moe_model_has_distinct_experts():
    """DeepSpeed copies one expert into all; the model re-initialises each from its own seed (1 rank here)."""
    code = """
import os, torch, deepspeed
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="%d")
deepspeed.init_distributed(dist_backend="gloo")
from gradpower_ds.jobs.model import CausalLM, ModelConfig
torch.manual_seed(3)
model = CausalLM(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, ffn_dim=32, num_experts=4, top_k=2))
experts = model.layers[0].mlp.moe.deepspeed_moe.experts.deepspeed_experts
weights = [e.gate.weight for e in experts]
assert all(not torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1:])
torch.manual_seed(3 + 1 + 2)
reference = torch.nn.Linear(16, 32, bias=False)
assert torch.equal(experts[2].gate.weight, reference.weight)
tokens = torch.randint(0, 64, (2, 8))
_, loss = model(tokens, tokens)
assert torch.isfinite(loss) and model.aux_loss() > 0
print("ok")
""" % free_port()
    proc = subprocess.run([sys.executable, "-c", code], env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]
