"""AdamPower's hyperparameters: their names, defaults and validation, and the per-step scalars derived from them.

The one home of these. ``POWER_NAMES`` is the one vocabulary of p: every user-facing name of
it (``power``, ``adam_power``, ``expert_power``), what it means for each optimizer, its
default, and its Megatron-LM flag; DeepSpeed's ``params`` (``gradpower_ds.deepspeed``), the
main job's settings and flags (``gradpower_ds.jobs.train_config``) and Megatron's flags,
``--gradpower-config`` keys and ``OptimizerConfig`` fields (``megatron_patches``) derive
from it, so each word means the same thing everywhere; an old name (``RENAMED``) is refused
with what replaced it. ``check_settings`` is the one check, made where values enter (an
optimizer's param group, grad_power's p, a DeepSpeed config's params, Megatron's config and
flags), so every entry point rejects the same bad input with the same message. Values are
checked once, where they enter, not on every step. ``RESUME_CHANGES`` / ``RESUME_POLICY`` are the one
resume policy (a changed optimizer setting at a resume: refused, or applied with a warning) and
``check_resume_changes`` its setting's check, for the optimizers, DeepSpeed's params, the main job and
Megatron.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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


RESUME_CHANGES = ("refuse", "apply")
"""What a resume does with an optimizer setting that differs from the saved run's: refuse it (the default), or apply
the new value with a warning naming old -> new (``resume_changes``; the main job's ``--resume_changes``, Megatron's
``--gradpower-resume-changes``)."""
RESUME_CHANGES_DEFAULT = "refuse"
RESUME_COMPARED = ("power", "power_eps", "betas", "eps", "weight_decay")
"""The param-group settings a load compares with the saved ones (a group's power is expert_power in MoE groups). lr is
not among them: the lr scheduler's own saved state sets lr on a resume."""
RESUME_POLICY = ("a resume keeps the saved run's settings: a changed optimizer setting is refused, naming the "
                 "setting, both values and the setting that accepts it; with resume_changes \"apply\" the new values "
                 "are used and a warning names each old -> new value")


POWER_RULE = (f"must be a finite number > 0 (1.0 is plain Adam; the paper's default is "
              f"{ADAM_POWER_DEFAULTS['power']:g})")
MUON_POWER_RULE = "must be a finite number > 0 (1.0 is plain Muon)"
MUON_POWER_GUIDANCE = (  # why MuonPower's power has no default (DeepSpeed, the main job, megatron_patches)
    "no default is set because the evidence disagrees: the GradPower paper uses p > 1 (1.2) with Adam, while a "
    "public Muon sweep (openai/parameter-golf PR #1682) found p = 0.9 best for Muon (0.85-0.925 a plateau, 1.2 "
    "worse than 1); 1.0 is plain Muon")
POWER_EPS_RULE = "must be a finite number >= 0 (0.0 is the paper's formula)"


REQUIRED = "required"  # a PowerUse default: no default, the user must choose (MUON_POWER_GUIDANCE says why)
SAME_AS_POWER = "power"  # a PowerUse default: the value of power
# where a name of p is taken: "optimizer" (a param group of the optimizer classes, and grad_power's p), "deepspeed" (a
# config's params; the main job trains through DeepSpeed, so its settings are these), "megatron" (flags and config)
STACKS = ("optimizer", "deepspeed", "megatron")


@dataclass(frozen=True)
class PowerUse:
    """What a name of p means for one optimizer: its default (a number, REQUIRED or SAME_AS_POWER), what it is,
    the range message of a bad value, and the integrations that take it."""

    default: float | str
    meaning: str
    rule: str = POWER_RULE
    stacks: tuple[str, ...] = STACKS


@dataclass(frozen=True)
class PowerName:
    """One user-facing name of p: the DeepSpeed ``params`` key and the main job's setting (``--name``), its
    Megatron-LM flag (whose dest is the ``OptimizerConfig`` field and the ``--gradpower-config`` key), and its
    use per optimizer ("adampower", "muonpower")."""

    name: str
    megatron_flag: str
    uses: dict[str, PowerUse] = field(default_factory=dict)

    @property
    def megatron_field(self) -> str:
        """The OptimizerConfig field and --gradpower-config key: the flag's dest ('gradpower_p')."""
        return self.megatron_flag.removeprefix("--").replace("-", "_")


POWER_NAMES = {entry.name: entry for entry in (
    PowerName("power", "--gradpower-p", {
        "adampower": PowerUse(ADAM_POWER_DEFAULTS["power"], "AdamPower's p (1.0 is Adam)"),
        "muonpower": PowerUse(REQUIRED, "MuonPower's p, applied before Muon's momentum (1.0 is Muon)",
                              MUON_POWER_RULE, stacks=("deepspeed", "megatron"))}),
    PowerName("adam_power", "--gradpower-p-adam", {
        "muonpower": PowerUse(ADAM_POWER_DEFAULTS["power"], "the p of MuonPower's auxiliary Adam, for what Muon "
                              "leaves to Adam (embeddings, output layer, norms, biases; 1.0 is Adam)",
                              stacks=("deepspeed", "megatron"))}),
    PowerName("expert_power", "--gradpower-p-expert", {
        "adampower": PowerUse(SAME_AS_POWER, "AdamPower's p for the MoE expert parameters (default: power)",
                              stacks=("deepspeed", "megatron")),
        "muonpower": PowerUse(SAME_AS_POWER, "MuonPower's p for the MoE expert matrices Muon updates (default: "
                                             "power)", MUON_POWER_RULE, stacks=("megatron",))}),
)}
RENAMED = {  # an old name -> why it is refused and what replaced it (no silent change of meaning)
    "muon_power": "muon_power was renamed power (with optimizer muonpower, power is MuonPower's p before Muon's "
                  "momentum, as in DeepSpeed's \"type\": \"MuonPower\" and Megatron's --gradpower-p); the auxiliary "
                  "Adam's p, which the main job used to call power there, is adam_power",
}


def power_names(optimizer: str, stack: str) -> tuple[str, ...]:
    """The names of p that `optimizer` takes in `stack` (one of STACKS), in POWER_NAMES' order."""
    return tuple(name for name, entry in POWER_NAMES.items()
                 if optimizer in entry.uses and stack in entry.uses[optimizer].stacks)


def check_settings(values: Mapping[str, object], optimizer: str = "adampower", stack: str = "optimizer",
                   owner: str = "", label: Callable[[str], str] = str) -> dict:
    """`values` with AdamPower's hyperparameters validated (as floats, bools, a betas tuple) and the p settings of
    `optimizer` in `stack` (power_names) resolved: the one check of every entry point's boundary.

    Its callers: the optimizer classes (each param group, stack "optimizer"), grad_power/grad_power_, the
    DeepSpeed config's params (``gradpower_ds.deepspeed.params``, through which the main job checks its
    settings too) and Megatron's config and flags (``megatron_patches.optimizer.checked_powers``). The
    hyperparameters of ADAM_POWER_DEFAULTS other than power are checked where present; every name of p the
    optimizer takes is checked where set and otherwise gets its default (a missing REQUIRED one is refused, with
    MUON_POWER_GUIDANCE); resume_changes is checked where present (check_resume_changes); other keys pass
    through. Names of p the optimizer does not take are the caller's to refuse (it knows how they were given).
    Messages read ``"{owner}: invalid {label(name)}={value}: {rule}"`` (``label`` spells a name as the user wrote
    it: a flag, a field): ValueError for a value out of range, TypeError for one of the wrong type.
    """
    prefix = f"{owner}: " if owner else ""
    out = dict(values)
    for name in ("lr", "eps", "weight_decay"):
        if name in values:
            out[name] = _checked(values[name], label(name), owner, lambda v: v >= 0.0, "must be a finite number >= 0")
    if "power_eps" in values:
        out["power_eps"] = _checked(values["power_eps"], label("power_eps"), owner, lambda e: e >= 0.0,
                                    POWER_EPS_RULE)
    if "betas" in values:
        betas = values["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{prefix}invalid {label('betas')}={betas!r}: must be a pair (beta1, beta2)")
        out["betas"] = tuple(_checked(beta, f"{label('betas')}[{i}]", owner, lambda b: 0.0 <= b < 1.0,
                                      "must be a finite number in [0, 1)") for i, beta in enumerate(betas))
    if "resume_changes" in values:
        out["resume_changes"] = check_resume_changes(values["resume_changes"], owner, label)
    for name in ("adam_w_mode", "bias_correction"):
        if name in values and not isinstance(values[name], bool):
            raise TypeError(f"{prefix}{label(name)} must be True or False, got {values[name]!r}")
    names = power_names(optimizer, stack)
    for name in names:  # the values given first, then the defaults (a bad value is named before a missing one)
        if values.get(name) is not None:
            out[name] = _checked(values[name], label(name), owner, lambda v: v > 0.0,
                                 POWER_NAMES[name].uses[optimizer].rule)
    for name in names:
        use = POWER_NAMES[name].uses[optimizer]
        if values.get(name) is not None:
            continue
        if use.default == REQUIRED:
            raise ValueError(f"{prefix}{optimizer} needs {label(name)}, {use.meaning}: {MUON_POWER_GUIDANCE}")
        out[name] = out["power"] if use.default == SAME_AS_POWER else float(use.default)
    return out


def check_resume_changes(value, owner: str = "", label: Callable[[str], str] = str) -> str:
    """`value` as a resume_changes setting (one of RESUME_CHANGES), else ValueError naming it: the one check of the
    setting, for the optimizers, a DeepSpeed config's params, the main job and Megatron's flag."""
    if value in RESUME_CHANGES:
        return value
    raise ValueError(f"{owner + ': ' if owner else ''}invalid {label('resume_changes')}={value!r}: must be one of "
                     f"{', '.join(RESUME_CHANGES)} ({RESUME_POLICY})")


def resume_changes_between(saved: Mapping[str, object], own: Mapping[str, object],
                           keys: tuple[str, ...] = RESUME_COMPARED) -> dict[str, tuple]:
    """{key: (saved value, own value)} for each of `keys` set in both mappings with different values (betas compared
    as a pair of floats): what a resume would change. A key missing from `saved` is no change (it is filled)."""
    def normal(value):
        return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else float(value)

    return {key: (saved[key], own[key]) for key in keys
            if key in saved and key in own and normal(saved[key]) != normal(own[key])}


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _checked(value, name: str, owner: str, in_range, rule: str) -> float:
    if _is_number(value) and in_range(value):
        return float(value)
    shown = f"{value:g}" if _is_number(value) or isinstance(value, float) else repr(value)
    error = ValueError if isinstance(value, Real) and not isinstance(value, bool) else TypeError
    raise error(f"{owner + ': ' if owner else ''}invalid {name}={shown}: {rule}")


def bias_corrections(beta1: float, beta2: float, step: float, enabled: bool) -> tuple[float, float]:
    """Returns (1 - beta1**step, sqrt(1 - beta2**step)), or (1, 1) with bias correction off."""
    if not enabled:
        return 1.0, 1.0
    return 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5
