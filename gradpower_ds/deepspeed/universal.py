"""DeepSpeed's universal-checkpoint loads (``"checkpoint": {"load_universal": true}``) for AdamPower/CPUAdamPower.

Both of DeepSpeed's loaders (ZeRO-1/2 and bf16: ``ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir``;
ZeRO-3: ``DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``) copy the saved
param groups' settings over the optimizer's. Wrapped by ``register()``, they first read the saved groups
(``saved_groups``, ``weights_only=True``) and put them under the resume policy of every other load
(``optimizer_base.check_resume``: a changed power, betas, ... refused before anything is loaded, or under
``resume_changes="apply"`` kept at this optimizer's values with a warning); ZeRO-3's is also repaired
(``repair_zero3_load``). Other optimizers' loads are DeepSpeed's own.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import pickle

from ..adam_power import AdamPower
from ..cpu_adam_power import CPUAdamPower
from ..optimizer_base import check_resume, keep_own_settings
from ..versions import TESTED

# The classes DeepSpeed (0.18.0 through 0.19.8) pickles in a universal checkpoint's zero/optimizer_state.pt besides
# tensors, dtypes and plain containers: the ZeRO stage and the loss scaler (a DynamicLossScaler in fp16 runs).
# Found with torch.serialization.get_unsafe_globals_in_checkpoint on the universal checkpoints of every case of
# tests/jobs/ds_checkpoint.py; saved_groups unpickles these and nothing else (weights_only=True). DeepSpeed's own
# load of the same file just after it still uses weights_only=False: load universal checkpoints only from sources
# you trust.
UNIVERSAL_OPTIMIZER_STATE_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum",
                                     "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler")


def saved_groups(checkpoint_dir: str) -> list[dict]:
    """The optimizer param groups of the universal checkpoint `checkpoint_dir` (its zero/optimizer_state.pt, loaded
    with weights_only=True and UNIVERSAL_OPTIMIZER_STATE_GLOBALS): a RuntimeError where it pickles anything else."""
    import torch

    path = os.path.join(checkpoint_dir, "zero", "optimizer_state.pt")
    allowed = [getattr(importlib.import_module(module), name)
               for module, _, name in (dotted.rpartition(".") for dotted in UNIVERSAL_OPTIMIZER_STATE_GLOBALS)]
    try:
        with torch.serialization.safe_globals(allowed):
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise RuntimeError(f"{path} pickles more than tensors and gradpower_ds.deepspeed.universal."
                           f"UNIVERSAL_OPTIMIZER_STATE_GLOBALS, so it is not loaded: a DeepSpeed newer than "
                           f"{TESTED['deepspeed'][1]} may pickle more; add a class there only once you have checked "
                           f"it is DeepSpeed's. {error}") from error
    # ZeRO-1/2 and bf16 save the groups at the top level, ZeRO-3 inside its optimizer's state dict
    return saved["param_groups"] if "param_groups" in saved else saved["optimizer_state_dict"]["param_groups"]


@contextlib.contextmanager
def _under_policy(zero_optimizer, checkpoint_dir: str, zero3: bool):
    """Around one of DeepSpeed's universal loads into `zero_optimizer`: the resume policy, and ZeRO-3's repair."""
    optimizer = zero_optimizer.optimizer
    if not isinstance(optimizer, (AdamPower, CPUAdamPower)):
        yield
        return
    saved = saved_groups(checkpoint_dir)
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(f"universal checkpoint {checkpoint_dir} has {len(saved)} optimizer param groups, the model "
                         f"being loaded has {len(optimizer.param_groups)}: group the parameters as in the run that "
                         "saved it")
    owner, own = type(optimizer).__name__, optimizer.group_settings()
    changes = check_resume(owner, optimizer.resume_changes, saved, own)
    yield
    if zero3:
        repair_zero3_load(zero_optimizer, saved)
    keep_own_settings(owner, optimizer.param_groups, own, changes)


def loading_under_policy(original):
    """ZeRO-1/2's and bf16's universal load (``ZeROOptimizer.load_hp_checkpoint_state_from_checkpoint_dir``) under
    the resume policy."""

    @functools.wraps(original)
    def load(zero_optimizer, lp_groups_name, checkpoint_dir):
        with _under_policy(zero_optimizer, checkpoint_dir, zero3=False):
            original(zero_optimizer, lp_groups_name, checkpoint_dir)

    return load


def loading_zero3_under_policy(original):
    """ZeRO-3's universal load under the resume policy, then ``repair_zero3_load``."""

    @functools.wraps(original)
    def load(zero_optimizer, checkpoint_dir, *args):  # DeepSpeed before 0.17 passes param_shapes too
        with _under_policy(zero_optimizer, checkpoint_dir, zero3=True):
            original(zero_optimizer, checkpoint_dir, *args)

    return load


def repair_zero3_load(zero_optimizer, saved: list[dict]) -> None:
    """Repairs DeepSpeed's ZeRO-3 universal-checkpoint load (0.18.0 through 0.19.8) for AdamPower/CPUAdamPower.

    With more than one sub-group (several param groups, or ``sub_group_size``) DeepSpeed (a) puts one and the same
    ``step`` tensor into every sub-group's state, so a step advances it once per sub-group (our step counts live in
    the state, updated in place like torch's Adam), and (b) gives every param group the settings of group 0 (losing
    e.g. ``expert_power`` or a no-decay group). This gives each state its own step and each group its `saved`
    settings (the checkpoint's param groups, ``saved_groups``).
    """
    import torch

    optimizer = zero_optimizer.optimizer
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    for group, saved_group in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
