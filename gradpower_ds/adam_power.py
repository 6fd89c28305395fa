"""AdamPower: Adam(W) fed with the GradPower-transformed gradient phi_p(g).

The optimizer classes gather state and call the functional core
``gradpower_ds.functional.adam_power``, which picks the implementation (torch.optim's
design): the native CPU kernel for fp32 CPU params, the Triton kernel for CUDA
params (with ``fused=True``, and by default once it has passed its check on that
GPU, ``gradpower_ds.kernel_gate``), else the
torch multi-tensor path (``foreach=True``) or the single-tensor reference path
(``foreach=False``, bitwise torch.optim.AdamW(foreach=False) with power = 1).

phi is applied to the gradient as the optimizer receives it (after loss-scale
unscaling and clipping), before the moments; bias correction, eps and weight
decay are Adam's, unchanged. With Adam's L2 mode (``adam_w_mode=False``) the
L2 term is added to the powered gradient. ``gradpower_ds.CPUAdamPower`` is
the same optimizer pinned to the native kernel (ZeRO-Offload's CPU optimizer).
"""

from __future__ import annotations

import torch

from .optimizer_base import AdamPowerBase
from .power import fused_kernel


class AdamPower(AdamPowerBase):
    """Adam(W) on sign(g) * (|g| + power_eps)**power; power may differ per param group.

    Hyperparameters (positional order and defaults) are AdamPowerBase's: lr,
    betas, eps, weight_decay, adam_w_mode, power, power_eps, bias_correction.

    ``fused`` and ``foreach`` choose the implementation, as in torch.optim:
    None/None (default) runs the native kernel for fp32 CPU params, the Triton
    kernel for CUDA params once it has passed its check on that GPU, the multi-tensor path
    otherwise; ``fused=True`` requires the kernel of the params' device (checked
    at construction; CPU params run Triton's interpreter under TRITON_INTERPRET=1,
    for tests); ``foreach=True``/``False`` the torch multi-/single-tensor path.
    """

    def __init__(self, params, *args, foreach: bool | None = None, fused: bool | None = None, **hyperparameters):
        super().__init__(params, *args, **hyperparameters)
        if fused and foreach:
            raise ValueError("AdamPower: fused=True and foreach=True are mutually exclusive")
        if fused:
            for device in {p.device for group in self.param_groups for p in group["params"]}:
                fused_kernel(device, True)  # raises saying why the kernel cannot run
        self.foreach, self.fused = foreach, fused

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, copy_out = self._take_folded()
        for group in self.param_groups:
            self._step_group(group, copy_out=copy_out, grad_scale=grad_scale, foreach=self.foreach, fused=self.fused)
        return loss
