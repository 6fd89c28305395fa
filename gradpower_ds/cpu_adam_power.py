"""CPUAdamPower: AdamPower on CPU tensors through the fused native kernel.

One pass over param/grad/exp_avg/exp_avg_sq per step (phi + Adam(W) fused,
OpenMP threads, AVX-512/AVX2/scalar chosen at run time), optionally writing the
updated weights into bf16/fp16 copies in the same pass — the shape DeepSpeed's
ZeRO-Offload expects from its CPU optimizer (cf. DeepSpeedCPUAdam). It is the
functional core (``gradpower_ds.functional.adam_power``) with ``fused=True``.
"""

from __future__ import annotations

import logging

import torch

from .ops.native_adam_power import COPY_CODES, resolve_isa
from .optimizer_base import AdamPowerBase

_log = logging.getLogger(__name__)


class CPUAdamPower(AdamPowerBase):
    """AdamPower for CPU parameters, one fused native pass per tensor and step.

    Same hyperparameters (AdamPowerBase's, in the same order) and state layout
    as gradpower_ds.AdamPower, so checkpoints move freely between them. `isa`
    forces "avx512", "avx2" or "scalar" (default: $GRADPOWER_CPU_ISA or the best
    the CPU has); `num_threads` defaults to torch.get_num_threads(). Params may be
    fp32, bf16 or fp16, as DeepSpeedCPUAdam takes them: the moments are fp32 and the
    update is computed in fp32, then rounded into a bf16/fp16 param. Grads may be
    fp32, bf16 or fp16 (widened in bounded chunks).
    """

    MOMENT_DTYPE = torch.float32

    def __init__(self, params, *args, isa: str | None = None, num_threads: int | None = None, **hyperparameters):
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"CPUAdamPower: invalid num_threads={num_threads!r}: must be an int >= 1")
        super().__init__(params, *args, **hyperparameters)
        self.isa = resolve_isa(isa)
        self.num_threads = num_threads
        _log.info("CPUAdamPower: native kernel with %s, %s OpenMP threads", self.isa,
                  num_threads or f"torch.get_num_threads() (now {torch.get_num_threads()})")

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, keeping the saved fp32 moments of bf16/fp16 params fp32 (torch would round them to the
        param's dtype)."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        moments = {i: {k: v for k, v in state_dict["state"].get(i, {}).items() if k in ("exp_avg", "exp_avg_sq")}
                   for i in saved_ids}
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(saved_ids, params):
            if p.dtype != self.MOMENT_DTYPE:
                for key, value in moments[i].items():
                    self.state[p][key] = value.to(device=p.device, dtype=self.MOMENT_DTYPE, copy=True)

    @torch.no_grad()
    def step(self, closure=None, fp16_param_groups=None):
        """One step over every parameter with a gradient.

        fp16_param_groups, if given, mirrors param_groups with bf16 or fp16 CPU
        tensors (or None entries) that receive the updated weights in the same pass.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, copy_out = self._take_folded()
        for gi, group in enumerate(self.param_groups):
            copies = fp16_param_groups[gi] if fp16_param_groups is not None else None
            if copies is not None:
                for p, copy in zip(group["params"], copies):
                    if copy is not None and (copy.dtype not in COPY_CODES or copy.device.type != "cpu"
                                             or not copy.is_contiguous() or copy.shape != p.shape):
                        raise TypeError("CPUAdamPower: a copy-out tensor must be a contiguous bf16/fp16 CPU tensor "
                                        f"shaped like its param {tuple(p.shape)}, got {copy.dtype} "
                                        f"{tuple(copy.shape)} on {copy.device}")
            self._step_group(group, copies, copy_out, grad_scale, fused=True, isa=self.isa,
                             num_threads=self.num_threads)
        return loss
