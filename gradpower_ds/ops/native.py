"""Tensor-level entry points of the native CPU kernel (gradpower_ds/csrc, built by ops/builder.py).

Two operations, both one pass over memory on OpenMP threads with AVX-512 / AVX2 /
scalar code picked at run time:

- ``native_power_``: phi_p in place on a CPU tensor (fp32 directly; bf16/fp16 and
  fp64 through a bounded fp32 scratch chunk);
- ``native_adam_power_step``: phi_p + Adam(W) fused over one fp32 param and its
  fp32 moments (a bf16/fp16 gradient is widened chunk by chunk), optionally
  writing the new weights into a bf16/fp16 copy in the same pass.

Native phi matches the float64 reference to 2e-7 relative over the whole fp32
range (tests/test_native_kernel.py). This module imports no optimizer, so the
functional core and the optimizers can both use it.
"""

from __future__ import annotations

import functools
import os

import torch

from ..hyperparams import bias_corrections, check_power
from . import builder

ISA_CODES = {"auto": -1, "scalar": 0, "avx2": 1, "avx512": 2}
ISA_NAMES = {code: name for name, code in ISA_CODES.items()}
ISA_ENV = "GRADPOWER_CPU_ISA"
COPY_CODES = {torch.bfloat16: 1, torch.float16: 2}
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
    if not native.cpu_supports(ISA_CODES[name]):
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


def is_fp32_cpu(t: torch.Tensor) -> bool:
    """Whether `t` is a contiguous fp32 CPU tensor, the layout the kernel works on directly."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _chunks(n: int):
    for begin in range(0, n, CHUNK):
        yield begin, min(n, begin + CHUNK)


def native_power_(t: torch.Tensor, p: float, eps: float = 0.0, isa: str | None = None,
                  num_threads: int | None = None) -> torch.Tensor:
    """phi_p in place on a contiguous CPU tensor (computed in fp32); returns t. p, eps must be validated."""
    if t.device.type != "cpu" or not t.is_contiguous() or not t.is_floating_point():
        raise TypeError(f"native_power_: needs a contiguous floating-point CPU tensor, got {t.dtype} on {t.device}")
    code, threads = ISA_CODES[resolve_isa(isa)], num_threads or torch.get_num_threads()
    power = builder.load().grad_power
    if t.dtype == torch.float32:
        power(t.data_ptr(), t.data_ptr(), t.numel(), p, eps, code, threads)
        return t
    flat = t.view(-1)
    scratch = torch.empty(min(CHUNK, flat.numel()), dtype=torch.float32)
    for begin, end in _chunks(flat.numel()):
        work = scratch[: end - begin]
        work.copy_(flat[begin:end])
        power(work.data_ptr(), work.data_ptr(), work.numel(), p, eps, code, threads)
        flat[begin:end].copy_(work)
    return t


def native_grad_power(t: torch.Tensor, p: float, eps: float = 0.0, isa: str | None = None,
                      num_threads: int | None = None) -> torch.Tensor:
    """phi_p(t) from the native kernel as a new fp32 tensor; for tests and benchmarks."""
    p, eps = check_power(p, eps)
    if not is_fp32_cpu(t):
        raise TypeError(f"native_grad_power: input must be a contiguous fp32 CPU tensor, got {t.dtype} on {t.device}")
    return native_power_(t.clone(), p, eps, isa, num_threads)


def native_adam_power_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                           copy: torch.Tensor | None, *, step: float, lr: float, beta1: float, beta2: float,
                           eps: float, weight_decay: float, adam_w_mode: bool, power: float, power_eps: float,
                           bias_correction: bool, isa: str, num_threads: int) -> None:
    """One fused phi_p + Adam(W) step of one tensor (step = its count after this step); layouts checked by the caller.

    param, exp_avg, exp_avg_sq: contiguous fp32 CPU; grad: any float dtype of the same
    shape (a bf16/fp16/fp64 one is widened through a bounded fp32 scratch chunk);
    copy: None or a contiguous bf16/fp16 CPU tensor shaped like param.
    """
    bc1, bc2_sqrt = bias_corrections(beta1, beta2, step, bias_correction)
    kernel = builder.load().adam_power_step
    copy_code = COPY_CODES[copy.dtype] if copy is not None else 0
    scalars = dict(one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2, eps=eps,
                   l2=0.0 if adam_w_mode else weight_decay, decay=1 - lr * weight_decay if adam_w_mode else 1.0,
                   step_size=lr / bc1, inv_bias_corr2_sqrt=1 / bc2_sqrt, power=power, power_eps=power_eps,
                   isa=ISA_CODES[isa], threads=num_threads)

    def run(begin: int, end: int, grad_ptr: int) -> None:
        copy_ptr = copy.data_ptr() + 2 * begin if copy is not None else 0
        kernel(param.data_ptr() + 4 * begin, grad_ptr, exp_avg.data_ptr() + 4 * begin,
               exp_avg_sq.data_ptr() + 4 * begin, copy_ptr, copy_code, end - begin, **scalars)

    if not grad.is_contiguous():  # rare (torch makes grads contiguous): one copy in grad's own dtype
        grad = grad.contiguous()
    if grad.dtype == torch.float32:
        run(0, param.numel(), grad.data_ptr())
        return
    flat = grad.view(-1)
    scratch = torch.empty(min(CHUNK, param.numel()), dtype=torch.float32)
    for begin, end in _chunks(param.numel()):
        work = scratch[: end - begin]
        work.copy_(flat[begin:end])
        run(begin, end, work.data_ptr())
