"""The GradPower transform phi_p(g) = sign(g) * (|g| + eps)^p (arXiv 2505.24275).

Two functions, one definition:

- ``grad_power`` is the reference: evaluated in float64 and rounded once. Tests
  compare every implementation against it; no training step runs it.
- ``grad_power_`` is the hot path: in place, one pass, computed in fp32 (fp64 for
  fp64 tensors) for fp32/bf16/fp16 tensors alike, with no temporary larger than a
  bounded chunk. On the CPU it runs the native kernel (2.5e-7 relative to the
  reference over the whole fp32 range for p <= 2, 1e-6 for p <= 8; see csrc/fast_power.h), on CUDA the Triton kernel once it
  has passed its check on that GPU (``gradpower_ds.kernel_gate``), elsewhere
  chunked torch ops, whose fp32 pow rounds p to fp32: up to 5e-6 relative for
  extreme |g| (~1e-30 or ~1e30), 4e-7 for |g| in [1e-8, 1e2].

p = 1 with eps = 0 is the identity; eps = 1e-8 reproduces the authors' training
code. phi(+-0) = +-0 (also with eps), NaN stays NaN and +-Inf stay +-Inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import kernel_gate, torch_paths
from .hyperparams import ADAM_POWER_DEFAULTS, check_settings
from .ops import native_adam_power as native
from .ops import triton_adam_power as triton_ops

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grad_power(t: torch.Tensor, p: float = ADAM_POWER_DEFAULTS["power"], eps: float = 0.0) -> torch.Tensor:
    """Returns sign(t) * (|t| + eps)**p as a new tensor of t's dtype (t is left untouched): the reference.

    Evaluated in float64 and rounded once; it makes a float64 copy of t, so it is for
    tests and checks, not for training steps (use grad_power_ there).
    """
    p, eps = _checked(p, eps)
    if p == 1.0 and eps == 0.0:
        return t.clone()
    work = t.double()
    sign = work.sign()
    work = work.abs_() if work is not t else work.abs()
    if eps:
        work.add_(eps)
    return work.pow_(p).mul_(sign).to(t.dtype)


def grad_power_(tensors: torch.Tensor | Sequence[torch.Tensor], p: float = ADAM_POWER_DEFAULTS["power"],
                eps: float = 0.0, *, fused: bool | None = None):
    """Overwrites each tensor g with sign(g) * (|g| + eps)**p, fast; returns its argument.

    Takes one tensor or a sequence of them (any float dtype, any device). ``fused``
    picks the kernel as AdamPower's does, once per (device, dtype): None uses the native kernel for
    CPU tensors and the Triton one for CUDA tensors once it has passed its check on that GPU
    (``gradpower_ds.kernel_gate``), chunked torch ops otherwise; True requires the kernel (native on
    the CPU; Triton's interpreter on the CPU under TRITON_INTERPRET=1); False always uses torch ops.
    """
    p, eps = _checked(p, eps)
    if p == 1.0 and eps == 0.0:
        return tensors
    on_triton = []
    kernels: dict[tuple, str | None] = {}
    for t in [tensors] if torch.is_tensor(tensors) else tensors:
        if fused is not False and (t.device, t.dtype) not in kernels:  # fused=False: torch ops, nothing to choose
            kernels[t.device, t.dtype] = fused_kernel(t.device, fused, t.dtype) if t.dtype in _KERNEL_DTYPES else None
        kernel = kernels.get((t.device, t.dtype)) if t.is_contiguous() else None
        if fused and kernel is None:
            raise TypeError(f"grad_power_(fused=True): needs contiguous fp32/bf16/fp16 tensors, got "
                            f"{'' if t.is_contiguous() else 'non-contiguous '}{t.dtype} on {t.device}")
        if kernel == "native":
            native.native_power_(t, p, eps)
        elif kernel == "triton":
            on_triton.append(t)
        else:
            torch_paths.torch_power_(t, p, eps)
    if on_triton:
        triton_ops.triton_grad_power_(on_triton, p, eps)
    return tensors


def fused_kernel(device: torch.device, fused: bool | None, grad_dtype: torch.dtype = torch.float32) -> str | None:
    """The fused kernel for tensors on `device`: "native", "triton" or None (torch ops); the one home of that choice.

    fused=None: native on the CPU when it is built (or buildable), Triton on CUDA once it has passed
    its check there for `grad_dtype` grads (``gradpower_ds.kernel_gate``; GRADPOWER_TRITON overrides
    it). fused=True: the device's kernel or a RuntimeError saying why it
    cannot run (CPU tensors go to Triton's interpreter when TRITON_INTERPRET=1, for tests).
    """
    if fused is False:
        return None
    if device.type == "cpu":
        if fused and triton_ops.triton is not None and triton_ops._interpreting():
            return "triton"
        if fused:
            native.builder.load()  # raises NativeExtensionError saying how to build it
            return "native"
        return "native" if native.native_available() else None
    if device.type == "cuda":
        if fused:
            reason = triton_ops.triton_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"fused=True on CUDA tensors needs the Triton kernel, which cannot run: {reason}; "
                                   "pass fused=None or fused=False for the torch path")
            return "triton"
        return "triton" if kernel_gate.triton_is_default(device, grad_dtype) else None
    if fused:
        raise RuntimeError(f"fused=True: there is no fused kernel for {device.type} tensors; pass fused=None")
    return None


def _checked(p, eps) -> tuple[float, float]:
    """(p, eps) validated as an optimizer's power and power_eps are (hyperparams.check_settings), as floats."""
    checked = check_settings({"power": p, "power_eps": eps}, owner="grad_power")
    return checked["power"], checked["power_eps"]
