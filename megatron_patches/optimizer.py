"""AdamPower in megatron-core: ``OptimizerConfig(optimizer="adampower", gradpower_p=1.2, gradpower_p_expert=None)``.

megatron-core (the version in ``megatron_patches.SUPPORTED_MEGATRON_CORE``) knows
only ``'adam'`` and ``'sgd'``. ``megatron_patches.apply()`` makes three thin,
reversible changes, all listed in ``_patch_targets()``:

1. ``OptimizerConfig.__init__`` (and its subclass ``AdamOptimizerConfig``'s)
   accept ``gradpower_p`` (default 1.2) and ``gradpower_p_expert`` (default None:
   the same as ``gradpower_p``); every config has them as attributes;
2. ``OptimizerConfig.__post_init__`` validates them (p > 0, ValueError naming the
   field) when ``optimizer == "adampower"`` and runs Megatron's own checks as for
   ``'adam'`` (e.g. the precision-aware optimizer is allowed);
3. ``megatron.core.optimizer._get_megatron_optimizer_based_on_param_groups``, called
   once per chained optimizer (dense, then expert), builds the optimizer exactly
   as for ``'adam'`` and then registers a step pre-hook on the inner torch
   optimizer (TE/apex FusedAdam or torch AdamW) that overwrites each parameter's
   gradient g with phi_p(g) = sign(g)|g|^p (``gradpower_ds.power.grad_power_``).

Megatron's step is prepare_grads (copy to fp32 main grads, unscale, inf check)
-> grad norm -> clip -> inner ``optimizer.step()``, so the hook sees the clipped
fp32 main grads (``param.decoupled_grad`` with the precision-aware optimizer),
on this rank's shards under the distributed optimizer; a step skipped for an
inf/NaN gradient never reaches it. Param groups that Megatron marks
``is_expert_parallel`` use ``gradpower_p_expert``. The inner optimizer is
Megatron's unchanged Adam, so optimizer state and checkpoints keep Megatron's
format, and ``optimizer.config.optimizer`` stays ``"adampower"``.

Optimizers built while applied keep their hook after ``remove()``.
"""

from __future__ import annotations

import functools
import logging

from gradpower_ds.hyperparams import check_power
from gradpower_ds.power import grad_power_

OPTIMIZER_NAME = "adampower"
FIELDS = {"gradpower_p": 1.2, "gradpower_p_expert": None}

_log = logging.getLogger(__name__)


def powers(config) -> tuple[float, float]:
    """(dense p, expert p) of an ``optimizer="adampower"`` config, validated (ValueError/TypeError naming the field)."""
    dense = check_power(getattr(config, "gradpower_p", FIELDS["gradpower_p"]), owner="OptimizerConfig.gradpower_p")[0]
    expert = getattr(config, "gradpower_p_expert", None)
    if expert is None:
        return dense, dense
    return dense, check_power(expert, owner="OptimizerConfig.gradpower_p_expert")[0]


def power_hook(dense_p: float, expert_p: float):
    """A step pre-hook for a torch optimizer: grad <- phi_p(grad) per param group (expert groups: expert_p)."""

    def hook(optimizer, args, kwargs):
        decoupled = getattr(optimizer, "use_decoupled_grad", False)  # TE FusedAdam, precision-aware optimizer
        powered = 0
        for group in optimizer.param_groups:
            p = expert_p if group.get("is_expert_parallel", False) else dense_p
            if p == 1.0:
                continue
            for param in group["params"]:
                grad = getattr(param, "decoupled_grad", None) if decoupled else param.grad
                if grad is not None:
                    grad_power_(grad, p)
                    powered += 1
        if not hook.ran:  # once per optimizer: shows in a job's log that the hook sits on the optimizer that steps
            hook.ran = True
            _log.info("megatron_patches: AdamPower step hook ran on %s: phi_p (p=%g, expert p=%g) on %d "
                      "gradient(s)", type(optimizer).__name__, dense_p, expert_p, powered)

    hook.gradpower = (dense_p, expert_p)
    hook.ran = False
    return hook


def inner_optimizers(megatron_optimizer) -> list:
    """The torch optimizers inside a MegatronOptimizer (ChainedOptimizer: each chained one's); None-free."""
    chained = getattr(megatron_optimizer, "chained_optimizers", None)
    if chained is not None:
        return [o for c in chained for o in inner_optimizers(c)]
    inner = getattr(megatron_optimizer, "optimizer", None)
    return [] if inner is None else [inner]


def _config_init(original):
    @functools.wraps(original)
    def __init__(self, *args, gradpower_p=FIELDS["gradpower_p"], gradpower_p_expert=FIELDS["gradpower_p_expert"],
                 **kwargs):
        # set before the dataclass __init__, whose __post_init__ validates them
        self.gradpower_p, self.gradpower_p_expert = gradpower_p, gradpower_p_expert
        original(self, *args, **kwargs)

    return __init__


def _config_post_init(original):
    @functools.wraps(original)
    def __post_init__(self):
        if self.optimizer != OPTIMIZER_NAME:
            return original(self)
        powers(self)
        self.optimizer = "adam"  # Megatron's checks, as for the Adam it builds
        try:
            original(self)
        finally:
            self.optimizer = OPTIMIZER_NAME

    return __post_init__


def _build_optimizer(original):
    @functools.wraps(original)
    def build(config, *args, **kwargs):
        if config.optimizer != OPTIMIZER_NAME:
            return original(config, *args, **kwargs)
        dense_p, expert_p = powers(config)
        if config.optimizer_cpu_offload:
            raise ValueError("OptimizerConfig(optimizer='adampower') does not support optimizer_cpu_offload "
                             "(Megatron's HybridDeviceOptimizer) yet")
        config.optimizer = "adam"
        try:
            megatron_optimizer = original(config, *args, **kwargs)
        finally:
            config.optimizer = OPTIMIZER_NAME
        for inner in inner_optimizers(megatron_optimizer):
            inner.register_step_pre_hook(power_hook(dense_p, expert_p))
        _log.info("megatron_patches: AdamPower (gradpower_p=%g, gradpower_p_expert=%g) on %s", dense_p, expert_p,
                  type(megatron_optimizer).__name__)
        return megatron_optimizer

    return build


def _patch_targets():
    """(owner, attribute, wrapper factory) for each megatron-core attribute apply() replaces."""
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer.optimizer_config import AdamOptimizerConfig, OptimizerConfig

    return [(OptimizerConfig, "__init__", _config_init),
            (AdamOptimizerConfig, "__init__", _config_init),
            (OptimizerConfig, "__post_init__", _config_post_init),
            (mcore_optimizer, "_get_megatron_optimizer_based_on_param_groups", _build_optimizer)]


def _config_class():
    from megatron.core.optimizer.optimizer_config import OptimizerConfig

    return OptimizerConfig
