"""Learning-rate schedules as multipliers of the peak lr (for torch.optim.lr_scheduler.LambdaLR).

Both start with a linear warmup. Warmup-stable-decay (WSD) then holds the peak and
decays linearly over the last `decay_fraction` of the steps, the schedule for which
the GradPower paper reports its largest gains; cosine decays over all remaining steps.

The decay ends at `min_ratio` *after* the last step (at step index `steps`), so every
one of the `steps` optimizer steps moves the weights: with ``min_ratio=0`` the last
step runs at a small positive lr, never at 0. Past the end (step >= steps) the
multiplier stays at the end value; it is never negative.
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, schedule: str, steps: int, warmup_steps: int, decay_fraction: float = 0.2,
                  min_ratio: float = 0.0) -> float:
    """The lr of optimizer step `step` (0-based) as a fraction of the peak lr; in [min_ratio, 1], never < 0."""
    if schedule not in ("wsd", "cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; choose wsd, cosine or constant")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio={min_ratio} must be in [0, 1]")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    # the decay runs from its first step to step index `steps` (one past the last step), where it reaches min_ratio
    decay_start = steps - int(round(decay_fraction * steps)) if schedule == "wsd" else warmup_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / (steps - decay_start + 1))
    if schedule == "wsd":
        value = 1.0 - (1.0 - min_ratio) * progress
    else:
        value = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, value)
