"""The GradPower transform phi_p(g) = sign(g) * (|g| + eps)^p (arXiv 2505.24275).

This is the one PyTorch definition of phi: the AdamPower optimizer calls it, and
the native and GPU kernels are tested against it. p = 1 with eps = 0 is the
identity; eps = 1e-8 reproduces the authors' training code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .hyperparams import check_power

_WIDE = (torch.float32, torch.float64)


def _apply_(t: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    # Computed in float64 and rounded once: torch's vectorised fp32 pow rounds the
    # exponent to fp32, which moves |g|**p by up to ~4e-6 relative at extreme |g|.
    if p == 1.0 and eps == 0.0:
        return t
    work = t if t.dtype == torch.float64 else t.double()
    sign = work.sign()
    work = work.abs_() if work is t else work.abs()
    if eps:
        work.add_(eps)
    work.pow_(p).mul_(sign)
    return t if work is t else t.copy_(work)


def grad_power(t: torch.Tensor, p: float = 1.2, eps: float = 0.0) -> torch.Tensor:
    """Returns sign(t) * (|t| + eps)**p as a new tensor (t is left untouched).

    The reference definition: evaluated in float64 and rounded once to t's dtype.
    phi(0) = 0, NaN stays NaN and +-Inf stay +-Inf.
    """
    p, eps = check_power(p, eps)
    return _apply_(t.clone(), p, eps)


def grad_power_(t: torch.Tensor, p: float = 1.2, eps: float = 0.0) -> torch.Tensor:
    """In-place grad_power: overwrites t with sign(t) * (|t| + eps)**p and returns it."""
    p, eps = check_power(p, eps)
    return _apply_(t, p, eps)


def grad_power_foreach(tensors: Sequence[torch.Tensor], p: float, eps: float = 0.0) -> list[torch.Tensor]:
    """grad_power over a list with torch._foreach ops (one launch per op on CUDA); returns new tensors.

    Same formula as grad_power, evaluated in the tensors' own dtype (low-precision
    ones in fp32); torch's vectorised pow rounds p to fp32 there, a deviation of up
    to ~4e-6 relative for extreme |g| (~3e-7 for |g| in [1e-6, 1]).
    """
    p, eps = check_power(p, eps)
    tensors = list(tensors)
    if p == 1.0 and eps == 0.0:
        return [t.clone() for t in tensors]
    if any(t.dtype not in _WIDE for t in tensors):
        return [grad_power(t, p, eps) for t in tensors]
    signs = torch._foreach_sign(tensors)
    out = torch._foreach_abs(tensors)
    if eps:
        torch._foreach_add_(out, eps)
    torch._foreach_pow_(out, p)
    torch._foreach_mul_(out, signs)
    return out
