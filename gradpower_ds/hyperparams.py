"""AdamPower's hyperparameters: their defaults, their validation, and the per-step scalars derived from them.

The one home of these: the optimizer classes, ``grad_power``, DeepSpeed's ``params``
(``gradpower_ds.deepspeed``), Megatron's config fields and flags (``megatron_patches``)
and the main job's settings (``gradpower_ds.train_config``) take their defaults from
``ADAM_POWER_DEFAULTS`` and validate with ``check_power``/``check_group``, so every
entry point rejects the same bad input with the same message. Values are checked once,
where they enter (construction, config parsing), not on every step.
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


POWER_RULE = (f"must be a finite number > 0 (1.0 is plain Adam; the paper's default is "
              f"{ADAM_POWER_DEFAULTS['power']:g})")
MUON_POWER_RULE = "must be a finite number > 0 (1.0 is plain Muon)"
MUON_POWER_GUIDANCE = (  # why MuonPower's power has no default (DeepSpeed, the main job, megatron_patches)
    "no default is set because the evidence disagrees: the GradPower paper uses p > 1 (1.2) with Adam, while a "
    "public Muon sweep (openai/parameter-golf PR #1682) found p = 0.9 best for Muon (0.85-0.925 a plateau, 1.2 "
    "worse than 1); 1.0 is plain Muon")
POWER_EPS_RULE = "must be a finite number >= 0 (0.0 is the paper's formula)"


def check_power(power, power_eps=0.0, owner: str = "grad_power", name: str = "power",
                rule: str = POWER_RULE) -> tuple[float, float]:
    """Validates the GradPower exponent p (a finite number > 0) and its epsilon (>= 0); returns them as floats.

    The message is ``"{owner}: invalid {name}={value}: {rule}"`` (no prefix when owner is empty; MUON_POWER_RULE
    for the power before Muon's momentum): TypeError for a value that is not a number, ValueError for one out of
    range.
    """
    power = _checked(power, name, owner, lambda p: p > 0.0, rule)
    power_eps = _checked(power_eps, "power_eps", owner, lambda e: e >= 0.0, POWER_EPS_RULE)
    return power, power_eps


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _checked(value, name: str, owner: str, in_range, rule: str) -> float:
    if _is_number(value) and in_range(value):
        return float(value)
    shown = f"{value:g}" if _is_number(value) or isinstance(value, float) else repr(value)
    error = ValueError if isinstance(value, Real) and not isinstance(value, bool) else TypeError
    raise error(f"{owner + ': ' if owner else ''}invalid {name}={shown}: {rule}")


def check_group(group: dict, owner: str) -> None:
    """Validates one optimizer param group's AdamPower hyperparameters in place, as floats/bools (ValueError for a
    value out of range, TypeError for one of the wrong type, naming `owner` and the hyperparameter)."""
    for name in ("lr", "eps", "weight_decay"):
        group[name] = _checked(group[name], name, owner, lambda v: v >= 0.0, "must be a finite number >= 0")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{owner}: invalid betas={betas!r}: must be a pair (beta1, beta2)")
    group["betas"] = tuple(_checked(beta, f"betas[{i}]", owner, lambda b: 0.0 <= b < 1.0,
                                    "must be a finite number in [0, 1)") for i, beta in enumerate(betas))
    group["power"], group["power_eps"] = check_power(group["power"], group["power_eps"], owner)
    for name in ("adam_w_mode", "bias_correction"):
        if not isinstance(group[name], bool):
            raise TypeError(f"{owner}: {name} must be True or False, got {group[name]!r}")


def bias_corrections(beta1: float, beta2: float, step: float, enabled: bool) -> tuple[float, float]:
    """Returns (1 - beta1**step, sqrt(1 - beta2**step)), or (1, 1) with bias correction off."""
    if not enabled:
        return 1.0, 1.0
    return 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5
