"""An independent float64 AdamPower written from the formulas (no code shared with the package)."""

import math

import torch


class Float64AdamPower:
    """sign(g)(|g|+pe)^p fed to Adam(W); state kept in float64, one parameter tensor."""

    def __init__(self, param, lr, betas, eps, weight_decay, adam_w_mode, power, power_eps=0.0,
                 bias_correction=True):
        self.w = param.detach().double().clone()
        self.m = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w)
        self.t = 0
        self.h = dict(lr=lr, b1=betas[0], b2=betas[1], eps=eps, wd=weight_decay, adamw=adam_w_mode,
                      p=power, pe=power_eps, bc=bias_correction)

    def step(self, grad):
        h = self.h
        g = grad.double()
        g = torch.sign(g) * (g.abs() + h["pe"]).pow(h["p"])
        self.t += 1
        if h["adamw"]:
            self.w = self.w * (1 - h["lr"] * h["wd"])
        else:
            g = g + h["wd"] * self.w
        self.m = h["b1"] * self.m + (1 - h["b1"]) * g
        self.v = h["b2"] * self.v + (1 - h["b2"]) * g * g
        bc1 = 1 - h["b1"] ** self.t if h["bc"] else 1.0
        bc2 = 1 - h["b2"] ** self.t if h["bc"] else 1.0
        self.w = self.w - h["lr"] / bc1 * self.m / (self.v.sqrt() / math.sqrt(bc2) + h["eps"])


GRAD_SCALES = (0.37, 2.0 ** -16, 3.0)  # a clip coefficient, a loss scale's inverse (small grads become subnormal), > 1


def scaled_grads(shapes, grad_dtype, seed=0) -> list:
    """Grads for the grad_scale checks: ordinary values, zeros, subnormal-prone tiny ones and large ones."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for shape in shapes:
        g = torch.randn(shape, generator=gen) * torch.exp(4 * torch.randn(shape, generator=gen))
        flat = g.view(-1)
        flat[::5] = 0.0
        flat[1::7] *= 1e-36
        grads.append(g.to(grad_dtype))
    return grads


def assert_grad_scale_is_prescaling(step, shapes, grad_dtype, scale, power_eps) -> None:
    """``step(params, grads, exp_avgs, exp_avg_sqs, steps, grad_scale=...)`` (one functional step) with grad_scale
    equals, bit for bit, the same step on grads multiplied beforehand as DeepSpeed and Megatron do
    (``g.float().mul_(scale)``): params, moments and step counts, over two steps."""
    runs = []
    for folded in (True, False):
        params = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
        state = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                 [torch.tensor(0.0) for _ in params])
        for k in range(2):
            grads = scaled_grads(shapes, grad_dtype, seed=k)
            if folded:
                step(params, grads, *state, grad_scale=scale, power_eps=power_eps)
            else:
                fp32 = torch.float32
                step(params, [g.to(fp32).mul_(scale if not torch.is_tensor(scale) else scale.to(fp32)) for g in grads],
                     *state, power_eps=power_eps)
        runs.append([*params, *state[0], *state[1], *state[2]])
    for a, b in zip(*runs):
        assert torch.equal(a, b), (a - b).abs().max()
