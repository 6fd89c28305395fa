"""CPUAdamPower: AdamPower on fp32 CPU tensors through the fused native kernel.

One pass over param/grad/exp_avg/exp_avg_sq per step (phi + Adam(W) fused,
OpenMP threads, AVX-512/AVX2/scalar chosen at run time), optionally writing the
updated weights into bf16/fp16 copies in the same pass — the shape DeepSpeed's
ZeRO-Offload expects from its CPU optimizer (cf. DeepSpeedCPUAdam). It is the
functional core (``gradpower_ds.functional.adam_power``) with ``fused=True``.
"""

from __future__ import annotations

import logging

import torch

from .ops.native import COPY_CODES, resolve_isa
from .optimizer_base import AdamPowerBase

_log = logging.getLogger(__name__)


class CPUAdamPower(AdamPowerBase):
    """AdamPower for fp32 CPU parameters, one fused native pass per tensor and step.

    Same hyperparameters (AdamPowerBase's, in the same order) and state layout
    as gradpower_ds.AdamPower, so checkpoints move freely between them. `isa`
    forces "avx512", "avx2" or "scalar" (default: $GRADPOWER_CPU_ISA or the best
    the CPU has); `num_threads` defaults to torch.get_num_threads(). Grads may be
    fp32, bf16 or fp16 (widened in bounded chunks).
    """

    def __init__(self, params, *args, isa: str | None = None, num_threads: int | None = None, **hyperparameters):
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"CPUAdamPower: invalid num_threads={num_threads!r}: must be an int >= 1")
        super().__init__(params, *args, **hyperparameters)
        self.isa = resolve_isa(isa)
        self.num_threads = num_threads
        _log.info("CPUAdamPower: native kernel with %s, %s OpenMP threads", self.isa,
                  num_threads or f"torch.get_num_threads() (now {torch.get_num_threads()})")

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
        for gi, group in enumerate(self.param_groups):
            copies = fp16_param_groups[gi] if fp16_param_groups is not None else None
            if copies is not None:
                for p, copy in zip(group["params"], copies):
                    if copy is not None and (copy.dtype not in COPY_CODES or copy.device.type != "cpu"
                                             or not copy.is_contiguous() or copy.shape != p.shape):
                        raise TypeError("CPUAdamPower: a copy-out tensor must be a contiguous bf16/fp16 CPU tensor "
                                        f"shaped like its param {tuple(p.shape)}, got {copy.dtype} "
                                        f"{tuple(copy.shape)} on {copy.device}")
            self._step_group(group, copies, fused=True, isa=self.isa, num_threads=self.num_threads)
        return loss
