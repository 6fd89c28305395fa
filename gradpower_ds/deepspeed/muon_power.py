"""MuonPower in DeepSpeed: ``"optimizer": {"type": "MuonPower", "params": {..., "power": P, "adam_power": Q}}``.

GradPower on Muon: phi_P(g) = sign(g) * |g|**P is applied to the gradient of each Muon-updated matrix before
Muon's momentum and Newton-Schulz orthogonalisation, which are DeepSpeed's own, unchanged. The auxiliary Adam
(embeddings, head, norms, biases) is AdamPower with power Q (DeepSpeed's own auxiliary Adam where Q = 1, so
P = Q = 1 is DeepSpeed's "Muon" bit for bit).

How it reaches DeepSpeed (0.19.8): Muon's update runs in ``original_muon.muon_update(grad, momentum, ...)``,
called by the optimizer's own ``step`` at ZeRO stage 0 and, under ZeRO or the bf16 wrapper, by five methods of
DeepSpeed's stage code (``MUON_CALLERS``), which import it when they run. ``muon_update`` is given no param
group, so the power travels in a context variable: ``MuonPower.step`` and each of those callers, when their
optimizer is a MuonPower, set it; the wrapped ``muon_update`` then applies phi in place to the gradient it is
handed (DeepSpeed's Nesterov blend overwrites that gradient in place next) and is DeepSpeed's own for every
other optimizer. Those patches (``MUON_PATCHES``) load DeepSpeed's Muon, which takes seconds, so they are
applied when a MuonPower is first built, not by ``register()``; ``unregister()`` removes them.

DeepSpeed hands ``muon_update`` the averaged gradient after gradient accumulation, before clipping (DeepSpeed
clips the orthogonalised update), and under fp16 loss-scaled: phi is not scale-free, so MuonPower refuses fp16.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging

from ..adam_power import AdamPower
from ..cpu_adam_power import CPUAdamPower
from ..hyperparams import RESUME_CHANGES_DEFAULT, RESUME_COMPARED, check_resume_changes
from ..optimizer_base import check_resume, keep_own_settings
from ..patching import Extend, Package, PatchSet, Wrap
from ..power import grad_power_
from ..versions import TESTED
from .params import split_params

NAME = "muonpower"
MUON_POWER_FROM = "0.19.8"  # the DeepSpeed whose Muon internals these patches are written and tested against
DEEPSPEED_MUON = Package("DeepSpeed", "deepspeed", "deepspeed", MUON_POWER_FROM, TESTED["deepspeed"][1])
CLIPPING_WARNING = (
    "under ZeRO, DeepSpeed's gradient_clipping clips Muon's orthogonalised update, not the gradient, by the global "
    "norm of all updates, which those updates dominate (each has a norm of about sqrt(min(rows, cols))), so Muon's "
    "steps shrink by that global norm over the clipping value (on the quickstart model Muon's validation loss "
    "stalled at 2.46 with clipping 1.0 and reached 1.83 without, at step 150); Muon's update is normalised already")
MUON_CALLERS = (
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "get_flat_partition"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "_apply_muon_updates_cpu_offload"),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "_muon_update_sub_group"),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", "_apply_muon_updates_cpu_offload"),
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "_prepare_muon_updates"),
)
"""The methods of DeepSpeed's stage code that call muon_update (module, class, method)."""
RESUME_COMPARED_MUON = (*RESUME_COMPARED, "momentum")
"""The param-group settings a MuonPower load compares with the saved ones (optimizer_base.check_resume): a Muon group's
power (MuonPower's ``power``), momentum and weight_decay; an auxiliary group's Adam settings and adam_power."""

_POWER: contextvars.ContextVar[float | None] = contextvars.ContextVar("gradpower_ds_muon_power", default=None)
_log = logging.getLogger(__name__)


@contextlib.contextmanager
def _power_in_effect(power: float):
    token = _POWER.set(power)
    try:
        yield
    finally:
        _POWER.reset(token)


def _muon_update_with_power(original):
    """DeepSpeed's muon_update, preceded by phi in place on `grad` while a MuonPower's power is in effect."""

    @functools.wraps(original)
    def muon_update(grad, momentum, *args, **kwargs):
        power = _POWER.get()
        if power is not None:
            grad_power_(grad, power)  # keeps inf/NaN, so DeepSpeed still sees an overflow
        return original(grad, momentum, *args, **kwargs)

    return muon_update


def _with_optimizers_power(original):
    """A ZeRO/bf16 wrapper method that calls muon_update, run with its optimizer's MuonPower power in effect."""

    @functools.wraps(original)
    def method(wrapper, *args, **kwargs):
        power = getattr(wrapper.optimizer, "muon_power", None)
        if power is None:
            return original(wrapper, *args, **kwargs)
        with _power_in_effect(power):
            return original(wrapper, *args, **kwargs)

    return method


def _muon_patches() -> list:
    """What building a MuonPower changes in DeepSpeed, in order (see the module docstring)."""
    import importlib

    from deepspeed.runtime.zero import utils as zero_utils
    from deepspeed.runtime.zero.muon import muon_optimizer, original_muon

    callers = [Wrap(getattr(importlib.import_module(module), cls), method, _with_optimizers_power)
               for module, cls, method in MUON_CALLERS]
    return [
        Extend(zero_utils.ZERO_SUPPORTED_OPTIMIZERS, (muon_power_class(),),
               "deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS"),
        Wrap(original_muon, "muon_update", _muon_update_with_power),
        Wrap(muon_optimizer, "muon_update", _muon_update_with_power),  # stage 0's step bound it at import
        *callers,
    ]


MUON_PATCHES = PatchSet("gradpower_ds MuonPower", DEEPSPEED_MUON,
                        "it hooks DeepSpeed's Muon, which exists from 0.17.6, at its 0.19.8 call sites", _muon_patches)


@functools.cache
def muon_power_class() -> type:
    """The MuonPower optimizer class: DeepSpeed's MuonWithAuxAdam with phi before Muon's momentum (built on first
    use, since importing DeepSpeed's Muon compiles its kernels)."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    class MuonPower(MuonWithAuxAdam):
        """DeepSpeed's MuonWithAuxAdam whose Muon update starts from phi_power(grad) (``muon_power``).

        ZeRO and DeepSpeed's bf16 wrapper recognise it as Muon (a subclass whose name contains "muon"); DeepSpeed
        builds it from ``"type": "MuonPower"`` after ``gradpower_ds.deepspeed.register()``.
        """

        def __init__(self, param_groups, power: float, adam_optimizer=None, adam_optimizer_kwargs=None,
                     adam_w_mode=True, fallback_to_inline=False, resume_changes: str = RESUME_CHANGES_DEFAULT):
            self.muon_power = power  # validated where the config entered (params.split_params)
            self.resume_changes = check_resume_changes(resume_changes, "MuonPower")
            super().__init__(param_groups, adam_optimizer=adam_optimizer, adam_optimizer_kwargs=adam_optimizer_kwargs,
                             adam_w_mode=adam_w_mode, fallback_to_inline=fallback_to_inline)
            for group in self.param_groups:  # saved with the checkpoint, for the resume policy; steps use muon_power
                if group["use_muon"]:
                    group["power"] = power

        def step(self, closure=None, step_id=None):
            """DeepSpeed's Muon step (stage 0 runs muon_update in it), with this optimizer's power in effect."""
            with _power_in_effect(self.muon_power):
                return super().step(closure, step_id)

        def load_state_dict(self, state_dict):
            """DeepSpeed's load, under the resume policy (``optimizer_base.check_resume`` on RESUME_COMPARED_MUON): a
            changed power, momentum or Adam setting is refused before anything is loaded, or with
            ``resume_changes="apply"`` this optimizer's values are kept, with a warning. A checkpoint that records
            no Muon power (saved before MuonPower recorded it) is not compared on it; DeepSpeed's own auxiliary Adam
            counts as power 1.0."""
            own = [_compared(group) for group in self.param_groups]
            saved = [_compared(group) for group in state_dict.get("param_groups", [])]
            changes = check_resume("MuonPower", self.resume_changes, saved, own, RESUME_COMPARED_MUON)
            super().load_state_dict(state_dict)
            for group in self.param_groups:
                if group["use_muon"]:
                    group.setdefault("power", self.muon_power)
            keep_own_settings("MuonPower", self.param_groups, own, changes)

    return MuonPower


def _compared(group: dict) -> dict:
    """A MuonPower param group's settings the resume policy compares (an auxiliary group without a power is
    DeepSpeed's own Adam: 1.0)."""
    settings = {key: group[key] for key in RESUME_COMPARED_MUON if key in group}
    if not group.get("use_muon", False):
        settings.setdefault("power", 1.0)
    return settings


def muon_power_settings(params: dict | None) -> tuple[dict, float, float]:
    """Splits a ``"type": "MuonPower"`` config's ``params`` into (DeepSpeed Muon's params, power, adam_power).

    ``power`` is required (``hyperparams.MUON_POWER_GUIDANCE``); ``adam_power`` defaults to AdamPower's default.
    ValueError for a missing power, a power <= 0 or an unknown key, naming it (``params.split_params``).
    """
    muon, powers = split_params(NAME, params)
    return muon, powers["power"], powers["adam_power"]


def build_for_engine(engine, model_parameters, use_cpu_kernel: bool):
    """The MuonPower for a DeepSpeed engine whose config names it, built as DeepSpeed builds its Muon (DeepSpeed's
    param-group split into Muon and Adam halves, its MoE split), with AdamPower (the native CPUAdamPower where
    `use_cpu_kernel`) as the auxiliary Adam unless adam_power is 1.

    Applies MUON_PATCHES first (UnsupportedVersionError on a DeepSpeed other than DEEPSPEED_MUON's range).
    ValueError for fp16, or a model without a Muon-updated matrix.
    """
    params, power, adam_power = muon_power_settings(engine.optimizer_params())
    MUON_PATCHES.apply()
    if engine.fp16_enabled():
        raise ValueError("DeepSpeed optimizer 'MuonPower' cannot run with \"fp16\": DeepSpeed hands Muon loss-scaled "
                         "gradients, and phi is not scale-free; use \"bf16\": {\"enabled\": true} or fp32")
    adam_w_mode = params.pop("adam_w_mode", True)
    resume_changes = params.pop("resume_changes", RESUME_CHANGES_DEFAULT)
    if adam_power == 1.0:  # DeepSpeed's own choice of auxiliary Adam, as for "type": "Muon"
        adam_class, adam_kwargs = engine.get_optimizer_configuration(params, adam_w_mode, allow_legacy_fallback=True)
    else:
        adam_class = CPUAdamPower if use_cpu_kernel else AdamPower
        adam_kwargs = dict(power=adam_power, adam_w_mode=adam_w_mode)
    groups = engine._muon_param_groups(model_parameters, params)
    if not any(group["use_muon"] for group in groups):
        raise ValueError("DeepSpeed optimizer 'MuonPower': the model has no parameter for Muon (DeepSpeed gives Muon "
                         "the matrices of 2 or more dimensions whose names contain neither \"embed\" nor "
                         "\"lm_head\"); use \"type\": \"AdamPower\" for this model")
    if engine.has_moe_layers:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer = muon_power_class()(groups, power, adam_optimizer=adam_class, adam_optimizer_kwargs=adam_kwargs,
                                   adam_w_mode=adam_w_mode, resume_changes=resume_changes,
                                   fallback_to_inline=adam_class is not None and adam_class.__name__ == "FusedAdam")
    if engine.global_rank == 0 and engine.gradient_clipping() > 0 and engine.zero_optimization_stage() > 0:
        _log.warning("gradpower_ds: MuonPower with \"gradient_clipping\": %g: %s; set it to 0 unless this is meant "
                     "(DeepSpeed's own \"Muon\" does the same)", engine.gradient_clipping(), CLIPPING_WARNING)
    if engine.global_rank == 0:
        aux = type(optimizer.aux_optimizer).__name__ if optimizer.aux_optimizer is not None else "inline Adam"
        _log.info("gradpower_ds: MuonPower built (power %g on %d Muon matrices; auxiliary %s, adam_power %g)", power,
                  sum(len(g["params"]) for g in groups if g["use_muon"]), aux, adam_power)
    return optimizer


def tag_muon_parameters(original):
    """deepspeed.set_optimizer_flags that tags parameters for MuonPower exactly as for DeepSpeed's Muon (which it
    does only for the optimizer name "muon")."""

    @functools.wraps(original)
    def set_optimizer_flags(config_class, model):
        if config_class.optimizer_name != NAME:
            return original(config_class, model)
        config_class.optimizer_name = "muon"
        try:
            return original(config_class, model)
        finally:
            config_class.optimizer_name = NAME

    return set_optimizer_flags
