"""gradpower_ds.jobs.train_megatron and launch/megatron_moe.sh: flags, exact resume, the GPAS gate clip, the run
folder (status, summary, end line) and a stop by SIGTERM, two nodes on loopback.

The launched tests run the product's own commands on 2 CPU ranks (gloo); tests/megatron_cpu_site
installs the test-only CPU shim in each rank (conftest.MEGATRON_CPU_ENV) and, where asked, records
the gates' gradients as megatron DDP accumulated them.
"""

import csv
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MEGATRON_CPU_ENV, free_port, launch_env, torchrun, wait_for_running_step
from gradpower_ds.jobs.run_dir import SUMMARY_KEYS

pytest.importorskip("megatron.core", reason="megatron-core is not installed")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "megatron"
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--micro-batch-size", "4", "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-interval", "3",
        "--eval-iters", "4"]


def parse(argv):
    from gradpower_ds.jobs.train_megatron import build_parser

    return build_parser().parse_args(argv)


def parse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_flags_and_config_file_defaults():
    args = parse(["--gradpower-config", str(CONFIGS / "adampower_moe_expert_p.json"), "--gradpower-p", "1.3"])
    assert (args.optimizer, args.gradpower_p, args.gradpower_p_expert, args.gpas) == ("adampower", 1.3, 1.1, True)
    args = parse([])
    assert (args.optimizer, args.gpas, args.num_experts, args.lr_decay_style) == ("adam", False, 4, "WSD")


@pytest.mark.parametrize("argv, named", [
    (["--optimizer", "adampower", "--gradpower-p", "0"], "error: invalid --gradpower-p=0: must be a finite number > 0"),
    (["--optimizer", "adampower", "--gradpower-p-expert", "-1"], "error: invalid --gradpower-p-expert=-1: must be"),
    (["--gradpower-p", "1.3"], "--gradpower-p has no effect unless --optimizer adampower"),
    (["--gpas-variant", "post_ln"], "unrecognized arguments: --gpas-variant post_ln"),
    (["--num-experts", "3", "--expert-model-parallel-size", "2"], "--num-experts 3 must be a multiple of "
                                                                  "--expert-model-parallel-size 2"),
    (["--num-experts", "0", "--expert-model-parallel-size", "2"], "--num-experts 0 (dense) leaves nothing"),
    (["--hidden-size", "30", "--num-attention-heads", "4"], "--hidden-size 30 is not a multiple of"),
    (["--lr", "-1"], "invalid --lr=-1: must be a finite number >= 0"),
    (["--train-iters", "0"], "--train-iters must be > 0"),
    (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes must be > 0"),
    (["--ckpt-step", "3"], "--ckpt-step needs --load"),
    (["--optimizer", "muonpower"], "error: muonpower needs --gradpower-p, MuonPower's p"),
    (["--optimizer", "muon", "--use-distributed-optimizer"], "megatron-core's Muon does not support the "
                                                              "distributed optimizer"),
    (["--load", "/nonexistent/run"], "--load /nonexistent/run: no such folder"),
])
def test_bad_flags_are_refused_naming_the_flag(argv, named, capsys):
    assert named in parse_error(argv, capsys)


def test_unknown_config_key_is_named(tmp_path, capsys):
    path = tmp_path / "gp.json"
    path.write_text(json.dumps({"optimizer": "adampower", "gradpower_power": 1.2}))
    err = parse_error(["--gradpower-config", str(path)], capsys)
    assert f"--gradpower-config {path}: unknown key(s) ['gradpower_power']" in err and "gradpower_p" in err


def metrics(run_dir: Path) -> dict:
    with open(run_dir / "metrics.csv") as f:
        return {int(row["step"]): row for row in csv.DictReader(f)}


def end_line(output: str, run_dir: Path, ranks: int = 2) -> re.Match:
    """The job's one end line, of the same shape as the DeepSpeed main job's (run_dir.summary_line)."""
    return re.search(r"gradpower_ds\.jobs\.train_megatron: done \| validation loss \d+\.\d{4} \| [\d,]+ tokens in "
                     rf"[\d.]+ s = [\d,]+ tokens/s on {ranks} ranks \| {re.escape(str(run_dir))}/ \(metrics\.csv, "
                     r"loss\.png, tensorboard/\)", output)


def checkpoint_tensors(path: Path) -> dict:
    """All tensors of a dist_checkpointing (torch_dist) checkpoint, read in this process."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(flat))
    return {k: v for k, v in torch.load(flat, weights_only=False).items() if isinstance(v, torch.Tensor)}


def test_save_load_continue_is_identical(tmp_path):
    """bf16, EP=2 alltoall, distributed optimizer, AdamPower (dense and expert p), GPAS, dropout: a run resumed
    from its step-3 checkpoint logs the same losses and lr and ends with the same weights, bit for bit.
    The first run also records its gates' gradients (tests/megatron_cpu_site): clipped to GATE_GRAD_CLIP."""
    import torch

    from gradpower_ds.gpas import GATE_GRAD_CLIP

    common = ["-m", "gradpower_ds.jobs.train_megatron", *TINY, "--gradpower-config",
              str(CONFIGS / "adampower_moe_expert_p.json"), "--bf16", "--use-distributed-optimizer",
              "--expert-model-parallel-size", "2", "--hidden-dropout", "0.1", "--train-iters", "6",
              "--noise-interval", "2"]
    full, resumed, gate_grads = tmp_path / "full", tmp_path / "resumed", tmp_path / "gate_grads"
    gate_grads.mkdir()
    first = torchrun(*common, "--save", full, "--save-interval", "3", env=dict(MEGATRON_CPU_ENV,
                     GRADPOWER_TEST_GATE_GRADS=str(gate_grads)), timeout=600)
    log = first.stdout + first.stderr
    assert "megatron_patches: AdamPower (gradpower_p=1.2, gradpower_p_expert=1.1) on DistributedOptimizer" in log
    assert "4 experts top-2, EP=2 | adampower (p=1.2, expert p=1.1) | GPAS silu, distributed optimizer | bf16" in log
    assert (full / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    # the run folder, as the DeepSpeed main job keeps its own
    assert end_line(first.stdout, full), first.stdout[-3000:]
    assert json.loads((full / "status.json").read_text()) == {"state": "complete", "step": 6}
    summary = json.loads((full / "summary.json").read_text())
    assert tuple(summary) == SUMMARY_KEYS and summary["steps"] == 6 and summary["resumed_at"] == 0
    assert summary["run_dir"] == str(full) and summary["tokens"] == 6 * 2 * 4 * 64 and summary["tokens_per_s"] > 0
    assert (full / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the gate clip: each rank's local gate gradient is within +-GATE_GRAD_CLIP (as the bf16 gate rounds it), and
    # the first layer's gate sits on the bound (unclipped, this run's are 0.02 to 0.07)
    bound = torch.tensor(GATE_GRAD_CLIP, dtype=torch.bfloat16).item()
    for rank in (0, 1):
        steps = [json.loads(line) for line in (gate_grads / f"gate_grads_rank{rank}.jsonl").read_text().splitlines()]
        assert len(steps) == 6 and all(len(gates) == 2 for gates in steps)
        values = [g for gates in steps for gate in gates for g in gate]
        assert all(abs(g) <= bound for g in values), values
        assert all(abs(gates[0][0]) == bound for gates in steps), steps
    second = torchrun(*common, "--save", resumed, "--load", full, "--ckpt-step", "3", env=MEGATRON_CPU_ENV,
                      timeout=600)
    assert "resumed at iteration 3" in second.stdout + second.stderr
    assert end_line(second.stdout, resumed)
    summary = json.loads((resumed / "summary.json").read_text())
    assert (summary["steps"], summary["resumed_at"], summary["tokens"]) == (6, 3, 6 * 2 * 4 * 64)

    before, after = metrics(full), metrics(resumed)
    assert sorted(after) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("train_loss", "val_loss", "lr", "noise_scale", "snr_attention", "snr_embedding"):
            assert after[step][key] == before[step][key], (step, key, after[step], before[step])
    assert float(before[6]["train_loss"]) < float(before[1]["train_loss"])  # it trains
    # the gradient noise, measured at iterations 2, 4, 6 (the averages came back from the step-3 checkpoint)
    assert [step for step, row in before.items() if row["snr_attention"]] == [2, 4, 6]
    assert summary["noise_scale"] == json.loads((full / "summary.json").read_text())["noise_scale"]
    assert float(before[6]["lr"]) > 0 and math.isfinite(float(before[6]["val_loss"]))

    weights = {}
    for name, run in (("full", full), ("resumed", resumed)):
        tensors = checkpoint_tensors(run / "iter_0000006")
        weights[name] = {k: v for k, v in tensors.items() if not k.startswith("chained_")}  # the model's
    assert weights["full"].keys() == weights["resumed"].keys()
    assert any("local_experts" in k or "experts.experts" in k for k in weights["full"])
    gates = weights["full"]["decoder.layers.gpas_gate.alpha"]
    assert gates.shape == (2, 1) and bool((gates != 0).all())  # one gate per layer, trained away from 0
    assert len(weights["full"]) > 10
    for key, value in weights["full"].items():
        assert torch.equal(value, weights["resumed"][key]), key
    assert not torch.equal(weights["full"]["output_layer.weight"],
                           checkpoint_tensors(full / "iter_0000003")["output_layer.weight"])  # steps 4-6 changed it


@pytest.mark.skipif(importlib.util.find_spec("emerging_optimizers") is None,
                    reason="megatron-core's Muon needs emerging-optimizers (tests/run.sh installs it)")
def test_muonpower_trains_and_resumes_exactly(tmp_path):
    """--optimizer muonpower (EP=2, fp32): Megatron's Muon with phi steps (the log says so), saves its momentum
    and resumes from the step-2 checkpoint to the same losses and lr."""
    if importlib.util.find_spec("megatron.core.optimizer.muon") is None:
        pytest.skip("this megatron-core has no Muon (0.16 on)")
    common = ["-m", "gradpower_ds.jobs.train_megatron", *TINY, "--gradpower-config", str(CONFIGS / "muonpower.json"),
              "--gradpower-p-adam", "1.1", "--expert-model-parallel-size", "2", "--train-iters", "4", "--lr", "0.01"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    first = torchrun(*common, "--save", full, "--save-interval", "2", env=MEGATRON_CPU_ENV, timeout=600)
    log = first.stdout + first.stderr
    assert "| muonpower (p=0.9, Adam p=1.1) |" in log
    assert ("MuonPower (gradpower_p=0.9, gradpower_p_expert=0.9, gradpower_p_adam=1.1) on ChainedOptimizer "
            "(TensorParallelMuonPower, TensorParallelMuonPower, AdamWPower)") in log
    assert "GradPower step on TensorParallelMuonPower: phi_p (p=0.9, expert p=0.9)" in log
    torchrun(*common, "--save", resumed, "--load", full, "--ckpt-step", "2", env=MEGATRON_CPU_ENV, timeout=600)
    before, after = metrics(full), metrics(resumed)
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        for key in ("train_loss", "val_loss", "lr"):
            assert after[step][key] == before[step][key], (step, key, after[step], before[step])
    assert float(before[4]["train_loss"]) < float(before[1]["train_loss"])  # it trains


def test_blockwise_lr_trains_and_resumes_exactly(tmp_path):
    """--blockwise-lr (fp32, EP=2, distributed optimizer, Adam): the log says so, the lr column is the base lr
    (Megatron's warmup from 0), and a run resumed from its step-2 checkpoint logs the same losses and lr."""
    config = pytest.importorskip("megatron.core.optimizer.optimizer_config")
    if not hasattr(config, "ParamKey"):
        pytest.skip("blockwise lr needs megatron-core 0.16 or newer")
    common = ["-m", "gradpower_ds.jobs.train_megatron", *TINY, "--blockwise-lr", "--use-distributed-optimizer",
              "--expert-model-parallel-size", "2", "--train-iters", "4", "--lr", "0.002", "--lr-warmup-iters", "2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    first = torchrun(*common, "--save", full, "--save-interval", "2", env=MEGATRON_CPU_ENV, timeout=600)
    assert "| adam + blockwise lr |" in first.stdout + first.stderr
    torchrun(*common, "--save", resumed, "--load", full, "--ckpt-step", "2", env=MEGATRON_CPU_ENV, timeout=600)
    before, after = metrics(full), metrics(resumed)
    assert [float(before[step]["lr"]) for step in (1, 2)] == [0.0, 0.001]  # the base lr, not a block's multiple
    for step in (3, 4):
        for key in ("train_loss", "val_loss", "lr"):
            assert after[step][key] == before[step][key], (step, key, after[step], before[step])


def run_launch_script(env: dict, args: list, timeout: int = 600):
    return subprocess.Popen(["bash", str(ROOT / "launch" / "megatron_moe.sh"), *map(str, args)],
                            env=launch_env(**MEGATRON_CPU_ENV, **env), cwd=env.get("CWD", str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_launch_script_as_two_nodes_on_loopback_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    port = str(free_port())
    nodes = [run_launch_script({"NNODES": "2", "NODE_RANK": str(rank), "NPROC_PER_NODE": "1", "MASTER_PORT": port,
                                "RUN_DIR": str(run_dir), "PYTHON": sys.executable},
                               [*TINY, "--train-iters", "4"]) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-6000:]
    log = "".join(outputs)
    assert "2 ranks (DP=2), 4 experts top-2, EP=2 | adampower (p=1.2) | GPAS silu, distributed optimizer | bf16" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"], summary["optimizer"], summary["gpas"]) == \
        (2, 4, "adampower", True)
    assert math.isfinite(summary["val_loss"])
    # the same command again, now on one node with 2 ranks and more steps: it resumes from RUN_DIR
    node = run_launch_script({"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port()), "RUN_DIR": str(run_dir),
                              "PYTHON": sys.executable}, [*TINY, "--train-iters", "6"])
    output = node.communicate(timeout=600)[0]
    assert node.returncode == 0, output[-6000:]
    assert "resumed at iteration 4" in output
    assert json.loads((run_dir / "summary.json").read_text())["resumed_at"] == 4
    assert sorted(metrics(run_dir)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_sigterm_stops_all_ranks_after_a_saved_step(tmp_path):
    """SIGTERM to rank 1 only, while status.json counts the steps: both ranks finish the same step, save its
    checkpoint and mark the run stopped (rank 1 exits 143), as the DeepSpeed main job does."""
    import psutil

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "gradpower_ds.jobs.train_megatron", *TINY, "--gpas",
           "--train-iters", "40", "--eval-interval", "20", "--save", str(run_dir), "--save-interval", "20"]
    proc = subprocess.Popen(cmd, env=launch_env(**MEGATRON_CPU_ENV), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline, ranks = time.time() + 300, []
        while time.time() < deadline and proc.poll() is None and len(ranks) < 2:
            ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "LOCAL_RANK" in p.environ()]
            time.sleep(0.05)
        status = wait_for_running_step(run_dir, proc, 2, deadline)
        rank1 = next(p for p in ranks if p.environ()["LOCAL_RANK"] == "1")
        rank1.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status is not None and status["step"] >= 2, out[-4000:]  # status.json follows the steps
    assert "exitcode  : 143" in out, out[-4000:]  # torchrun reports rank 1's exit status (and exits 1 itself)
    stopped = json.loads((run_dir / "status.json").read_text())
    assert stopped["state"] == "stopped" and stopped["signal"] == "SIGTERM" and 2 <= stopped["step"] < 40, stopped
    step = stopped["step"]
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == str(step)
    assert f"stopped after iteration {step} of 40 by SIGTERM, checkpoint saved; continue with --load {run_dir}" in out
    assert sorted(metrics(run_dir)) == list(range(1, step + 1)) and not (run_dir / "summary.json").exists()


@pytest.mark.parametrize("env, named", [({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK must be in 0..1"),
                                        ({"NNODES": "x"}, "NNODES must be a positive integer"),
                                        ({"GRADPOWER_CONFIG": "/nope.json"}, "GRADPOWER_CONFIG not found")])
def test_launch_script_refuses_bad_settings(env, named):
    result = subprocess.run(["bash", str(ROOT / "launch" / "megatron_moe.sh")], capture_output=True, text=True,
                            env=dict(os.environ, NPROC_PER_NODE="1", **env), timeout=60)
    assert result.returncode == 2 and named in result.stderr, result.stderr


def test_without_cuda_it_says_so_before_starting(tmp_path):
    """On this CPU-only torch, without the tests' shim, megatron-core cannot run: a clear exit, not a traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("GRADPOWER_MEGATRON_CPU_SHIM", None)
    result = subprocess.run([sys.executable, "-m", "gradpower_ds.jobs.train_megatron", "--train-iters", "1",
                             "--lr-warmup-iters", "0"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and "megatron-core needs CUDA" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
