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
