"""``python -m megatron_patches.pretrain_gpt`` against a real Megatron-LM checkout (opt-in).

Runs only where $MEGATRON_LM_PATH points at a Megatron-LM checkout (core_v0.16.1 with
megatron-core 0.16.1 on Python 3.11, core_v0.19.0 on Python 3.12; the checkout's own megatron.core
is the one imported) whose ``megatron.training`` imports here; otherwise every test is skipped,
saying why. The ranks run on the CPU through tests/megatron_cpu_shim.py
(installed by tests/megatron_cpu_site; see its docstring for what it papers over), with
gloo and TORCHDYNAMO_DISABLE=1 (Megatron-LM warms torch.compile'd fusions up: minutes of
C++ builds on two cores). The command lines are what a user runs, plus
``--distributed-backend gloo`` and the flags that keep a CPU run off fused CUDA kernels.

Two launches of a tiny MoE GPT (2 layers, 4 experts, EP=2, alltoall dispatcher, bf16,
distributed optimizer): 3 iterations saving at 2 and 3, then a resume from iteration 2
(``--ckpt-step 2``) to 3 into another directory. Checked: Megatron-LM builds AdamPower (the
AdamPower step runs on both chained optimizers with the dense and expert p from the flags),
the GPAS gates are in the model and in the checkpoint (and trained), and the resumed run
loads iteration 2 and reproduces the uninterrupted run's iteration-3 loss and weights bit for
bit (which needs megatron_patches.checkpoint; without it the weights differ).
Two more single-rank launches check that bad flags end the parse with a clear error.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MEGATRON_CPU_ENV, launch_env, torchrun

ROOT = Path(__file__).resolve().parent.parent
DENSE_P, EXPERT_P = 1.2, 1.1

MODEL = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--num-layers", "2",
         "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32", "--max-position-embeddings", "32",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--hidden-dropout", "0",
         "--attention-dropout", "0", "--num-experts", "4", "--expert-model-parallel-size", "2",
         "--moe-token-dispatcher-type", "alltoall", "--disable-bias-linear", "--use-distributed-optimizer", "--bf16",
         "--eval-iters", "0", "--eval-interval", "1000", "--log-interval", "1"]
CPU = ["--distributed-backend", "gloo", "--transformer-impl", "local", "--no-gradient-accumulation-fusion",
       "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-persist-layer-norm", "--no-rope-fusion"]
GRADPOWER = ["--optimizer", "adampower", "--gradpower-p", str(DENSE_P), "--gradpower-p-expert", str(EXPERT_P),
             "--gpas"]


def megatron_lm_path() -> str:
    path = os.environ.get("MEGATRON_LM_PATH")
    if not path:
        pytest.skip("opt-in: set MEGATRON_LM_PATH to a Megatron-LM checkout (core_v0.16.1 or core_v0.19.0) to run "
                    "the entry point against it")
    if not (Path(path) / "pretrain_gpt.py").is_file():
        pytest.skip(f"MEGATRON_LM_PATH={path} has no pretrain_gpt.py; point it at a Megatron-LM checkout")
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "import megatron.training", path], capture_output=True, text=True, env=env(path))
    if probe.returncode != 0:
        pytest.skip(f"MEGATRON_LM_PATH={path}: megatron.training does not import here (install Megatron-LM's "
                    f"requirements): {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    return path


def env(path: str) -> dict:
    pythonpath = [MEGATRON_CPU_ENV["PYTHONPATH"], os.environ.get("PYTHONPATH", "")]
    return {**MEGATRON_CPU_ENV, "PYTHONPATH": os.pathsep.join(p for p in pythonpath if p), "MEGATRON_LM_PATH": path,
            "TORCHDYNAMO_DISABLE": "1"}


def pretrain_gpt(path, *args) -> str:
    """stdout + stderr of a 2-rank ``torchrun -m megatron_patches.pretrain_gpt`` (the test fails if it fails)."""
    proc = torchrun("-m", "megatron_patches.pretrain_gpt", *MODEL, *CPU, *GRADPOWER, *args, timeout=600,
                    env=env(path))
    return proc.stdout + proc.stderr


def losses(log: str) -> dict:
    return {int(i): loss for i, loss in re.findall(r"iteration +(\d+)/ +\d+ \|.*?lm loss: ([0-9.E+-]+)", log)}


def read_checkpoint(directory: Path) -> dict:
    """The tensors of a Megatron torch_dist checkpoint directory (model and optimizer state)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(directory))
    metadata = reader.read_metadata().state_dict_metadata
    tensors = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in metadata.items()
               if isinstance(m, TensorStorageMetadata)}
    load(tensors, storage_reader=reader, no_dist=True)
    return tensors


def check_adampower_and_gpas(log: str) -> None:
    built = re.findall(r"megatron_patches: AdamPower \(gradpower_p=([0-9.]+), gradpower_p_expert=([0-9.]+)\) on "
                       r"(\w+)", log)
    # (rank 0 logs them: python -m megatron_patches.pretrain_gpt shows megatron_patches' INFO lines there alone)
    assert built == [(str(DENSE_P), str(EXPERT_P), "DistributedOptimizer")] * 2, built  # dense, expert
    ran = re.findall(r"megatron_patches: GradPower step on (\w+): phi_p \(p=([0-9.]+), expert p=([0-9.]+)\) "
                     r"on (\d+) gradient", log)
    assert len(ran) == 2, log[-4000:]  # AdamPower's step runs on the torch optimizers that step, dense and expert
    assert all((dense, expert) == (str(DENSE_P), str(EXPERT_P)) and int(n) > 0 for _, dense, expert, n in ran), ran
    assert re.findall(r"megatron_patches: GPAS gates \(act=silu\) in (\d+) layers", log) == ["2"], log[-4000:]


def test_pretrain_gpt_adampower_gpas_save_and_resume(tmp_path):
    path = megatron_lm_path()
    first, second = tmp_path / "first", tmp_path / "second"
    log = pretrain_gpt(path, "--train-iters", "3", "--save", first, "--save-interval", "2")
    check_adampower_and_gpas(log)
    assert (first / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    saved = read_checkpoint(first / "iter_0000002")
    alpha = saved["decoder.layers.gpas_gate.alpha"]
    # one gate per layer, trained from 0: in DDP's grad buffers and the optimizer's params
    assert alpha.shape == (2, 1) and bool((alpha != 0).all()), alpha

    resumed = pretrain_gpt(path, "--train-iters", "3", "--load", first, "--ckpt-step", "2", "--save", second,
                           "--save-interval", "100")
    check_adampower_and_gpas(resumed)
    assert re.search(r"successfully loaded checkpoint from .* at iteration 2", resumed), resumed[-4000:]
    assert sorted(losses(log)) == [1, 2, 3] and sorted(losses(resumed)) == [3]
    assert losses(resumed)[3] == losses(log)[3]  # the model (gates included) came back exactly
    assert (second / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    after, uninterrupted = read_checkpoint(second / "iter_0000003"), read_checkpoint(first / "iter_0000003")
    assert sorted(after) == sorted(uninterrupted)
    weights = [k for k in uninterrupted if not k.startswith(("optimizer.", "chained_"))]
    assert "decoder.layers.gpas_gate.alpha" in weights and len(weights) > 10
    # the weights after the resumed step, bit for bit: needs megatron_patches.checkpoint's restored Adam step
    # (the distributed optimizer's buffers are not compared: their padding is uninitialised memory)
    assert [k for k in weights if not torch.equal(after[k], uninterrupted[k])] == []


def test_pretrain_gpt_muonpower(tmp_path):
    """--optimizer muonpower: Megatron-LM routes it to its Muon (no distributed optimizer, as for 'muon'), whose
    TensorParallelMuons step with phi and whose chained Adam is AdamPower with --gradpower-p-adam."""
    path = megatron_lm_path()
    model = [a for a in MODEL if a != "--use-distributed-optimizer"]
    proc = torchrun("-m", "megatron_patches.pretrain_gpt", *model, *CPU, "--optimizer", "muonpower", "--gradpower-p",
                    "0.9", "--gradpower-p-expert", "0.8", "--gradpower-p-adam", "1.1", "--train-iters", "2",
                    timeout=600, env=env(path))
    log = proc.stdout + proc.stderr
    built = ("megatron_patches: MuonPower (gradpower_p=0.9, gradpower_p_expert=0.8, gradpower_p_adam=1.1) on "
             "ChainedOptimizer (TensorParallelMuonPower, TensorParallelMuonPower, ")
    assert log.count(built) == 1, log[-4000:]  # rank 0's line
    assert "GradPower step on TensorParallelMuonPower: phi_p (p=0.9, expert p=0.8)" in log, log[-4000:]
    assert sorted(losses(log)) == [1, 2], log[-4000:]
    err = parse_error(path, "--train-iters", "1", "--optimizer", "muonpower")
    assert "muonpower needs --gradpower-p, MuonPower's p" in err, err[-4000:]


def test_pretrain_gpt_blockwise_lr():
    """--blockwise-lr with AdamPower and GPAS (distributed optimizer, bf16, EP = 2): the blocks' lr overrides and the
    fused linear_qkv's per-row lrs are built on each rank, and it trains."""
    path = megatron_lm_path()
    log = pretrain_gpt(path, "--blockwise-lr", "--train-iters", "2")
    # megatron-core groups the dense and the expert parameters apart: 2 lines on rank 0
    assert log.count("megatron_patches: blockwise lr, multipliers {'embedding': 10.0") == 2, log[-4000:]
    assert ("megatron_patches: blockwise lr: per-row lrs for 2 linear_qkv parameters on DistributedOptimizer "
            "(RowLR") in log, log[-4000:]
    assert sorted(losses(log)) == [1, 2], log[-4000:]


def parse_error(path, *args) -> str:
    """stderr of a single rank whose command line must not parse (exit status 2)."""
    single = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc = subprocess.run([sys.executable, "-m", "megatron_patches.pretrain_gpt", *MODEL, *CPU, *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=launch_env(**env(path), **single))
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.stderr


def test_pretrain_gpt_bad_flags_end_the_parse(tmp_path):
    path = megatron_lm_path()
    err = parse_error(path, "--train-iters", "1", "--optimizer", "adampower", "--gradpower-p", "0")
    assert "error: invalid --gradpower-p=0: must be a finite number > 0" in err, err[-4000:]
    config = tmp_path / "gp.json"
    config.write_text(json.dumps({"gradpower_p": 1.2, "gradpwer_p_expert": 1.1}))
    err = parse_error(path, "--train-iters", "1", "--optimizer", "adampower", "--gradpower-config", config)
    assert f"--gradpower-config {config}: unknown key(s) ['gradpwer_p_expert']" in err, err[-4000:]


HELP_CHECK = """
import argparse, sys
sys.path.insert(0, sys.argv[1])
import megatron_patches
megatron_patches.apply()
from megatron.training.arguments import add_megatron_arguments
from megatron_patches.arguments import add_arguments
parser = add_arguments(add_megatron_arguments(argparse.ArgumentParser(prog="pretrain_gpt.py")))
optimizer = next(a for a in parser._actions if "--optimizer" in a.option_strings)
ours = next(g for g in parser._action_groups if g.title.startswith("GradPower"))
formatter = parser._get_formatter()
formatter.start_section(ours.title)
formatter.add_arguments(ours._group_actions)
formatter.end_section()
print(optimizer.choices)
print(formatter.format_help())
"""


def test_our_flags_are_in_megatron_lms_parser():
    """The parser Megatron-LM's pretrain_gpt.py parses with (its add_megatron_arguments, then the provider
    megatron_patches.pretrain_gpt chains in) offers our --optimizer names and lists our flags with their help.
    (Formatted for our group alone: core_v0.19.0's own --help fails on its --moe-paged-stash-buffer-size-factor-cuda
    help text, an unescaped "10%".)"""
    path = megatron_lm_path()
    proc = subprocess.run([sys.executable, "-c", HELP_CHECK, path], capture_output=True, text=True, timeout=300,
                          env=launch_env(**env(path)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "'adam', 'sgd'" in proc.stdout and "'adampower', 'muonpower'" in proc.stdout, proc.stdout
    for flag in ("--gradpower-p P", "--gradpower-p-adam P", "--gradpower-p-expert P", "--blockwise-lr", "--gpas",
                 "--gradpower-config FILE.json"):
        assert flag in proc.stdout, (flag, proc.stdout)
    assert "MuonPower's p, applied before Muon's momentum" in " ".join(proc.stdout.split()), proc.stdout
    assert "'dist_muonpower'" in proc.stdout  # beside Megatron's dist_muon
