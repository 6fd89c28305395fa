"""Validation and per-step scalars shared by every AdamPower implementation.

Keeping these in one place means the reference, foreach and native paths reject
the same bad input with the same message and derive the same bias corrections.
"""

from __future__ import annotations

import math
from numbers import Real

ADAM_POWER_DEFAULTS = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.0,
    adam_w_mode=True,
    power=1.2,
    power_eps=0.0,
    bias_correction=True,
)


def _number(name: str, value, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: invalid {name}={value}: must be finite")
    return value


def check_power(power, power_eps=0.0, owner: str = "grad_power") -> tuple[float, float]:
    """Validates the GradPower exponent p (> 0) and its epsilon (>= 0); returns them as floats."""
    power = _number("power", power, owner)
    if power <= 0.0:
        raise ValueError(f"{owner}: invalid power={power}: must be > 0 (1.0 is plain Adam, the paper uses 1.2)")
    power_eps = _number("power_eps", power_eps, owner)
    if power_eps < 0.0:
        raise ValueError(f"{owner}: invalid power_eps={power_eps}: must be >= 0 (0.0 is the paper's formula)")
    return power, power_eps


def check_group(group: dict, owner: str) -> None:
    """Validates one optimizer param group's AdamPower hyperparameters in place (ValueError/TypeError)."""
    for name in ("lr", "eps", "weight_decay"):
        value = _number(name, group[name], owner)
        if value < 0.0:
            raise ValueError(f"{owner}: invalid {name}={value}: must be >= 0")
        group[name] = value
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{owner}: invalid betas={betas!r}: must be a pair (beta1, beta2)")
    checked = []
    for i, beta in enumerate(betas):
        beta = _number(f"betas[{i}]", beta, owner)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{owner}: invalid betas[{i}]={beta}: must be in [0, 1)")
        checked.append(beta)
    group["betas"] = tuple(checked)
    group["power"], group["power_eps"] = check_power(group["power"], group["power_eps"], owner)
    for name in ("adam_w_mode", "bias_correction"):
        if not isinstance(group[name], bool):
            raise TypeError(f"{owner}: {name} must be True or False, got {group[name]!r}")


def bias_corrections(beta1: float, beta2: float, step: float, enabled: bool) -> tuple[float, float]:
    """Returns (1 - beta1**step, sqrt(1 - beta2**step)), or (1, 1) with bias correction off."""
    if not enabled:
        return 1.0, 1.0
    return 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5
