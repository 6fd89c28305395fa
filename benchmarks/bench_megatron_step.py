"""megatron-core ``optimizer.step()``: ``OptimizerConfig(optimizer="adampower")`` (p=1.2) against ``"adam"``
(``--pair muon``: ``"muonpower"`` (p=0.9, Adam p=1.2) against ``"muon"``, megatron-core's Muon, which runs
without the distributed optimizer; ``--pair blockwise``: adampower with ``gradpower_blockwise_lr`` against
adampower, the cost of the per-row lrs of the fused linear_qkv).

In ONE process (world size 1; torch.distributed is initialised here), per case (default:
the distributed optimizer with a bf16 model and with an fp32 model), it builds the same
seeded GPTModel (get_gpt_layer_local_spec, tied embedding) twice under megatron DDP, one
per optimizer, runs ONE real forward/backward for gradients and then steps the two
optimizers in alternating rounds (adampower, adam, adampower, adam, ...), clip_grad=1.0
so clipping runs. Before every step the DDP grad buffers (main_grad) are refilled with
that same snapshot, so both see identical, non-zero gradients. Two phases:
  time    --repeats rounds after --warmup: best and median ms of ``optimizer.step()``
          alone (torch.cuda.synchronize around it on GPU), the allocator left as it is
  memory  2 more rounds (after --warmup) on fresh models: the peak memory the step
          allocates above what was live before it
            CUDA  reset_peak_memory_stats(); max_memory_allocated() - memory_allocated()
            CPU   "5" -> /proc/self/clear_refs resets VmHWM; VmHWM after - VmRSS before,
                  with glibc told (mallopt) to mmap every block >= 64 KiB and trim what
                  is freed, so the RSS follows the live tensors (by default freed memory
                  stays resident and is reused, skewing the figure either way; the
                  mallopt is not used for timing: page faults on every temporary would
                  about double the CPU step). Without a writable clear_refs: ru_maxrss
                  deltas, a LOWER BOUND (only growth above the earlier peak; said so).
Both phases also report the inner torch optimizer's step() alone (the instance's step,
wrapped; AdamPower's gradient power runs in or before it), which separates the optimizer
from Megatron's work around it: on the CPU the distributed optimizer's gloo param
all-gather briefly copies the whole param buffer, the largest extra of the step.
The anchor on a GPU is a fused Adam: Megatron's own (TE's or apex's FusedAdam where installed), else torch's AdamW
switched to its fused kernel (Megatron builds it without ``fused``); ``ANCHOR case=... adam=...`` names it.
Lines ``RATIO adampower/adam step time: X (target ...)`` (the whole optimizer.step(), medians; muonpower/muon
with --pair muon), ``RATIO_INNER adampower/adam inner step: X`` (the inner torch optimizers' step alone) and
``PEAK_EXTRA adampower=... adam=... largest_grad=...`` per case: compare the extra with the largest
fp32 main-grad shard and the whole fp32 grad (bounded chunk or a copy of a gradient?).

    python benchmarks/bench_megatron_step.py                      # ~23M params on CPU, bf16 + fp32
    python benchmarks/bench_megatron_step.py --dtype bf16 --repeats 20 --json /tmp/megatron_step.json
    python benchmarks/bench_megatron_step.py --no-distributed-optimizer --hidden 256 --layers 4
    python benchmarks/bench_megatron_step.py --pair muon --dtype bf16    # needs emerging-optimizers
    python benchmarks/bench_megatron_step.py --pair blockwise

Without CUDA it runs megatron-core through tests/megatron_cpu_shim.py (gloo); with CUDA
the shim is never imported (NCCL). The default CPU run takes 15-40 s on 2 cores.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # gradpower_ds, megatron_patches
PAIRS = {"adam": ("adampower", "adam"), "muon": ("muonpower", "muon"),  # --pair: (ours, theirs)
         "blockwise": ("adampower+blockwise", "adampower")}
# each variant: (OptimizerConfig.optimizer, the other OptimizerConfig fields it sets)
VARIANTS = {"adam": ("adam", {}), "muon": ("muon", {}), "adampower": ("adampower", dict(gradpower_p=1.2)),
            "muonpower": ("muonpower", dict(gradpower_p=0.9, gradpower_p_adam=1.2)),
            "adampower+blockwise": ("adampower", dict(gradpower_p=1.2, gradpower_blockwise_lr=True))}
SEQ, BATCH, CLIP = 128, 2, 1.0
MEMORY_ROUNDS = 2  # untimed rounds (after --warmup) that measure the peak memory


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, help="hidden size (default 512 on CPU, 2048 on GPU; 64-dim heads)")
    parser.add_argument("--layers", type=int, help="transformer layers (default 6 on CPU, 8 on GPU)")
    parser.add_argument("--vocab", type=int, help="vocabulary (default 8192 on CPU, 32768 on GPU)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (steps per optimizer) per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per case")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="adam",
                        help="adam: adampower vs adam; muon: muonpower vs muon (no distributed optimizer); "
                             "blockwise: adampower with blockwise lrs vs without")
    parser.add_argument("--no-distributed-optimizer", action="store_true",
                        help="megatron's plain (mixed-precision / fp32) optimizer instead of the distributed one")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    return parser.parse_args()


class Peak:
    """Peak memory (MiB) allocated above a region's start, with one nested sub-region at a time."""

    def __init__(self, torch, cuda: bool):
        if cuda:
            self.method = "torch.cuda max_memory_allocated() - memory_allocated() before"
            self._reset, self._peak, self._now = (torch.cuda.reset_peak_memory_stats, torch.cuda.max_memory_allocated,
                                                  torch.cuda.memory_allocated)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after a /proc/self/clear_refs reset - VmRSS before"
            self._reset = lambda: Path("/proc/self/clear_refs").write_text("5")
            self._peak, self._now = (lambda: self._status("VmHWM")), (lambda: self._status("VmRSS"))
        except OSError as e:
            self.method = (f"/proc/self/clear_refs not writable ({e.strerror}): ru_maxrss delta, a LOWER BOUND "
                           "(only growth above the process's earlier peak shows)")
            self._reset = lambda: None
            self._peak = self._now = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @staticmethod
    def _status(field: str) -> int:
        return 1024 * int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))

    def start(self) -> None:
        self._reset()
        self.base, self.seen = self._now(), 0

    def stop(self) -> float:
        return (max(self.seen, self._peak()) - self.base) / 2**20

    def sub_start(self) -> None:
        self.seen = max(self.seen, self._peak())  # the outer peak so far survives the reset
        self._reset()
        self.sub_base = self._now()

    def sub_stop(self) -> float:
        self.seen = max(self.seen, self._peak())
        return (self._peak() - self.sub_base) / 2**20


def build(args, dtype, variant: str, torch):
    """A seeded GPTModel under megatron DDP and its megatron optimizer (a VARIANTS entry)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    bf16, distributed = dtype == torch.bfloat16, not args.no_distributed_optimizer
    config = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                               use_cpu_initialization=args.device.type == "cpu", params_dtype=dtype, bf16=bf16,
                               pipeline_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=args.vocab, max_sequence_length=SEQ,
                     position_embedding_type="rope", share_embeddings_and_output_weights=True)
    model = (model.bfloat16() if bf16 else model).to(args.device)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed, grad_reduce_in_fp32=True,
                                               overlap_grad_reduce=False)
    model = DistributedDataParallel(config, ddp_config, model)
    optimizer, fields = VARIANTS[variant]
    opt_config = OptimizerConfig(optimizer=optimizer, lr=1e-4, weight_decay=0.1, clip_grad=CLIP, adam_beta1=0.9,
                                 adam_beta2=0.95, adam_eps=1e-8, bf16=bf16, params_dtype=dtype,
                                 use_distributed_optimizer=distributed, **fields)
    if "muon" in optimizer:  # megatron-core 0.16 and 0.17 build Muon in get_megatron_muon_optimizer, 0.18 on here
        from megatron.core.optimizer import muon

        return model, muon.get_megatron_muon_optimizer(opt_config, [model])
    megatron_optimizer = get_megatron_optimizer(opt_config, [model])
    if optimizer == "adam" and args.device.type == "cuda":
        fuse_torch_adams(megatron_optimizer)
    return model, megatron_optimizer


def fuse_torch_adams(megatron_optimizer) -> None:
    """The anchor on a GPU is a fused Adam: Megatron's own is TE's or apex's FusedAdam where installed, else torch's
    AdamW, which Megatron builds without ``fused``; that one is switched to torch's fused kernel here (before its
    first step, so its state is created for it)."""
    import torch
    from megatron_patches.optimizer import inner_optimizers

    for inner in inner_optimizers(megatron_optimizer):
        if isinstance(inner, torch.optim.Adam):  # torch's AdamW is an Adam
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)


def anchor(megatron_optimizer) -> str:
    """What the anchor's inner optimizers are, e.g. 'FusedAdam (transformer_engine...)' or 'AdamW (fused)'."""
    from megatron_patches.optimizer import inner_optimizers

    names = []
    for inner in inner_optimizers(megatron_optimizer):
        fused = {bool(g.get("fused")) for g in inner.param_groups}
        names.append(f"{type(inner).__name__} ({type(inner).__module__}{', fused' if fused == {True} else ''})")
    return ", ".join(dict.fromkeys(names))


def run_case(args, dtype_name: str, torch, peak: Peak | None = None) -> dict:
    """Both optimizers on the same model and gradients, alternating rounds. Without `peak`: per optimizer the
    seconds of each timed optimizer.step() and of its inner torch step(s); with `peak`: their peak extra MiB."""
    from megatron_patches.optimizer import inner_optimizers

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    sync = torch.cuda.synchronize if args.device.type == "cuda" else (lambda: None)
    models, opts = {}, {}
    for name in args.optimizers:
        models[name], opts[name] = build(args, dtype, name, torch)
    model = models[args.optimizers[0]]
    anchor_name = anchor(opts[args.optimizers[1]])
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (BATCH, SEQ + 1), generator=gen).to(args.device)
    model.zero_grad_buffer()
    model(tokens[:, :-1], torch.arange(SEQ, device=args.device).expand(BATCH, SEQ), None,
          labels=tokens[:, 1:]).float().mean().backward()
    model.finish_grad_sync()
    grads = [b.grad_data.clone() for b in model.buffers + model.expert_parallel_buffers]  # the real gradients
    assert all(g.abs().sum() > 0 for g in grads), "all-zero gradient buffer"
    main = [p.numel() * 4 / 2**20 for group in opts[args.optimizers[0]].param_groups for p in group["params"]]
    out = dict(n_params=sum(p.numel() for p in model.module.parameters()), largest_grad_mib=max(main),
               fp32_grad_mib=sum(main), anchor=anchor_name)

    inner = {}  # the inner torch optimizer(s)' step(): wrapped per instance, whatever its class

    def timed_inner(step):
        def wrapper(*a, **kw):
            sync()
            if peak:
                peak.sub_start()
            t0 = time.perf_counter()
            result = step(*a, **kw)
            sync()
            value = peak.sub_stop() if peak else time.perf_counter() - t0
            inner["value"] = max(inner.get("value", 0.0), value) if peak else inner.get("value", 0.0) + value
            return result
        return wrapper

    for opt in opts.values():
        for torch_opt in inner_optimizers(opt):
            torch_opt.step = timed_inner(torch_opt.step)
    figures = {name: {"step": [], "inner": []} for name in args.optimizers}
    for i in range(args.warmup + (MEMORY_ROUNDS if peak else args.repeats)):
        for name in args.optimizers:
            buffers = models[name].buffers + models[name].expert_parallel_buffers
            for buffer, grad in zip(buffers, grads, strict=True):  # identical layouts: same model, same seed
                assert buffer.grad_data.shape == grad.shape
                buffer.grad_data.copy_(grad)
            inner.clear()
            sync()
            if peak:
                peak.start()
            t0 = time.perf_counter()
            ok, grad_norm, _ = opts[name].step()
            sync()
            value = peak.stop() if peak else time.perf_counter() - t0
            assert ok and grad_norm > 0, (name, ok, grad_norm)
            if i >= args.warmup:
                figures[name]["step"].append(value)
                figures[name]["inner"].append(inner.get("value", math.nan))  # nan: no inner step seen
    pairs = zip(*(models[name].module.parameters() for name in args.optimizers))  # same start, same gradients:
    assert not all(torch.equal(a, b) for a, b in pairs), f"{args.optimizers} took identical steps"  # p applied?
    del models, opts, model, grads
    gc.collect()
    out["grad_norm"] = float(grad_norm)
    for name, f in figures.items():
        seen = not any(math.isnan(v) for v in f["inner"])
        if peak:
            out[name] = dict(peak_extra_mib=max(f["step"]), inner_peak_extra_mib=max(f["inner"]) if seen else None)
        else:
            out[name] = dict(best_ms=min(f["step"]) * 1e3, median_ms=statistics.median(f["step"]) * 1e3,
                             inner_median_ms=statistics.median(f["inner"]) * 1e3 if seen else None,
                             times_ms=[t * 1e3 for t in f["step"]])
    return out


def fmt(value, width: int, digits: int = 2) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|cuda_graph_scope|is deprecated).*")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        sys.path.insert(0, str(ROOT / "tests"))
        import megatron_cpu_shim  # test-only: megatron-core on a CPU-only torch

        megatron_cpu_shim.install()
    import megatron.core
    import torch.distributed as dist
    from megatron.core import parallel_state

    import megatron_patches
    from gradpower_ds.jobs.processes import free_port

    args.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    args.optimizers = PAIRS[args.pair]
    if args.pair == "muon":
        args.no_distributed_optimizer = True  # megatron-core's Muon refuses the distributed optimizer
    defaults = dict(hidden=2048, layers=8, vocab=32768) if cuda else dict(hidden=512, layers=6, vocab=8192)
    for key, value in defaults.items():
        setattr(args, key, getattr(args, key) or value)
    torch.set_num_threads(args.threads)
    if cuda:
        torch.cuda.set_device(0)
        device_name = f"GPU {torch.cuda.get_device_name(0)}"
    else:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        device_name = "CPU " + next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                                     if line.startswith("Model name")), "unknown")
    backend = "nccl" if cuda else "gloo"
    print(f"device: {device_name}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, backend {backend}", flush=True)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    megatron_patches.apply()
    peak = Peak(torch, cuda)
    check = ""
    if not cuda:  # self-check: a 256 MiB tensor allocated and freed between the reset and the read
        for _ in range(2):  # the first time also faults in ~7 MiB of code / thread-pool pages
            peak.start()
            torch.ones(64 * 2**20)  # freed at once: nothing holds it
        check = f"; self-check: 256 MiB tensor allocated and freed -> {peak.stop():.1f} MiB"
    print(f"peak memory: {peak.method}{check}")
    kind = "plain optimizer" if args.no_distributed_optimizer else "distributed optimizer"
    results = dict(device=device_name, torch=torch.__version__, megatron_core=megatron.core.__version__,
                   threads=torch.get_num_threads(), hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                   optimizer_kind=kind, peak_method=peak.method, repeats=args.repeats, cases=[])
    timed = {dtype_name: run_case(args, dtype_name, torch) for dtype_name in args.dtype}  # glibc's default malloc
    if not cuda:  # from here on every block >= 64 KiB is mmapped and freed memory trimmed (see above)
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024), libc.mallopt(-1, 128 * 1024)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    for dtype_name, case in timed.items():
        memory = run_case(args, dtype_name, torch, peak)
        for name in args.optimizers:
            case[name].update(memory[name])
        ours, theirs = (case[name] for name in args.optimizers)
        case.update(dtype=dtype_name, ratio=ours["median_ms"] / theirs["median_ms"],
                    ratio_best=ours["best_ms"] / theirs["best_ms"],
                    ratio_inner=ours["inner_median_ms"] / theirs["inner_median_ms"]
                    if ours["inner_median_ms"] and theirs["inner_median_ms"] else None)
        results["cases"].append(case)
        if len(results["cases"]) == 1:
            print(f"model: GPTModel (local spec) hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
                  f"tied embedding: {case['n_params'] / 1e6:.2f}M parameters")
        print(f"\n{dtype_name}, {kind}: ms over {args.repeats} rounds, peak extra over {MEMORY_ROUNDS} more; grad "
              f"norm {case['grad_norm']:.3g} (clip {CLIP}); fp32 grad {case['fp32_grad_mib']:.1f} MiB, largest "
              f"main-grad shard {case['largest_grad_mib']:.1f} MiB")
        print(f"  {'':<10} {'optimizer.step(): best':>22} {'median':>9} {'peak extra':>14} "
              f"{'inner torch step: median':>26} {'peak extra':>14}")
        for name in args.optimizers:
            c = case[name]
            print(f"  {name:<10} {c['best_ms']:22.2f} {c['median_ms']:9.2f} {c['peak_extra_mib']:10.1f} MiB "
                  f"{fmt(c['inner_median_ms'], 26)} {fmt(c['inner_peak_extra_mib'], 10, 1)} MiB")
        pair = "/".join(args.optimizers)
        print(f"  {pair}: optimizer.step() median {case['ratio']:.3f}, best-of {case['ratio_best']:.3f}; "
              f"inner torch step median {fmt(case['ratio_inner'], 0, 3)}")
        tag = f"case={dtype_name}-{kind.split()[0]}"
        print(f"ANCHOR {tag} {args.optimizers[1]}={case['anchor']}")
        print(f"RATIO {pair} step time: {case['ratio']:.3f} (target <= 1.05 on CPU, <= 1.02 on GPU) {tag}")
        print(f"RATIO_INNER {pair} inner step: {fmt(case['ratio_inner'], 0, 3)} {tag}")
        print(f"PEAK_EXTRA {args.optimizers[0]}={ours['peak_extra_mib']:.1f} MiB "
              f"{args.optimizers[1]}={theirs['peak_extra_mib']:.1f} MiB largest_grad={case['largest_grad_mib']:.1f} "
              f"MiB {tag}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    from gradpower_ds.jobs.processes import exit_when_done
    exit_when_done(main)
