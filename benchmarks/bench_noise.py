"""What measuring the gradient noise costs the main job: a step with the NoiseProbe sampling against one without.

In ONE run, on the main job's own engine (``gradpower_ds.jobs.train.build_engine``: the model, DeepSpeed config
and optimizer of ``--config``, default configs/quickstart.json, in fp32) and data, it trains --steps steps in
ABBA order (measured, plain, plain, measured, ...), so machine noise hits both alike. A measured step is
what the job does every ``noise_every`` steps: the tensor hooks copy each micro-batch's sampled gradient
coordinates, and ``end_step`` all-gathers them and computes B_simple and the SNRs. Each step is timed on every
rank after a barrier (its slowest rank's time counts). Printed: the medians and

    RATIO measured/plain <r>              one measured step against one plain step
    COST_AT_NOISE_EVERY <n> <percent>%    what that adds to the job's time at noise_every = n: (r - 1) / n

    python benchmarks/bench_noise.py                       # 2 ranks x 1 thread, quickstart model, ~1 minute
    python benchmarks/bench_noise.py --grad_accum 4 --steps 40

It re-launches itself on --world-size ranks with torch.distributed.run (gloo, one thread per rank).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.json"))
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40, help="timed steps (half measured), after --warmup")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--noise-every", type=int, default=10, help="the interval COST_AT_NOISE_EVERY is for")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def launch(args: argparse.Namespace) -> int:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    print(f"cpu: {model}; {os.cpu_count()} logical CPUs; ranks: {args.world_size} x 1 thread; {args.config}, fp32, "
          f"grad_accum {args.grad_accum}", flush=True)
    from gradpower_ds.jobs.processes import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.world_size),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), os.path.abspath(__file__), "--worker",
           *sys.argv[1:]]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), check=False).returncode


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch

    from gradpower_ds.jobs.data import load_corpus_distributed
    from gradpower_ds.deepspeed import register
    from gradpower_ds.noise import NoiseMonitor
    from gradpower_ds.jobs.train import build_engine
    from gradpower_ds.jobs.train_config import load_config

    cfg = load_config(["--config", args.config, "--precision", "fp32", "--grad_accum", str(args.grad_accum)])
    register()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    corpus = load_corpus_distributed(cfg.data, tokenizer=cfg.tokenizer)
    engine = build_engine(cfg, corpus.vocab_size)
    noise = NoiseMonitor(engine.module.named_parameters(), cfg.micro_batch * cfg.seq_len, every=1, seed=cfg.seed)
    times: dict[bool, list[float]] = {True: [], False: []}
    order = [True, False, False, True]
    for step in range(args.warmup + args.steps):
        measured = order[step % 4]
        torch.distributed.barrier()
        began = time.perf_counter()
        noise.begin_step(0)  # every=1: a measured step ...
        noise.probe.active = measured  # ... or not
        for micro in range(cfg.grad_accum):
            inputs, targets = corpus.train_batch(step, micro, rank, world, cfg.micro_batch, cfg.seq_len, cfg.seed)
            _, loss = engine(inputs, targets, aux_loss_coef=cfg.aux_loss_coef)
            noise.next_micro_batch(engine.device)
            engine.backward(loss)
            engine.step()
        row = noise.end_step()
        seconds = torch.tensor([time.perf_counter() - began])
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
        assert bool(row) == measured, row
        if step >= args.warmup:
            times[measured].append(seconds.item())
    if rank == 0:
        with_noise, plain = statistics.median(times[True]), statistics.median(times[False])
        ratio = with_noise / plain
        print(f"median step: measured {with_noise * 1e3:.1f} ms, plain {plain * 1e3:.1f} ms "
              f"({len(times[True])} + {len(times[False])} steps; last B_simple {noise.scale.value:,.0f} tokens)")
        print(f"RATIO measured/plain {ratio:.4f}")
        print(f"COST_AT_NOISE_EVERY {args.noise_every} {100 * (ratio - 1) / args.noise_every:.2f}%")
    engine.destroy()


def main() -> None:
    args = parse_args()
    if not args.worker:
        raise SystemExit(launch(args))
    from gradpower_ds.jobs.processes import exit_when_done

    exit_when_done(lambda: worker(args))


if __name__ == "__main__":
    main()
