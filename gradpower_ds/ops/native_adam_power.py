"""Tensor-level entry points of the native CPU kernel (gradpower_ds/csrc, built by ops/builder.py).

Two operations, both one pass over memory on OpenMP threads with AVX-512 / AVX2 /
scalar code picked at run time:

- ``native_power_``: phi_p in place on a CPU tensor (fp32 directly; bf16/fp16 and
  fp64 through a bounded fp32 scratch chunk);
- ``native_adam_power_step``: phi_p + Adam(W) fused over one param and its fp32
  moments: an fp32 param with an fp32 grad (optionally writing the new weights
  into a bf16/fp16 copy in the same pass), or a bf16/fp16 param with a grad of
  its dtype, both read and written by the kernel itself; other grad dtypes are
  widened chunk by chunk;

and ``native_stream_probe``, the optimizer's memory traffic alone (a bandwidth
roofline for benchmarks/bench_native_adam_power.py).

The kernel takes raw addresses, by keyword only. This module is the one place
that calls it, and every tensor it hands over goes through ``kernel_ptr``, which
checks device, dtype, contiguity and element count first, so no address reaches
C++ unchecked. ``fits`` asks the same question without raising, for callers that
choose a path by it (``functional.adam_power``).

Native phi matches the float64 reference to 2.5e-7 relative over the whole fp32
range (p <= 2; 1e-6 for p <= 8) (tests/test_native_adam_power.py). This module imports no optimizer, so the
functional core and the optimizers can both use it. Hyperparameters arrive
validated (``gradpower_ds.hyperparams``, where they enter).
"""

from __future__ import annotations

import functools
import os

import torch

from ..hyperparams import bias_corrections
from . import builder

ISA_CODES = {"auto": -1, "scalar": 0, "avx2": 1, "avx512": 2}
ISA_NAMES = {code: name for name, code in ISA_CODES.items()}
ISA_ENV = "GRADPOWER_CPU_ISA"
FP32 = (torch.float32,)
COPY_CODES = {torch.bfloat16: 1, torch.float16: 2}  # copy-out dtypes, as the kernel's copy_dtype codes
CHUNK = 1 << 20  # elements per scratch chunk when a tensor is not fp32 (4 MiB of fp32 scratch)


def resolve_isa(isa: str | None = None) -> str:
    """Returns the ISA name the kernel will use: `isa`, else $GRADPOWER_CPU_ISA, else the CPU's best.

    Raises ValueError for an unknown name or one this CPU cannot run.
    """
    requested = isa if isa is not None else os.environ.get(ISA_ENV, "auto")
    name = str(requested).lower()
    if name not in ISA_CODES:
        raise ValueError(f"CPUAdamPower: unknown isa={requested!r}; choose one of {sorted(ISA_CODES)}")
    native = builder.load()
    if name == "auto":
        return ISA_NAMES[native.best_isa()]
    if not native.cpu_supports(isa=ISA_CODES[name]):
        raise ValueError(f"CPUAdamPower: isa={name!r} is not supported by this CPU (best: "
                         f"{ISA_NAMES[native.best_isa()]!r})")
    return name


@functools.cache
def native_available() -> bool:
    """True when the native kernel is installed or can be built here (it is then loaded; asked once)."""
    try:
        builder.load()
    except builder.NativeExtensionError:
        return False
    return True


def _layout_error(t, n: int, dtypes, name: str, owner: str) -> Exception | None:
    """Why the kernel cannot take `t` as n contiguous CPU elements of one of `dtypes` (an error to raise), or None."""
    if not isinstance(t, torch.Tensor):
        return TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        return TypeError(f"{owner}: {name} must be a CPU tensor, got one on {t.device}; move it with .cpu()")
    if t.dtype not in dtypes:
        allowed = [str(d).removeprefix("torch.") for d in dtypes]
        return TypeError(f"{owner}: {name} must be a {'/'.join(allowed)} tensor, got {t.dtype}; convert it with "
                         f".to(torch.{allowed[0]})")
    if not t.is_contiguous():
        return TypeError(f"{owner}: {name} must be contiguous, got strides {t.stride()} for shape "
                         f"{tuple(t.shape)}; pass {name}.contiguous()")
    if t.numel() != n:
        return ValueError(f"{owner}: {name} must have {n} elements (as the param), got {t.numel()} "
                          f"(shape {tuple(t.shape)}); pass a tensor shaped like the param")
    return None


def fits(t: torch.Tensor, n: int, dtypes=FP32) -> bool:
    """Whether the kernel can take `t` as n contiguous CPU elements of one of `dtypes` (what kernel_ptr checks;
    the same conditions as _layout_error, in one expression: it runs per tensor and step)."""
    return isinstance(t, torch.Tensor) and t.is_cpu and t.dtype in dtypes and t.is_contiguous() and t.numel() == n


def kernel_ptr(t: torch.Tensor, n: int, dtypes=FP32, *, name: str, owner: str) -> int:
    """t's data_ptr for the kernel, after checking that t is a contiguous CPU tensor of one of `dtypes` with
    exactly n elements (the kernel reads or writes n of them); TypeError/ValueError naming `name` otherwise."""
    if not fits(t, n, dtypes):
        raise _layout_error(t, n, dtypes, name, owner)
    return t.data_ptr()


def _chunks(n: int):
    for begin in range(0, n, CHUNK):
        yield begin, min(n, begin + CHUNK)


def _scratch(t: torch.Tensor) -> torch.Tensor | None:
    """The fp32 scratch chunk that widens a non-fp32 tensor t (None for an fp32 one, which needs none)."""
    return None if t.dtype == torch.float32 else torch.empty(min(CHUNK, t.numel()), dtype=torch.float32)


def _fp32_chunk(flat: torch.Tensor, scratch: torch.Tensor | None, begin: int, end: int) -> torch.Tensor:
    """flat[begin:end] in fp32: the slice itself without scratch, else widened into the scratch chunk."""
    if scratch is None:
        return flat[begin:end]
    work = scratch[: end - begin]
    work.copy_(flat[begin:end])
    return work


def _power_fp32_(t: torch.Tensor, p: float, eps: float, isa_code: int, threads: int) -> None:
    n = t.numel()
    ptr = kernel_ptr(t, n, name="t", owner="native_power_")
    builder.load().grad_power(src=ptr, dst=ptr, n=n, power=p, power_eps=eps, isa=isa_code, threads=threads)


def native_power_(t: torch.Tensor, p: float, eps: float = 0.0, isa: str | None = None,
                  num_threads: int | None = None) -> torch.Tensor:
    """phi_p in place on a contiguous CPU tensor (computed in fp32); returns t. p, eps must be validated."""
    if t.device.type != "cpu" or not t.is_contiguous() or not t.is_floating_point():
        raise TypeError(f"native_power_: needs a contiguous floating-point CPU tensor, got {t.dtype} on {t.device}")
    code, threads = ISA_CODES[resolve_isa(isa)], num_threads or torch.get_num_threads()
    if t.dtype == torch.float32:
        _power_fp32_(t, p, eps, code, threads)
        return t
    flat, scratch = t.view(-1), _scratch(t)
    for begin, end in _chunks(flat.numel()):
        work = _fp32_chunk(flat, scratch, begin, end)
        _power_fp32_(work, p, eps, code, threads)
        flat[begin:end].copy_(work)
    return t


def native_adam_power_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                           copy: torch.Tensor | None, *, step: float, lr: float, beta1: float, beta2: float,
                           eps: float, weight_decay: float, adam_w_mode: bool, power: float, power_eps: float,
                           bias_correction: bool, isa: str, num_threads: int, grad_scale: float = 1.0) -> None:
    """One fused phi_p + Adam(W) step of one tensor (step = its count after this step), on grad * grad_scale.

    exp_avg, exp_avg_sq: contiguous fp32 CPU tensors of one size; param: a contiguous
    fp32, bf16 or fp16 CPU tensor of that size (a bf16/fp16 one, as DeepSpeedCPUAdam takes
    them, is updated in fp32 registers and rounded back in place: in the kernel itself when
    its grad has its dtype, else widened chunk by chunk through fp32 scratch); grad: a CPU
    tensor of any float dtype and that size (one the kernel cannot read directly is widened
    through a bounded fp32 scratch chunk); copy: None or a contiguous bf16/fp16 CPU tensor of
    that size (None for a bf16/fp16 param, its own copy). Every buffer is checked before the
    kernel sees it (``kernel_ptr``); hyperparameters are the caller's to validate.
    """
    owner = "native_adam_power_step"
    n = param.numel()
    low_param = param.dtype in COPY_CODES
    if low_param and copy is not None:
        raise TypeError(f"{owner}: a {param.dtype} param receives its new weights itself; pass copy=None")
    if grad.numel() != n:
        raise ValueError(f"{owner}: grad must have {n} elements (as the param), got {grad.numel()}")
    if not grad.is_contiguous():  # rare (torch makes grads contiguous): one copy in grad's own dtype
        grad = grad.contiguous()
    bc1, bc2_sqrt = bias_corrections(beta1, beta2, step, bias_correction)
    kernel = builder.load().adam_power_step
    scalars = dict(one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2, eps=eps,
                   l2=0.0 if adam_w_mode else weight_decay, decay=1 - lr * weight_decay if adam_w_mode else 1.0,
                   step_size=lr / bc1, inv_bias_corr2_sqrt=1 / bc2_sqrt, power=power, power_eps=power_eps,
                   grad_scale=grad_scale, isa=ISA_CODES[isa], threads=num_threads)
    moments = dict(exp_avg=kernel_ptr(exp_avg, n, name="exp_avg", owner=owner),
                   exp_avg_sq=kernel_ptr(exp_avg_sq, n, name="exp_avg_sq", owner=owner))
    if grad.dtype == param.dtype and param.dtype in (torch.float32, *COPY_CODES):
        # the kernel reads and writes this layout itself: fp32 (with an optional bf16/fp16 copy), or bf16/fp16
        copy_code = 0 if copy is None else COPY_CODES.get(copy.dtype, 0)  # a bad copy: refused by kernel_ptr
        kernel(param=kernel_ptr(param, n, (param.dtype,), name="param", owner=owner),
               grad=kernel_ptr(grad, n, (param.dtype,), name="grad", owner=owner), **moments,
               param_dtype=COPY_CODES.get(param.dtype, 0),
               copy_out=0 if copy is None else kernel_ptr(copy, n, tuple(COPY_CODES), name="copy_out", owner=owner),
               copy_dtype=copy_code, n=n, **scalars)
        return
    # Otherwise fp32 chunks: the grad widened into scratch, and a bf16/fp16 param widened into scratch and
    # rounded back by the kernel's copy-out.
    kernel_ptr(param, n, (torch.float32, *COPY_CODES), name="param", owner=owner)
    out = param if low_param else copy
    if out is not None:
        kernel_ptr(out, n, tuple(COPY_CODES), name="copy_out", owner=owner)
    grad_flat, grad_scratch = grad.view(-1), _scratch(grad)
    param_flat, weight_scratch = param.view(-1), _scratch(param)
    for begin, end in _chunks(n):
        size = end - begin
        kernel(param=kernel_ptr(_fp32_chunk(param_flat, weight_scratch, begin, end), size, name="param",
                                owner=owner),
               grad=kernel_ptr(_fp32_chunk(grad_flat, grad_scratch, begin, end), size, name="grad", owner=owner),
               exp_avg=kernel_ptr(exp_avg.view(-1)[begin:end], size, name="exp_avg", owner=owner),
               exp_avg_sq=kernel_ptr(exp_avg_sq.view(-1)[begin:end], size, name="exp_avg_sq", owner=owner),
               param_dtype=0,
               copy_out=0 if out is None else kernel_ptr(out.view(-1)[begin:end], size, tuple(COPY_CODES),
                                                          name="copy_out", owner=owner),
               copy_dtype=0 if out is None else COPY_CODES[out.dtype], n=size, **scalars)


def native_stream_probe(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                        isa: str | None = None, num_threads: int | None = None) -> None:
    """The optimizer's memory traffic (read all four, write param, exp_avg, exp_avg_sq) with no real arithmetic: the
    bandwidth roofline for benchmarks. All four: contiguous fp32 CPU tensors of one size (their values change)."""
    n = param.numel()
    ptrs = {key: kernel_ptr(t, n, name=key, owner="native_stream_probe")
            for key, t in dict(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq).items()}
    builder.load().stream_probe(**ptrs, n=n, isa=ISA_CODES[resolve_isa(isa)],
                                threads=num_threads or torch.get_num_threads())
