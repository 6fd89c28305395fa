"""CPUAdamPower: AdamPower on fp32 CPU tensors through the fused native kernel.

One pass over param/grad/exp_avg/exp_avg_sq per step (phi + Adam(W) fused,
OpenMP threads, AVX-512/AVX2/scalar chosen at run time), optionally writing the
updated weights into bf16/fp16 copies in the same pass — the shape DeepSpeed's
ZeRO-Offload expects from its CPU optimizer (cf. DeepSpeedCPUAdam).
"""

from __future__ import annotations

import logging
import os

import torch

from ..adam_power import AdamPowerBase
from ..hyperparams import bias_corrections, check_power
from . import builder

ISA_CODES = {"auto": -1, "scalar": 0, "avx2": 1, "avx512": 2}
ISA_NAMES = {code: name for name, code in ISA_CODES.items()}
_COPY_CODES = {torch.bfloat16: 1, torch.float16: 2}
ISA_ENV = "GRADPOWER_CPU_ISA"
_log = logging.getLogger(__name__)


def resolve_isa(isa: str | None = None) -> str:
    """Returns the ISA name the kernel will use: `isa`, else $GRADPOWER_CPU_ISA, else the CPU's best.

    Raises ValueError for an unknown name or one this CPU cannot run.
    """
    requested = isa if isa is not None else os.environ.get(ISA_ENV, "auto")
    name = str(requested).lower()
    if name not in ISA_CODES:
        raise ValueError(f"CPUAdamPower: unknown isa={requested!r}; choose one of {sorted(ISA_CODES)}")
    native = builder.load()
    if name == "auto":
        return ISA_NAMES[native.best_isa()]
    if not native.cpu_supports(ISA_CODES[name]):
        raise ValueError(f"CPUAdamPower: isa={name!r} is not supported by this CPU (best: "
                         f"{ISA_NAMES[native.best_isa()]!r})")
    return name


def _check_fp32_cpu(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
        raise TypeError(
            f"CPUAdamPower: {what} must be a contiguous fp32 CPU tensor, got {t.dtype} on {t.device}"
            f"{'' if t.is_contiguous() else ' (non-contiguous)'}; keep fp32 master weights on the CPU "
            "(as ZeRO-Offload does) or use gradpower_ds.AdamPower"
        )


def native_grad_power(t: torch.Tensor, p: float, eps: float = 0.0, isa: str | None = None,
                      num_threads: int | None = None) -> torch.Tensor:
    """phi_p(t) = sign(t) * (|t| + eps)**p from the native kernel (new fp32 tensor); for testing and benchmarks."""

    p, eps = check_power(p, eps)
    _check_fp32_cpu(t, "input")
    out = torch.empty_like(t)
    builder.load().grad_power(t.data_ptr(), out.data_ptr(), t.numel(), p, eps, ISA_CODES[resolve_isa(isa)],
                              num_threads or torch.get_num_threads())
    return out


class CPUAdamPower(AdamPowerBase):
    """AdamPower for fp32 CPU parameters, one fused native pass per tensor and step.

    Same hyperparameters (AdamPowerBase's, in the same order) and state layout
    as gradpower_ds.AdamPower, so checkpoints move freely between them. `isa`
    forces "avx512", "avx2" or "scalar" (default: $GRADPOWER_CPU_ISA or the best
    the CPU has); `num_threads` defaults to torch.get_num_threads().
    """

    def __init__(self, params, *args, isa: str | None = None, num_threads: int | None = None, **hyperparameters):
        if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)
                                        or num_threads < 1):
            raise ValueError(f"CPUAdamPower: invalid num_threads={num_threads!r}: must be an int >= 1")
        super().__init__(params, *args, **hyperparameters)
        self._native = builder.load()
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
        threads = self.num_threads or torch.get_num_threads()
        for gi, group in enumerate(self.param_groups):
            copies = fp16_param_groups[gi] if fp16_param_groups is not None else None
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    self._step_param(p, group, copies[pi] if copies is not None else None, threads)
        return loss

    def _step_param(self, p: torch.Tensor, group: dict, copy: torch.Tensor | None, threads: int) -> None:
        _check_fp32_cpu(p, "param")
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("CPUAdamPower does not support sparse gradients")
        if grad.dtype != torch.float32 or not grad.is_contiguous():
            grad = grad.to(torch.float32).contiguous()  # exact widening, no change of maths
        _check_fp32_cpu(grad, "grad")
        copy_ptr, copy_code = 0, 0
        if copy is not None:
            if copy.dtype not in _COPY_CODES or copy.device.type != "cpu" or not copy.is_contiguous() \
                    or copy.shape != p.shape:
                raise TypeError("CPUAdamPower: a copy-out tensor must be a contiguous bf16/fp16 CPU tensor "
                                f"shaped like its param {tuple(p.shape)}, got {copy.dtype} {tuple(copy.shape)} "
                                f"on {copy.device}")
            copy_ptr, copy_code = copy.data_ptr(), _COPY_CODES[copy.dtype]

        state = self._init_state(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        bc1, bc2_sqrt = bias_corrections(beta1, beta2, state["step"].item(), group["bias_correction"])
        lr, wd = group["lr"], group["weight_decay"]
        adamw = group["adam_w_mode"]
        self._native.adam_power_step(
            p.data_ptr(), grad.data_ptr(), state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr(),
            copy_ptr, copy_code, p.numel(),
            one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2, eps=group["eps"],
            l2=0.0 if adamw else wd, decay=1 - lr * wd if adamw else 1.0,
            step_size=lr / bc1, inv_bias_corr2_sqrt=1 / bc2_sqrt,
            power=group["power"], power_eps=group["power_eps"],
            isa=ISA_CODES[self.isa], threads=threads,
        )
