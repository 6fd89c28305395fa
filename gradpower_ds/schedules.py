"""Learning-rate schedules as multipliers of the peak lr (for torch.optim.lr_scheduler.LambdaLR).

Both start with a linear warmup. Warmup-stable-decay (WSD) then holds the peak and
decays linearly over the last `decay_fraction` of the steps, the schedule for which
the GradPower paper reports its largest gains; cosine decays over all remaining steps.
"""

from __future__ import annotations

import math


def lr_multiplier(step: int, schedule: str, steps: int, warmup_steps: int, decay_fraction: float = 0.2,
                  min_ratio: float = 0.0) -> float:
    """The lr of optimizer step `step` (0-based) as a fraction of the peak lr."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_start = steps - int(round(decay_fraction * steps))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start + 1) / max(1, steps - decay_start)
        return 1.0 - (1.0 - min_ratio) * progress
    if schedule == "cosine":
        progress = (step - warmup_steps + 1) / max(1, steps - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; choose wsd, cosine or constant")
