"""AdamPower: Adam(W) fed with the GradPower-transformed gradient phi_p(g).

Three implementations of the same maths, as in torch/optim:
- the single-tensor reference path (``foreach=False``): plain PyTorch, one
  parameter at a time, following torch.optim.AdamW's operation order, so that
  with power = 1 it is bitwise torch.optim.AdamW(foreach=False);
- the multi-tensor path (``foreach=True``, the default off the fused path):
  torch._foreach ops over all parameters of a group, on CPU or CUDA tensors;
- the fused path (``fused``): one Triton kernel pass per group
  (gradpower_ds.ops.triton_adam_power), used by default for contiguous fp32
  CUDA params when Triton is available.

phi is applied to the gradient as the optimizer receives it (after loss-scale
unscaling and clipping), before the moments; bias correction, eps and weight
decay are Adam's, unchanged. With Adam's L2 mode (``adam_w_mode=False``) the
L2 term is added to the powered gradient. For fp32 CPU master weights (as under
ZeRO-Offload) use the native kernel ``gradpower_ds.ops.CPUAdamPower``.
"""

from __future__ import annotations

import torch

from .hyperparams import ADAM_POWER_DEFAULTS, bias_corrections, check_group
from .power import grad_power, grad_power_foreach


class AdamPowerBase(torch.optim.Optimizer):
    """What every AdamPower implementation shares: hyperparameters, their validation, the state layout.

    State keys are torch's AdamW ones (``step`` as a float32 tensor, ``exp_avg``,
    ``exp_avg_sq``), so checkpoints move between AdamPower, CPUAdamPower and
    torch.optim.AdamW.
    """

    def __init__(
        self,
        params,
        lr: float = ADAM_POWER_DEFAULTS["lr"],
        betas: tuple[float, float] = ADAM_POWER_DEFAULTS["betas"],
        eps: float = ADAM_POWER_DEFAULTS["eps"],
        weight_decay: float = ADAM_POWER_DEFAULTS["weight_decay"],
        adam_w_mode: bool = ADAM_POWER_DEFAULTS["adam_w_mode"],
        power: float = ADAM_POWER_DEFAULTS["power"],
        power_eps: float = ADAM_POWER_DEFAULTS["power_eps"],
        bias_correction: bool = ADAM_POWER_DEFAULTS["bias_correction"],
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=adam_w_mode,
            power=power, power_eps=power_eps, bias_correction=bias_correction,
        )
        check_group(dict(defaults), type(self).__name__)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group (see torch.optim.Optimizer) after validating its hyperparameters."""
        super().add_param_group(param_group)
        check_group(self.param_groups[-1], type(self).__name__)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state


class AdamPower(AdamPowerBase):
    """Adam(W) on sign(g) * (|g| + power_eps)**power; power may differ per param group.

    Hyperparameters (positional order and defaults) are AdamPowerBase's: lr,
    betas, eps, weight_decay, adam_w_mode, power, power_eps, bias_correction.

    ``fused`` chooses the Triton kernel: None (default) uses it for a group
    whose params are all contiguous fp32 CUDA tensors when Triton is available
    and ``foreach`` was not given; False never uses it; True always does and
    raises at construction if Triton cannot run here (it also runs CPU tensors
    under TRITON_INTERPRET=1, for tests). Off the fused path, ``foreach=True``
    (default) runs the multi-tensor path, ``False`` the single-tensor reference
    path; both work on CPU and CUDA tensors.
    """

    def __init__(self, params, *args, foreach: bool | None = None, fused: bool | None = None, **hyperparameters):
        super().__init__(params, *args, **hyperparameters)
        if fused and foreach:
            raise ValueError("AdamPower: fused=True and foreach=True are mutually exclusive")
        if fused:
            reason = _triton().triton_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"AdamPower(fused=True) needs the Triton kernel, which cannot run: {reason}; "
                                   "pass fused=None (use it when possible) or fused=False")
        self.fused = False if fused is None and foreach is not None else fused
        self.foreach = True if foreach is None else bool(foreach)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("AdamPower does not support sparse gradients")
            states = [self._init_state(p) for p in params]
            if self._use_fused(params):
                _fused_step(params, states, group)
            else:
                (_multi_tensor_step if self.foreach else _single_tensor_step)(params, states, group)
        return loss

    def _use_fused(self, params) -> bool:
        # fused=None (automatic, foreach not given): the kernel for contiguous fp32 CUDA params, if it can run.
        if self.fused is not None:
            return self.fused
        return all(p.is_cuda and p.dtype == torch.float32 and p.is_contiguous() for p in params) \
            and _triton().triton_available()


def _triton():
    # Imported on first use: gradpower_ds.ops imports this module, and most runs never need Triton.
    from .ops import triton_adam_power

    return triton_adam_power


def _fused_step(params, states, group) -> None:
    beta1, beta2 = group["betas"]
    _triton().triton_adam_power_step(
        params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
        [s["step"] for s in states], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
        weight_decay=group["weight_decay"], adam_w_mode=group["adam_w_mode"], power=group["power"],
        power_eps=group["power_eps"], bias_correction=group["bias_correction"],
    )


def _single_tensor_step(params, states, group) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    for p, state in zip(params, states):
        grad = grad_power(p.grad, group["power"], group["power_eps"])
        exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        step_t += 1
        if wd != 0:
            if group["adam_w_mode"]:
                p.mul_(1 - lr * wd)
            else:
                grad = grad.add(p, alpha=wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bc1, bc2_sqrt = bias_corrections(beta1, beta2, step_t.item(), group["bias_correction"])
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-(lr / bc1))


def _multi_tensor_step(params, states, group) -> None:
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    steps = [s["step"] for s in states]
    grads = grad_power_foreach([p.grad for p in params], group["power"], group["power_eps"])
    torch._foreach_add_(steps, 1)
    if wd != 0:
        if group["adam_w_mode"]:
            torch._foreach_mul_(params, 1 - lr * wd)
        else:
            torch._foreach_add_(grads, params, alpha=wd)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    del grads
    corrections = [bias_corrections(beta1, beta2, s.item(), group["bias_correction"]) for s in steps]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [bc2_sqrt for _, bc2_sqrt in corrections])
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-(lr / bc1) for bc1, _ in corrections])
