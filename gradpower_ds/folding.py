"""A wrapper's passes around an optimizer step, done inside the step's own pass instead.

DeepSpeed's ZeRO and Megatron multiply the grads by an unscale/clip coefficient before the inner optimizer's
``step()`` and copy the new weights into a low-precision copy after it: two more passes over memory. An optimizer
with ``FoldsIntoStep`` takes both into its next step (``fold_into_next_step``), where the kernel multiplies the
grads it reads and writes the copy it is given, bit for bit as the separate passes would
(``gradpower_ds.functional.adam_power``'s ``grad_scale`` and ``low_precision_params``). The patches that ask for it
live with their framework: ``gradpower_ds.deepspeed.fold``, ``megatron_patches.optimizer``.

``GRADPOWER_FOLD=0`` turns every fold off (the frameworks' own passes, the same results): the switch to try
first if a step with AdamPower inside DeepSpeed or Megatron is ever suspected.
"""

from __future__ import annotations

import os

import torch

ENV = "GRADPOWER_FOLD"


def enabled() -> bool:
    """GRADPOWER_FOLD: unset or 1 folds, 0 does not; any other value raises saying so."""
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: set 1 (fold DeepSpeed's and Megatron's unscale/clip and copy passes into "
                         "AdamPower's step, the default) or 0 (their own passes)")
    return value == "1"


def _nothing_folded() -> dict:
    """The folds of a step that was asked none: no grad scale, no copies."""
    return {"grad_scale": None, "copy_out": {}}


class FoldsIntoStep:
    """Mixin for an optimizer whose step can take a wrapper's grad scale and copy-out (see the module docstring)."""

    def fold_into_next_step(self, *, grad_scale: float | torch.Tensor | None = None,
                            copy_out: dict[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Has the next step() do in its own pass what a wrapper would do around it, with the same result bit for bit.

        grad_scale: every grad that step reads is multiplied by it first (the wrapper's unscale/clip coefficient: a
        positive float, or a one-element fp32 tensor on the grads' device) instead of by a pass over the grads
        before it; copy_out: {param: a bf16/fp16 tensor of its shape} receiving its new weights (the wrapper's
        low-precision copy) instead of a copy after it. Both hold for the next step() only; calls before it add up.
        """
        folded = self.__dict__.setdefault("_folded", _nothing_folded())
        if grad_scale is not None:
            folded["grad_scale"] = grad_scale
        folded["copy_out"].update({id(p): copy for p, copy in (copy_out or {}).items()})

    def _take_folded(self) -> tuple[float | torch.Tensor | None, dict[int, torch.Tensor]]:
        """What fold_into_next_step asked of this step: (grad_scale, {id(param): copy}); cleared for the next."""
        folded = self.__dict__.pop("_folded", None) or _nothing_folded()
        return folded["grad_scale"], folded["copy_out"]
