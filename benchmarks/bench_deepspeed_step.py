"""A DeepSpeed training step: ``"type": "AdamPower"`` (power 1.2) against DeepSpeed's ``"type": "AdamW"`` (and, on
request, ``"MuonPower"`` against DeepSpeed's ``"Muon"``).

In ONE run, on the same model (gradpower_ds.jobs.model.CausalLM, dense, ~34M
parameters by default), the same data and the same DeepSpeed config except the optimizer
type, it times these settings (on the CPU, or on CUDA GPUs when there are any):
  zero2          ZeRO-2: on the CPU ours builds gradpower_ds.CPUAdamPower and
                 DeepSpeed's AdamW its FusedAdam CPU op; on a GPU ours builds
                 AdamPower (fused=None: the Triton kernel once it has passed its
                 check on that GPU, gradpower_ds.kernel_gate) and theirs DeepSpeed's
                 FusedAdam (torch's AdamW where DeepSpeed cannot build it, said in
                 the output); ours folds ZeRO's unscale/clip pass into its step
  zero2-fused    GPU only: ours with "fused": true (the Triton kernel)
  zero2-offload  ZeRO-2 + "offload_optimizer": {"device": "cpu"}: ours builds
                 CPUAdamPower, DeepSpeed's AdamW builds DeepSpeedCPUAdam
  zero2-muon     only when named: MuonPower (power 0.9, adam_power 1.2) against DeepSpeed's
                 Muon, ZeRO-2 (Muon's update runs at the gradient-accumulation boundary of
                 the backward there, so the train step is the figure, not optimizer.step)
Both engines of a setting live side by side and take turns, one training step
each, in ABBA order (ours, theirs, theirs, ours, ...), so machine noise hits
both alike. After --warmup steps each (optimizer state creation included),
every step is timed on every rank, after a barrier:
  train step       forward + backward of each micro-batch + engine.step() at the
                   gradient-accumulation boundary (what a user waits for)
  engine.step      the boundary engine.step() alone: grad norm, clipping, the
                   optimizer, the fp32 -> bf16 copy, the all-gather
  optimizer.step   the basic optimizer's step() alone (our kernel vs theirs),
                   timed by wrapping it on the engine (summed when ZeRO steps each
                   param group by itself)
A step's time is its slowest rank's; reported are medians over --steps steps and
ours/theirs per setting: ``RATIO <setting> <value>`` for the training step (the
figure users wait for, target <= 1.02), ``RATIO_ENGINE_STEP <setting> <value>`` for the boundary engine.step()
(target <= 1.02) and ``RATIO_OPTIMIZER_STEP <setting> <value>`` for the optimizer step alone (target <= 1.05).

The default shape (1 x 64 tokens per rank and step) keeps forward/backward short, so
the optimizer is as large a share of the step as ZeRO-2 on the CPU allows; even so it
is only a few per cent (gloo reduce-scatter / all-gather, gradient flattening and dtype
copies dominate, and they cost per parameter too), so RATIO_OPTIMIZER_STEP is the more
sensitive figure. The default run takes about 2 minutes on 2 cores.

    python benchmarks/bench_deepspeed_step.py                     # 2 ranks x 1 thread, ~34M params
    python benchmarks/bench_deepspeed_step.py --world-size 1 --threads 2 --steps 20
    python benchmarks/bench_deepspeed_step.py --dim 768 --layers 12 --seq 128 --settings zero2-offload
    python benchmarks/bench_deepspeed_step.py --world-size 1 --steps 20    # on one GPU (nccl)

It re-launches itself on --world-size ranks with torch.distributed.run (gloo,
OMP_NUM_THREADS=--threads per rank); rank 0 prints the results.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version

ADAM, MUON = ("AdamPower", "AdamW"), ("MuonPower", "Muon")  # (ours, theirs): DeepSpeed "type"s
SETTINGS = {"zero2": ({}, ADAM), "zero2-fused": ({"fused": True}, ADAM), "zero2-offload": ({"offload": True}, ADAM),
            "zero2-muon": ({}, MUON)}  # name -> (options, optimizer pair)
GPU_ONLY = ("zero2-fused",)
ON_REQUEST = ("zero2-muon",)  # not in the default run
OPTIMIZER_PARAMS = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
POWER = 1.2
MUON_PARAMS = {"muon_lr": 0.02, "momentum": 0.95}
MUON_POWER = 0.9
METRICS = ("train", "engine_step", "optimizer_step")
METRIC_NAMES = {"train": "train step", "engine_step": "engine.step", "optimizer_step": "optimizer.step"}


def parse_args() -> argparse.Namespace:
    """The command line (the same flags reach the ranks, plus the hidden --worker)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2, help="ranks (processes), default 2")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP/torch threads per rank, default 1")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS),
                        help="default: zero2 and zero2-offload on the CPU, and zero2-fused on GPUs; zero2-muon when named")
    parser.add_argument("--dim", type=int, default=512, help="model width (FFN 11/4 x, 64-dim heads)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per rank and micro-step")
    parser.add_argument("--gas", type=int, default=1, help="gradient accumulation steps per training step")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps per optimizer")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per optimizer")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto (default): bf16 on GPUs and CPUs with native bf16, else fp32 "
                             "(gradpower_ds.jobs.precision)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def machine_facts() -> list[str]:
    """CPU, cores, kernel ISA and library versions, one fact per line."""
    from gradpower_ds.ops import resolve_isa

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    import torch

    gpu = [f"gpu: {torch.cuda.get_device_name()} x {torch.cuda.device_count()}"] if torch.cuda.is_available() else []
    return gpu + [
        f"cpu: {model}; {os.cpu_count()} logical CPUs, {len(os.sched_getaffinity(0))} usable",
        f"CPUAdamPower kernel ISA: {resolve_isa()}",
        f"python {platform.python_version()}, torch {version('torch')}, deepspeed {version('deepspeed')}",
    ]


def launch(args: argparse.Namespace) -> int:
    """Prints the machine facts, then runs this script's worker on --world-size ranks; returns its exit code."""
    for fact in machine_facts():
        print(fact)
    from gradpower_ds.jobs.precision import resolve_precision

    precision, why = resolve_precision(args.precision)
    print(f"ranks: {args.world_size} x {args.threads} thread(s); {precision} ({why}); micro-batch {args.micro_batch} "
          f"x {args.seq} tokens, gas {args.gas}; {args.warmup} warmup + {args.steps} timed steps per optimizer",
          flush=True)
    from gradpower_ds.jobs.processes import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.world_size),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), os.path.abspath(__file__), "--worker",
           *sys.argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    return subprocess.run(cmd, env=env, check=False).returncode


def make_model(args: argparse.Namespace):
    """The benchmark's CausalLM, identical on every rank and for both optimizers (seeded)."""
    import torch

    from gradpower_ds.jobs.model import CausalLM, ModelConfig

    torch.manual_seed(0)
    return CausalLM(ModelConfig(n_layers=args.layers, dim=args.dim, n_heads=max(1, args.dim // 64),
                                ffn_dim=11 * args.dim // 4, num_experts=0, vocab_size=args.vocab,
                                max_seq_len=args.seq))


def ds_config(args: argparse.Namespace, opt_type: str, offload: bool = False, fused: bool = False,
              torch_adam: bool = False) -> dict:
    """The DeepSpeed config of a setting; the two optimizers' configs differ only in the optimizer entry."""
    from gradpower_ds.jobs.precision import resolve_precision

    zero = {"stage": 2}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if opt_type == "AdamPower":
        params = dict(OPTIMIZER_PARAMS, power=POWER, **({"fused": True} if fused else {}))
    elif opt_type == "MuonPower":
        params = dict(OPTIMIZER_PARAMS, **MUON_PARAMS, power=MUON_POWER, adam_power=POWER)
    elif opt_type == "Muon":
        params = dict(OPTIMIZER_PARAMS, **MUON_PARAMS)
    else:
        params = dict(OPTIMIZER_PARAMS, **({"torch_adam": True} if torch_adam else {}))
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.gas,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": resolve_precision(args.precision)[0] == "bf16"},
        "optimizer": {"type": opt_type, "params": params},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }


def _sync() -> None:
    """Waits for queued GPU work, so a wall-clock interval covers it (nothing to wait for on the CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_engine(args: argparse.Namespace, opt_type: str, options: dict):
    """A DeepSpeed engine whose basic optimizer's step() appends its duration (s) to ``engine.optimizer_times``.

    On a GPU where DeepSpeed cannot build its FusedAdam (no CUDA compiler), theirs falls back to
    ``"torch_adam": true`` and says so.
    """
    import deepspeed
    import torch

    model = make_model(args)
    try:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds_config(args, opt_type, **options))
    except Exception as exc:
        if opt_type != "AdamW" or not torch.cuda.is_available():
            raise
        print(f"DeepSpeed's FusedAdam is not available here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
              "theirs is torch's AdamW (\"torch_adam\": true)", flush=True)
        model = make_model(args)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds_config(args, opt_type, torch_adam=True, **options))
    optimizer = engine.basic_optimizer
    inner_step, times = optimizer.step, []

    def timed_step(*a, **kw):
        _sync()
        t0 = time.perf_counter()
        out = inner_step(*a, **kw)
        _sync()
        times.append(time.perf_counter() - t0)
        return out

    optimizer.step = timed_step
    engine.optimizer_times = times
    return engine


def training_step(engine, batches) -> dict[str, float]:
    """One training step over `batches` (one per micro-step); returns its times (s) by metric."""
    import torch.distributed as dist

    dist.barrier()
    _sync()
    times = engine.optimizer_times
    n_before = len(times)
    t0 = time.perf_counter()
    for tokens in batches[:-1]:
        engine.backward(engine(tokens, tokens)[1])
        engine.step()
    engine.backward(engine(batches[-1], batches[-1])[1])
    _sync()
    t1 = time.perf_counter()
    engine.step()
    _sync()
    t2 = time.perf_counter()
    if len(times) == n_before:
        raise RuntimeError("expected the optimizer to step in every training step; it did not")
    # ZeRO-1/2 call step() once per param group (Muon's two halves: twice)
    return {"train": t2 - t0, "engine_step": t2 - t1, "optimizer_step": sum(times[n_before:])}


def measure_setting(args: argparse.Namespace, options: dict, pair: tuple[str, str],
                    data) -> dict[str, dict[str, list[float]]]:
    """Times both optimizers' (ours, theirs = `pair`) training steps in ABBA turns; returns {optimizer type (class):
    {metric: [s per step]}}."""
    ours, theirs = pair
    engines = {name: build_engine(args, name, options if name == ours else
                                  {k: v for k, v in options.items() if k != "fused"}) for name in pair}
    kinds = {name: type(engine.basic_optimizer).__name__ for name, engine in engines.items()}
    times = {name: {metric: [] for metric in METRICS} for name in engines}
    for step in range(args.warmup + args.steps):
        order = (ours, theirs) if step % 2 == 0 else (theirs, ours)
        for name in order:
            sample = training_step(engines[name], data[step])
            if step >= args.warmup:
                for metric, seconds in sample.items():
                    times[name][metric].append(seconds)
    del engines
    gc.collect()
    return {f"{name} ({kinds[name]})": t for name, t in times.items()}


def slowest_rank(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, list[float]]]:
    """Per step and metric, the slowest rank's time (collective: every rank must call it)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, times)
    return {name: {metric: [max(values) for values in zip(*(g[name][metric] for g in gathered))]
                   for metric in per_metric} for name, per_metric in times.items()}


def report(setting: str, times: dict[str, dict[str, list[float]]]) -> None:
    """Prints a setting's median times (ms) and its RATIO / RATIO_ENGINE_STEP / RATIO_OPTIMIZER_STEP lines (ours /
    theirs)."""
    medians = {name: {metric: statistics.median(values) for metric, values in per_metric.items()}
               for name, per_metric in times.items()}
    ours_type, theirs_type = SETTINGS[setting][1]
    ours = next(name for name in medians if name.split(" ")[0] == ours_type)
    theirs = next(name for name in medians if name.split(" ")[0] == theirs_type)
    print(f"\n{setting}: median ms over {len(times[ours]['train'])} steps (min in brackets)")
    print(f"  {'optimizer':<28}" + "".join(f"{METRIC_NAMES[m]:>22}" for m in METRICS))
    for name in (theirs, ours):
        cells = [f"{medians[name][m] * 1e3:10.2f} [{min(times[name][m]) * 1e3:8.2f}]" for m in METRICS]
        print(f"  {name:<28}" + "".join(f"{c:>22}" for c in cells))
    ratio = medians[ours]["train"] / medians[theirs]["train"]
    paired = statistics.median(a / b for a, b in zip(times[ours]["train"], times[theirs]["train"]))
    print(f"  ours/theirs: train step {ratio:.3f} (median of per-step pairs {paired:.3f}), engine.step "
          f"{medians[ours]['engine_step'] / medians[theirs]['engine_step']:.3f}, target <= 1.02: "
          f"{'met' if ratio <= 1.02 else 'NOT met'}")
    print(f"RATIO {setting} {ratio:.4f}")
    print(f"RATIO_ENGINE_STEP {setting} {medians[ours]['engine_step'] / medians[theirs]['engine_step']:.4f}")
    print(f"RATIO_OPTIMIZER_STEP {setting} "
          f"{medians[ours]['optimizer_step'] / medians[theirs]['optimizer_step']:.4f}", flush=True)


def worker(args: argparse.Namespace) -> None:
    """One rank: builds and times the engines of every setting; rank 0 prints the report."""
    import logging
    import warnings

    import deepspeed
    import torch
    import torch.distributed as dist

    from gradpower_ds.deepspeed import register

    deepspeed.utils.logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")  # DeepSpeed's own call
    register()
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    rank = dist.get_rank()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(rank)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    data = [[torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=gen).to(device)
             for _ in range(args.gas)] for _ in range(args.warmup + args.steps)]
    settings = args.settings or [s for s in SETTINGS if (on_gpu or s not in GPU_ONLY) and s not in ON_REQUEST]
    refused = [s for s in settings if s in GPU_ONLY and not on_gpu]
    if refused:
        raise SystemExit(f"settings {refused} need a GPU")
    if rank == 0:
        n_params = sum(p.numel() for p in make_model(args).parameters())
        print(f"model: CausalLM dim {args.dim}, {args.layers} layers, vocab {args.vocab}: {n_params / 1e6:.1f}M "
              f"parameters ({n_params / args.world_size / 1e6:.1f}M fp32 master elements per rank)", flush=True)
    for setting in settings:
        t0 = time.perf_counter()
        times = slowest_rank(measure_setting(args, *SETTINGS[setting], data))
        if rank == 0:
            report(setting, times)
            print(f"  ({time.perf_counter() - t0:.0f} s for this setting)", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
    else:
        sys.exit(launch(args))


if __name__ == "__main__":
    from gradpower_ds.jobs.processes import exit_when_done
    exit_when_done(main)
