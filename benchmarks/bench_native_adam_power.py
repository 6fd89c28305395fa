"""One optimizer step on the CPU: our fused AdamPower kernel against DeepSpeed's CPU Adam and torch.

In ONE run, for each thread count (a fresh worker process with OMP_NUM_THREADS set,
so every OpenMP runtime in it agrees) and each size, it times:
  ours p=1.2 / ours p=1   gradpower_ds.CPUAdamPower (and p=1.2 forced to AVX2 on AVX-512 CPUs)
  deepspeed_cpu_adam      deepspeed.ops.adam.DeepSpeedCPUAdam (the anchor), as DeepSpeed builds it here
  deepspeed_cpu_adam avx2 on an AVX-512 CPU: the same, built as DeepSpeed builds it for an AVX2 CPU
                          (its op builder's SIMD width -D__AVX256__ and -march=haswell, under the JIT
                          name cpu_adam_avx2; inside this benchmark only): the anchor of the AVX2 ratio
  torch_adamw_fused       torch.optim.AdamW(fused=True)
  naive p=1.2             torch sign(g)*|g|**p, then torch AdamW(fused=True)
  ... bf16 params         ours and DeepSpeedCPUAdam on bf16 params and grads (fp32 moments; their GB/s and
                          % columns count 28 bytes per element like every row, though they move 22)
and the bandwidth roofline measured in the same worker: the native kernel's
stream probe (gradpower_ds.ops.native_adam_power.native_stream_probe), which moves exactly
the optimizer's bytes (read w, g, m, v; write w, m, v in place) with one add per
array, over the same elements.

Reported: ms/step (best of --repeats), elements/s, effective GB/s at 28 bytes
per element (read w, g, m, v; write w, m, v), % of the measured bandwidth, and
speed(ours p=1.2) / speed(DeepSpeedCPUAdam); each RATIO line names the ISA of both sides.

    python benchmarks/bench_native_adam_power.py                     # 16M and 64M, 1 and 2 threads
    python benchmarks/bench_native_adam_power.py --sizes 1048576 --threads 1 --skip-deepspeed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BYTES_PER_ELEMENT = 28


def _best_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _optimizer_cases(skip_deepspeed: bool):
    import torch

    from gradpower_ds import CPUAdamPower
    from gradpower_ds.ops import resolve_isa

    def naive(params):
        opt = torch.optim.AdamW(params, fused=True)

        def step():
            for p in params:
                p.grad = torch.sign(p.grad) * p.grad.abs().pow(1.2)
            opt.step()
        return step

    fp32, bf16 = torch.float32, torch.bfloat16
    cases = [  # (name, optimizer step of params, the params' dtype)
        ("ours p=1.2", lambda ps: CPUAdamPower(ps, power=1.2).step, fp32),
        ("ours p=1", lambda ps: CPUAdamPower(ps, power=1.0).step, fp32),
    ]
    if resolve_isa() == "avx512":  # the AVX2 path too, as CPUs without AVX-512 would run it
        cases.append(("ours p=1.2 avx2", lambda ps: CPUAdamPower(ps, power=1.2, isa="avx2").step, fp32))
    cases += [
        ("ours p=1.2 bf16 params", lambda ps: CPUAdamPower(ps, power=1.2).step, bf16),
        ("torch_adamw_fused", lambda ps: torch.optim.AdamW(ps, fused=True).step, fp32),
        ("naive p=1.2", naive, fp32),
    ]
    if not skip_deepspeed:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        cases.insert(2, ("deepspeed_cpu_adam", lambda ps: DeepSpeedCPUAdam(ps).step, fp32))
        cases.append(("deepspeed_cpu_adam bf16 params", lambda ps: DeepSpeedCPUAdam(ps).step, bf16))
        if resolve_isa() == "avx512":
            cases.insert(3, ("deepspeed_cpu_adam avx2", lambda ps: deepspeed_cpu_adam_avx2(ps).step, fp32))
    return cases


def deepspeed_cpu_adam_avx2(params):
    """DeepSpeedCPUAdam running DeepSpeed's CPU Adam op as DeepSpeed builds it for an AVX2 CPU (no AVX-512):
    its op builder with the AVX2 SIMD width and -march=haswell, JIT-built under its own name."""
    from unittest import mock

    from deepspeed.ops.adam import DeepSpeedCPUAdam, cpu_adam
    from deepspeed.ops.op_builder.cpu import CPUAdamBuilder

    class CPUAdamAVX2Builder(CPUAdamBuilder):
        NAME = "cpu_adam_avx2"  # CPUAdamBuilder.__init__ names the op by it: its own JIT build

        def absolute_name(self):
            return f"deepspeed.ops.adam.{self.NAME}_op"

        def simd_width(self):
            return "-D__AVX256__"

        def cpu_arch(self):
            return "-march=haswell"  # AVX2 + FMA + F16C, as on an AVX2-only CPU

    with mock.patch.object(cpu_adam, "CPUAdamBuilder", CPUAdamAVX2Builder):
        return DeepSpeedCPUAdam(params)


def worker(args) -> None:
    """Times every case at every size on this process's thread count; prints JSON rows."""
    import torch

    from gradpower_ds.ops.native_adam_power import native_stream_probe

    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        arrays = [torch.zeros(n) for _ in range(4)]
        probe_s = _best_time(lambda arrays=arrays: native_stream_probe(*arrays, isa="auto", num_threads=args.threads),
                             args.repeats)
        bandwidth = BYTES_PER_ELEMENT * n / probe_s
        del arrays
        for name, make, dtype in _optimizer_cases(args.skip_deepspeed):
            p = torch.nn.Parameter(torch.randn(n).to(dtype))
            grad = (torch.randn(n) * 1e-3).to(dtype)
            p.grad = grad.clone()
            step = make([p])
            if name.startswith("naive"):
                def timed(step=step, p=p, grad=grad):
                    p.grad = grad.clone()
                    step()
                repeats = max(1, args.repeats // 3)
            else:
                timed, repeats = step, args.repeats
            seconds = _best_time(timed, repeats)
            rows.append(dict(threads=args.threads, n=n, name=name, seconds=seconds,
                             bandwidth=bandwidth))
            del step, p, grad
    print("ROWS " + json.dumps(rows), flush=True)


def report(rows, isa: str, deepspeed_isa: str) -> None:
    """Prints the table and the ours/DeepSpeed ratios (`isa`: our kernel's; `deepspeed_isa`: DeepSpeed's build)."""
    print(f"{'thr':>3} {'elements':>10} {'optimizer':<20} {'ms/step':>9} {'Gelem/s':>8} {'GB/s':>7} "
          f"{'%roof':>6} {'vs DS':>6}")
    for threads in sorted({r["threads"] for r in rows}):
        for n in sorted({r["n"] for r in rows}):
            group = [r for r in rows if r["threads"] == threads and r["n"] == n]
            ds = next((r for r in group if r["name"] == "deepspeed_cpu_adam"), None)
            print(f"{threads:>3} {n:>10} {'roofline (probe)':<20} {'':>9} {'':>8} {group[0]['bandwidth'] / 1e9:7.1f}"
                  f" {100.0:6.1f}")
            for r in group:
                gbs = BYTES_PER_ELEMENT * n / r["seconds"]
                vs = f"{ds['seconds'] / r['seconds']:6.2f}" if ds else "   n/a"
                print(f"{threads:>3} {n:>10} {r['name']:<20} {r['seconds'] * 1e3:9.2f} {n / r['seconds'] / 1e9:8.3f} "
                      f"{gbs / 1e9:7.1f} {100 * gbs / r['bandwidth']:6.1f} {vs}")
    for ours_name, ds_name, ours_isa, ds_isa in (("ours p=1.2", "deepspeed_cpu_adam", isa, deepspeed_isa),
                                                 ("ours p=1.2 avx2", "deepspeed_cpu_adam avx2", "avx2", "avx2")):
        for r in rows:
            if r["name"] != ours_name:
                continue
            ds = next((d for d in rows if d["name"] == ds_name and d["n"] == r["n"] and d["threads"] == r["threads"]),
                      None)
            if ds:
                print(f"RATIO speed(ours p=1.2, {ours_isa})/speed(DeepSpeedCPUAdam, {ds_isa} build) "
                      f"threads={r['threads']} n={r['n']}: {ds['seconds'] / r['seconds']:.3f}")


def cpu_model() -> str:
    """The CPU's model name (every figure is named with it)."""
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                "unknown CPU")


def deepspeed_simd_width() -> str:
    """The ISA DeepSpeed builds its CPU Adam for on this machine: avx512, avx2 or scalar (its op builder's choice)."""
    try:
        from deepspeed.ops.op_builder.cpu import CPUAdamBuilder
    except ImportError:
        return "n/a"
    return {"-D__AVX512__": "avx512", "-D__AVX256__": "avx2"}.get(CPUAdamBuilder().simd_width(), "scalar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16 * 2**20, 64 * 2**20])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-deepspeed", action="store_true", help="leave out DeepSpeedCPUAdam (no JIT build)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        return worker(args)

    import torch

    from gradpower_ds.ops import resolve_isa

    isa = resolve_isa()
    print(f"cpu: {cpu_model()}; torch {torch.__version__}, kernel ISA {isa}, {os.cpu_count()} CPUs")
    rows = []
    for threads in args.threads:
        cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--repeats", str(args.repeats),
               "--sizes", *map(str, args.sizes)] + (["--skip-deepspeed"] if args.skip_deepspeed else [])
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"benchmark worker ({threads} threads) failed:\n{out.stderr[-3000:]}")
        rows += json.loads(next(line for line in out.stdout.splitlines() if line.startswith("ROWS "))[5:])
    report(rows, isa, deepspeed_simd_width())


if __name__ == "__main__":
    main()
