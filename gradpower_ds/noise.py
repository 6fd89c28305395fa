"""Gradient noise, measured from gradients a data-parallel job already has (issue 18: which p suits a run).

- The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model of
  Large-Batch Training", appendix A): G is the true gradient, Sigma the per-example gradient covariance.
  From the squared norm of a gradient averaged over a small batch (``b_small`` examples, e.g. one rank's
  micro-batch) and over a big one (``b_big``, e.g. the global batch), E|g_b|^2 = |G|^2 + tr(Sigma) / b gives the
  unbiased estimates ``noise_terms`` returns. Each is noisy for one step; the paper smooths numerator and
  denominator separately and divides (``NoiseScale``).
- The per-coordinate signal-to-noise ratio |E g| / std(g) across the gradients of several batches (one row each),
  the quantity GradPower's analysis turns on: ``coordinate_snr``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def noise_terms(small_sq_norm: float, b_small: float, big_sq_norm: float, b_big: float) -> tuple[float, float]:
    """Unbiased estimates (|G|^2, tr Sigma) from |g_small|^2, the squared norm of a gradient averaged over `b_small`
    examples (for lower variance: the mean of several such squared norms), and |g_big|^2 over `b_big` > `b_small`.

    ValueError unless 0 < b_small < b_big.
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"noise_terms: needs 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_sq = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
    trace = (small_sq_norm - big_sq_norm) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


class NoiseScale:
    """B_simple from noisy per-step terms: exponential moving averages of |G|^2 and tr Sigma (weight `decay` on the
    past), divided. ``update`` takes one step's terms; ``value`` is None until |G|^2's average is positive."""

    def __init__(self, decay: float = 0.95):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"NoiseScale: invalid decay={decay!r}: must be in [0, 1)")
        self.decay = decay
        self.grad_sq = self.trace = None

    def update(self, grad_sq: float, trace: float) -> float | None:
        """Folds one step's (|G|^2, tr Sigma) estimates in; returns the current B_simple."""
        if not (math.isfinite(grad_sq) and math.isfinite(trace)):
            raise ValueError(f"NoiseScale.update: non-finite terms ({grad_sq}, {trace})")
        if self.grad_sq is None:
            self.grad_sq, self.trace = grad_sq, trace
        else:
            self.grad_sq = self.decay * self.grad_sq + (1.0 - self.decay) * grad_sq
            self.trace = self.decay * self.trace + (1.0 - self.decay) * trace
        return self.value

    @property
    def value(self) -> float | None:
        """tr Sigma / |G|^2 of the averages (None while |G|^2's average is not positive)."""
        if self.grad_sq is None or self.grad_sq <= 0.0:
            return None
        return self.trace / self.grad_sq

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a resumed run continues the same averages."""
        return {"decay": self.decay, "grad_sq": self.grad_sq, "trace": self.trace}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.grad_sq, self.trace = state["decay"], state["grad_sq"], state["trace"]


def coordinate_snr(samples: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Per coordinate, |mean| / std over the rows of `samples` (k >= 2 gradients of the same coordinates, one per
    batch; std with Bessel's correction), in float64; inf where std is 0 and the mean is not, 0 where both are."""
    rows = torch.stack(list(samples)) if not torch.is_tensor(samples) else samples
    if rows.dim() != 2 or rows.shape[0] < 2:
        raise ValueError(f"coordinate_snr: needs a (k >= 2, n) tensor of k gradients, got shape {tuple(rows.shape)}")
    rows = rows.double()
    mean, std = rows.mean(0).abs(), rows.std(0, unbiased=True)
    return torch.where(std > 0, mean / std.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.where(mean > 0, torch.full_like(mean, math.inf), torch.zeros_like(mean)))
