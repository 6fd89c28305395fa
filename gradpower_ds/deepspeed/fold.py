"""DeepSpeed ZeRO's passes around the optimizer step, done inside AdamPower's step instead (issue 33, item 5).

Around ``optimizer.step()`` ZeRO multiplies the fp32 grad partition by its unscale/clip coefficient
(``unscale_and_clip_grads``: 8 bytes per element) and, after it, copies the new fp32 weights into the
bf16/fp16 partition (6 bytes per element). With AdamPower those are folded into the step's own pass
(``gradpower_ds.folding``): the coefficient multiplies the grads in the kernel, the copy is the
kernel's copy-out. The results are bit for bit DeepSpeed's: the coefficient is computed by DeepSpeed's own
``unscale_and_clip_grads``, run on a one-element stand-in for the grads (so every version's formula, loss
scale and clip threshold hold), and the copy-out rounds as ``copy_`` does.

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``): the coefficient. Its copy-back and its bf16 -> fp32 grad
  conversion are written inline in its ``step()``, so they stay.
- ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): the coefficient, and the copy into the bf16/fp16 partition
  where that partition is on the fp32 partition's device (not with optimizer offload). Its bf16 -> fp32 grad
  conversion (``_prepare_fp32_grad_for_sub_group``) stays: replacing it would mean rewriting that method.

Only for an inner optimizer of ours (AdamPower, CPUAdamPower); any other optimizer gets DeepSpeed's code
unchanged, and so does ours under ``GRADPOWER_FOLD=0`` (``gradpower_ds.folding``).
"""

from __future__ import annotations

import functools
import logging

import torch

from .. import folding
from ..optimizer_base import AdamPowerBase

COPY_DTYPES = (torch.bfloat16, torch.float16)

_log = logging.getLogger(__name__)


def _ours(zero) -> AdamPowerBase | None:
    """The ZeRO optimizer's inner optimizer when it is ours and folding is on, else None."""
    optimizer = getattr(zero, "optimizer", None)
    return optimizer if isinstance(optimizer, AdamPowerBase) and folding.enabled() else None


def _log_once(zero, what: str) -> None:
    """One line per ZeRO optimizer (its first fold), so a job's log shows that the folds are in effect."""
    if not getattr(zero, "_gradpower_fold_logged", False):
        zero._gradpower_fold_logged = True
        _log.info("gradpower_ds: %s folds %s into %s's step", type(zero).__name__, what, type(zero.optimizer).__name__)


def unscale_and_clip_1_2(original):
    """ZeRO-1/2's ``unscale_and_clip_grads(grad_groups_flat, total_norm)``: for our optimizer, DeepSpeed's
    coefficient (its own code on a one-element stand-in of each grad's device) goes to the next step instead of a
    pass over the grads."""

    @functools.wraps(original)
    def unscale_and_clip(zero, grad_groups_flat, total_norm):
        optimizer = _ours(zero)
        if optimizer is None or not all(torch.is_tensor(g) for g in grad_groups_flat) or len(grad_groups_flat) != 1:
            return original(zero, grad_groups_flat, total_norm)
        probe = torch.ones(1, dtype=torch.float32, device=grad_groups_flat[0].device)
        result = original(zero, [probe], total_norm)
        optimizer.fold_into_next_step(grad_scale=probe)
        _log_once(zero, "the unscale/clip pass")
        return result

    return unscale_and_clip


def unscale_and_clip_3(original):
    """ZeRO-3's ``unscale_and_clip_grads(sub_group_id, total_norm)``, folded as ZeRO-1/2's: DeepSpeed's code runs on a
    sub-group list whose entry holds a one-element stand-in for the grads."""

    @functools.wraps(original)
    def unscale_and_clip(zero, sub_group_id, total_norm):
        optimizer = _ours(zero)
        if optimizer is None:
            return original(zero, sub_group_id, total_norm)
        flat = zero.fp32_partitioned_groups_flat
        stand_in = torch.zeros(1, dtype=torch.float32, device=flat[sub_group_id].grad.device)
        stand_in.grad = torch.ones_like(stand_in)
        zero.fp32_partitioned_groups_flat = [stand_in if i == sub_group_id else t for i, t in enumerate(flat)]
        try:
            result = original(zero, sub_group_id, total_norm)
        finally:
            zero.fp32_partitioned_groups_flat = flat
        optimizer.fold_into_next_step(grad_scale=stand_in.grad)
        return result

    return unscale_and_clip


def optimizer_step_3(original):
    """ZeRO-3's ``_optimizer_step(sub_group_id)``: for our optimizer, the bf16/fp16 partition becomes the step's
    copy-out where it sits beside the fp32 one (same device and shape), and is marked done for
    ``reassign_3``."""

    @functools.wraps(original)
    def optimizer_step(zero, sub_group_id):
        optimizer = _ours(zero)
        low = zero.fp16_partitioned_groups_flat[sub_group_id] if optimizer is not None else None
        fp32 = zero.fp32_partitioned_groups_flat[sub_group_id]
        fold = low is not None and not zero.offload_optimizer and low.dtype in COPY_DTYPES and \
            low.device == fp32.device and low.shape == fp32.shape and low.is_contiguous()
        if fold:
            optimizer.fold_into_next_step(copy_out={fp32: low})
        result = original(zero, sub_group_id)
        zero._gradpower_copied_sub_group = sub_group_id if fold else None
        if optimizer is not None:
            _log_once(zero, "the unscale/clip pass" + (" and the copy into the low-precision partition" if fold else ""))
        return result

    return optimizer_step


def reassign_3(original):
    """ZeRO-3's ``_reassign_or_swap_out_partitioned_parameters(sub_group_id)``: where the step wrote the
    low-precision partition itself (``optimizer_step_3``), only DeepSpeed's unflattening of it remains."""

    @functools.wraps(original)
    def reassign(zero, sub_group_id):
        if getattr(zero, "_gradpower_copied_sub_group", None) != sub_group_id:
            return original(zero, sub_group_id)
        zero._gradpower_copied_sub_group = None
        return zero._unflatten_partitioned_parameters(sub_group_id)

    return reassign
