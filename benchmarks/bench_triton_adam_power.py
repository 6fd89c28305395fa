"""One optimizer step on a GPU: the fused Triton AdamPower kernel against torch's, DeepSpeed's and apex's fused Adam.

In ONE run, for each size (total fp32 elements, split into --tensors equal params), it times:
  ours p=1.2 / ours p=1   AdamPower(fused=True): gradpower_ds.ops.triton_adam_power, one pass
  ours p=1.2 +bf16 copy   the same kernel also writing the new weights as bf16 (30 bytes/element)
  ours p=1.2 torch path   AdamPower(foreach=True): the multi-tensor torch path (the default on CUDA
                          without Triton, or where the kernel fails its check: gradpower_ds.kernel_gate)
  torch_adamw_fused       torch.optim.AdamW(fused=True), the anchor of the ratios
  deepspeed_fused_adam    deepspeed.ops.adam.FusedAdam (multi_tensor_apply), when it imports and builds
  apex_fused_adam         apex.optimizers.FusedAdam, when apex is installed
  two-pass p=1.2          grad_power_ in place on the grads, then torch AdamW(fused=True): what
                          Megatron runs with TE/apex's FusedAdam (p alternates 1.2 and 1/1.2 per
                          step, so the grads keep their magnitude over the timed steps)
and the roofline measured in the same run: a device-to-device copy over the
same bytes as params + grads + both moments. After the sizes, the multi-tensor case: --many
tensors of 16K elements each (default 256), where the per-launch host cost shows.

Reported per case: ms/step (median over --iters after --warmup, CUDA events),
effective GB/s at 28 bytes per element (read param, grad, exp_avg, exp_avg_sq;
write param, exp_avg, exp_avg_sq; 30 with the bf16 copy), % of the copy's GB/s
and time / time(torch_adamw_fused). Then the target line per size: ours at p=1.2 takes
<= 1.0x torch fused AdamW's time and, from 64M elements on, reaches >= 90% of the copy roofline.

    python benchmarks/bench_triton_adam_power.py                  # 1M, 64M and 512M elements, 256 small tensors
    python benchmarks/bench_triton_adam_power.py --sizes 64M --tensors 1
    python benchmarks/bench_triton_adam_power.py --interpret-smoke  # no GPU: tiny sizes through TRITON_INTERPRET=1
    python benchmarks/bench_triton_adam_power.py --host-only        # no GPU: the host cost of a step, launches no-ops

--sweep then times ours at p=1.2 at every size for BLOCK in {1024, 2048, 4096} x num_warps in {4, 8} (the
kernel's two tuning constants, ops.triton_adam_power.BLOCK / NUM_WARPS), one SWEEP line each, the best marked.

--host-only measures what the step costs the host, on any machine: CPU tensors under TRITON_INTERPRET=1 with
the kernel launches replaced by no-ops, 16 and 256 tensors of 16K elements, its step counters as AdamPower
makes them (the elements of one tensor) and as separate tensors (after a state load); and, in the same run,
the same step re-planned every call (its checks, tables and buckets built again: what every step cost before
plans were kept). The target: <= 50 us per launch bucket, planned.

Without a CUDA device (and without --interpret-smoke) it prints "no CUDA
device: nothing to measure" and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

BYTES_PER_ELEMENT = 28
ROOFLINE_FROM = 64 * 2**20  # elements: the roofline target applies from here (smaller steps are launch-bound)
SMALL_TENSOR = 16 * 2**10  # elements per tensor of the multi-tensor case


def _parse_size(text: str) -> int:
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def _median_seconds(fn, device, iters: int, warmup: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cases(params, on_gpu: bool):
    """(name, bytes per element, optional, make): make() returns a step function; optional cases may raise (skipped)."""
    import torch

    from gradpower_ds import AdamPower, grad_power_
    from gradpower_ds.ops.triton_adam_power import triton_adam_power_step

    def with_bf16_copy():
        moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        steps = [torch.tensor(0.0) for _ in params]
        copies = [torch.empty_like(p, dtype=torch.bfloat16) for p in params]

        def step():
            triton_adam_power_step(params, [p.grad for p in params], [m for m, _ in moments], [v for _, v in moments],
                                   steps, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                   adam_w_mode=True, power=1.2, power_eps=0.0, bias_correction=True,
                                   low_precision_params=copies)
        return step

    def two_pass():
        opt = torch.optim.AdamW(params, fused=True)
        grads = [p.grad for p in params]
        powers = [1.2, 1 / 1.2]

        def step():
            powers.reverse()
            grad_power_(grads, powers[0])
            opt.step()
        return step

    def deepspeed_fused():
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, adam_w_mode=True).step

    def apex_fused():
        from apex.optimizers import FusedAdam

        return FusedAdam(params, adam_w_mode=True).step

    cases = [
        ("ours p=1.2", BYTES_PER_ELEMENT, False, lambda: AdamPower(params, power=1.2, fused=True).step),
        ("ours p=1", BYTES_PER_ELEMENT, False, lambda: AdamPower(params, power=1.0, fused=True).step),
        ("ours p=1.2 +bf16 copy", BYTES_PER_ELEMENT + 2, False, with_bf16_copy),
        ("ours p=1.2 torch path", BYTES_PER_ELEMENT, False, lambda: AdamPower(params, power=1.2, foreach=True).step),
        ("torch_adamw_fused", BYTES_PER_ELEMENT, False, lambda: torch.optim.AdamW(params, fused=True).step),
    ]
    if on_gpu:
        cases += [("deepspeed_fused_adam", BYTES_PER_ELEMENT, True, deepspeed_fused),
                  ("apex_fused_adam", BYTES_PER_ELEMENT, True, apex_fused)]
    return cases + [("two-pass p=1.2", BYTES_PER_ELEMENT, False, two_pass)]


def run(sizes: list[int], num_tensors: int, iters: int, warmup: int, device) -> list[dict]:
    """Times the copy roofline and every case at every size; returns one row per measurement."""
    import torch

    rows = []
    for n in sizes:
        per = -(-n // num_tensors)
        numels = [min(per, n - i * per) for i in range(num_tensors) if n - i * per > 0]
        src = torch.ones(4 * n, device=device)
        dst = torch.empty_like(src)
        copy_s = _median_seconds(lambda: dst.copy_(src), device, iters, warmup)
        roofline = 2 * src.numel() * src.element_size() / copy_s  # bytes read + written per second
        src = dst = None  # freed before the cases allocate
        rows.append(dict(n=n, name="d2d copy", seconds=copy_s, gbs=roofline / 1e9, roofline=roofline,
                         tensors=len(numels)))
        gen = torch.Generator(device=device).manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(k, device=device, generator=gen)) for k in numels]
        grads = [torch.randn(k, device=device, generator=gen) * 1e-3 for k in numels]
        for name, nbytes, optional, make in _cases(params, device.type == "cuda"):
            for p, g in zip(params, grads):
                p.grad = g
            try:
                step = make()
            except Exception as exc:
                if not optional:
                    raise
                print(f"{name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", flush=True)
                continue
            seconds = _median_seconds(step, device, iters, warmup)
            rows.append(dict(n=n, name=name, seconds=seconds, gbs=nbytes * n / seconds / 1e9,
                             roofline=roofline, tensors=len(numels)))
            del step  # frees the optimizer state before the next case
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def report(rows: list[dict]) -> None:
    """Prints the table, the ratios to torch fused AdamW and the target line for each size."""
    print(f"{'elements':>10} {'case':<24} {'ms/step':>9} {'GB/s':>8} {'%roof':>6} {'vs torch':>8}")
    for n in sorted({r["n"] for r in rows}):
        group = [r for r in rows if r["n"] == n]
        torch_row = next((r for r in group if r["name"] == "torch_adamw_fused"), None)
        for r in group:
            ratio = f"{r['seconds'] / torch_row['seconds']:7.2f}x" if torch_row and r["name"] != "d2d copy" else ""
            print(f"{n:>10} {r['name']:<24} {r['seconds'] * 1e3:9.3f} {r['gbs']:8.1f} "
                  f"{100 * r['gbs'] * 1e9 / r['roofline']:6.1f} {ratio}")
        ours = next((r for r in group if r["name"] == "ours p=1.2"), None)
        if ours and torch_row:
            ratio = ours["seconds"] / torch_row["seconds"]
            pct = 100 * ours["gbs"] * 1e9 / ours["roofline"]
            roofline_judged = n >= ROOFLINE_FROM
            verdict = "PASS" if ratio <= 1.0 and (pct >= 90.0 or not roofline_judged) else "FAIL"
            print(f"TARGET n={n} ({ours['tensors']} tensors): our kernel at p=1.2 <= 1.0x torch fused AdamW"
                  f"{' and >= 90% of roofline' if roofline_judged else ''}: {verdict} ({ratio:.3f}x, {pct:.1f}%)")


SWEEP_BLOCKS, SWEEP_WARPS = (1024, 2048, 4096), (4, 8)


def sweep(sizes: list[int], num_tensors: int, iters: int, warmup: int, device) -> None:
    """Times ours at p=1.2 for every (BLOCK, num_warps) of the sweep at every size; prints SWEEP lines, best marked."""
    import torch

    from gradpower_ds import AdamPower
    from gradpower_ds.ops import triton_adam_power as tap

    chosen = tap.BLOCK, tap.NUM_WARPS
    for n in sizes:
        per = -(-n // num_tensors)
        params = [torch.nn.Parameter(torch.randn(min(per, n - i * per), device=device)) for i in range(num_tensors)
                  if n - i * per > 0]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        times = {}
        for block in SWEEP_BLOCKS:
            for warps in SWEEP_WARPS:
                tap.BLOCK, tap.NUM_WARPS = block, warps
                tap._plans.clear()
                tap._layout.cache_clear()
                times[block, warps] = _median_seconds(AdamPower(params, power=1.2, fused=True).step, device, iters,
                                                      warmup)
        best = min(times, key=times.get)
        for (block, warps), seconds in times.items():
            print(f"SWEEP n={n} BLOCK={block} num_warps={warps}: {seconds * 1e3:.3f} ms"
                  f"{'  <- best' if (block, warps) == best else ''}{'  (current)' if (block, warps) == chosen else ''}")
        del params
    tap.BLOCK, tap.NUM_WARPS = chosen
    tap._plans.clear()
    tap._layout.cache_clear()


def host_cost(iters: int = 300) -> None:
    """Prints the host cost per step, planned and re-planned every call (the launches are no-ops); see --host-only."""
    import torch

    from gradpower_ds.ops import triton_adam_power as tap

    class NoLaunch:  # kernel[grid](...) does nothing: only the host's work is timed
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    tap._kernel = lambda interpret: NoLaunch()
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, adam_w_mode=True, power=1.2,
                 power_eps=0.0, bias_correction=True)
    print(f"{'tensors':>8} {'counters':<12} {'planned us':>10} {'re-planned us':>13} {'ratio':>6}")
    for count in (16, 256):
        params = [torch.randn(SMALL_TENSOR) for _ in range(count)]
        grads, exp_avgs, exp_avg_sqs = ([torch.zeros_like(p) for p in params] for _ in range(3))
        for layout in ("one tensor", "separate"):
            steps = list(torch.zeros(count).unbind()) if layout == "one tensor" else [torch.tensor(0.0) for _ in params]
            timings = {}
            for mode in ("planned", "re-planned"):
                def step():
                    if mode == "re-planned":
                        tap._plans.clear()
                    tap.triton_adam_power_step(params, grads, exp_avgs, exp_avg_sqs, steps, **hyper)
                for _ in range(10):
                    step()
                start = time.perf_counter()
                for _ in range(iters):
                    step()
                timings[mode] = (time.perf_counter() - start) / iters * 1e6
            print(f"{count:>8} {layout:<12} {timings['planned']:10.1f} {timings['re-planned']:13.1f} "
                  f"{timings['planned'] / timings['re-planned']:6.2f}")
            if count == 16 and layout == "one tensor":
                verdict = "PASS" if timings["planned"] <= 50.0 else "FAIL"
                print(f"TARGET host cost <= 50 us per launch bucket (16 tensors, one bucket): {verdict} "
                      f"({timings['planned']:.1f} us)")


def main(argv: list[str] | None = None) -> int:
    """Parses the flags, runs the benchmark on the GPU (or the interpreter smoke run) and prints the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_parse_size, nargs="+", default=[2**20, 64 * 2**20, 512 * 2**20],
                        help="total elements per run, with an optional K/M/G suffix (powers of 2)")
    parser.add_argument("--tensors", type=int, default=16, help="params the elements are split into")
    parser.add_argument("--many", type=int, default=256,
                        help="then a run over this many tensors of 16K elements (0: none), the multi-tensor case")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--interpret-smoke", action="store_true",
                        help="no GPU needed: a few thousand elements on CPU tensors through TRITON_INTERPRET=1 "
                             "(checks that the script runs; the timings mean nothing)")
    parser.add_argument("--sweep", action="store_true", help="then sweep BLOCK x num_warps at every size (above)")
    parser.add_argument("--host-only", action="store_true",
                        help="no GPU needed: the host cost of a step, launches no-ops (see above)")
    args = parser.parse_args(argv)
    if args.interpret_smoke or args.host_only:
        os.environ["TRITON_INTERPRET"] = "1"
    if args.host_only:
        host_cost()
        return 0

    import torch

    if args.interpret_smoke:
        print("interpreter smoke run (TRITON_INTERPRET=1, CPU tensors): the timings mean nothing")
        rows = run([3 * 4096 + 5], num_tensors=3, iters=1, warmup=0, device=torch.device("cpu"))
        if args.sweep:
            sweep([3 * 4096 + 5], 3, iters=1, warmup=0, device=torch.device("cpu"))
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    else:
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.tensors} tensors per size")
        rows = run(args.sizes, args.tensors, args.iters, args.warmup, torch.device("cuda"))
        if args.many:
            rows += run([args.many * SMALL_TENSOR], args.many, args.iters, args.warmup, torch.device("cuda"))
        if args.sweep:
            sweep(args.sizes, args.tensors, args.iters, args.warmup, torch.device("cuda"))
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
