"""The functional core of AdamPower: one signature, five implementations (as torch.optim's functional adam).

``adam_power`` steps lists of tensors in place and dispatches, per tensor, to:

- the native CPU kernel (phi + Adam(W) fused, one pass; ``ops.native_adam_power``) for fp32
  CPU params: the default there, and what ``fused=True`` means on the CPU;
- the Triton kernel (one pass; ``ops.triton_adam_power``) for fp32 CUDA params:
  with ``fused=True``, and by default once it has passed its check on that GPU
  (``gradpower_ds.kernel_gate``: run once per GPU kind, Triton version and grad dtype);
- the multi-tensor torch path (``foreach=True``, and the default elsewhere):
  torch._foreach ops over batches of at most ``torch_paths.MULTI_TENSOR_BATCH`` elements, with
  phi written by torch ops straight into the grads' copy (``torch_paths.powered_copy``),
  so its temporaries are bounded whatever the size of a gradient;
- the torch fused path (automatic on CUDA where the Triton kernel is not chosen: no Triton,
  or it failed its check): phi written into the grads' copy, then
  torch's own fused Adam(W) kernel (``torch._fused_adamw_``/``_fused_adam_``, one pass):
  56 bytes per element for fp32 grads, against 108 for the multi-tensor path;
- the single-tensor path (``foreach=False``): plain torch, one tensor at a time,
  in torch.optim.AdamW's operation order, so that with power = 1 it is bitwise
  torch.optim.Adam(W)(foreach=False).

The implementation is chosen once per call, device and grad dtype (``power.fused_kernel``); a
tensor the chosen kernel cannot take (its layout) goes to the torch path, and the
torch paths never reach a kernel, so ``foreach=True``/``False`` and ``fused=False``
are honoured exactly. Every path takes grads of any float dtype (a bf16 grad on an fp32 param is
widened exactly) and leaves the grads untouched. ``AdamPower``, ``CPUAdamPower``,
DeepSpeed (through them) and Megatron's AdamPower all step through here.

Like torch.optim's functional code, nothing here validates hyperparameters on
every step: the callers do once, where they enter (the optimizer classes at
construction and add_param_group, config and flag parsing, all with
``gradpower_ds.hyperparams.check_settings``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import torch_paths
from .ops import native_adam_power as native
from .ops import triton_adam_power as triton_ops
from .power import fused_kernel


def adam_power(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
               exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], *, lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float, power: float, power_eps: float = 0.0,
               adam_w_mode: bool = True, bias_correction: bool = True, foreach: bool | None = None,
               fused: bool | None = None, low_precision_params: Sequence[torch.Tensor | None] | None = None,
               grad_scale: float | torch.Tensor | None = None, isa: str | None = None,
               num_threads: int | None = None) -> None:
    """One AdamPower step: params, exp_avgs, exp_avg_sqs and steps (float32 counters, incremented) in place.

    Adam(W) fed with phi_p(g) = sign(g)(|g| + power_eps)^p, with Adam's L2 term
    (adam_w_mode=False) added to the powered grad. ``fused``/``foreach`` choose the
    implementation (see the module docstring): fused=None, foreach=None is automatic;
    foreach=True/False the torch multi-/single-tensor path; fused=True the device's
    kernel or an error. low_precision_params: per param None or a bf16/fp16 tensor
    that receives the new weights. grad_scale: None, or a positive float or one-element
    fp32 tensor (on the params' device) the grads are multiplied by before phi, in the
    same pass: exactly as ``g.float().mul_(grad_scale)`` beforehand (a wrapper's
    unscale/clip coefficient, folded in: ``AdamPowerBase.fold_into_next_step``).
    isa, num_threads: the native kernel's (CPUAdamPower's).
    The hyperparameters are not validated here: callers validate them once, where they
    enter (``gradpower_ds.hyperparams.check_settings``), as AdamPowerBase does.
    """
    if fused and foreach:
        raise ValueError("adam_power: fused=True and foreach=True are mutually exclusive")
    n = len(params)
    copies = list(low_precision_params) if low_precision_params is not None else [None] * n
    if not len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == len(copies) == n:
        raise ValueError("adam_power: params, grads, exp_avgs, exp_avg_sqs, steps and low_precision_params must "
                         "have the same length")
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, power=power,
                 power_eps=power_eps, adam_w_mode=adam_w_mode, bias_correction=bias_correction)
    scaled = dict(hyper, grad_scale=grad_scale)
    if foreach is not None and fused is None:
        fused = False
    paths: dict[str, list[int]] = {"native": [], "triton": [], "torch_fused": [], "torch": []}
    kernels: dict[tuple, str | None] = {}  # chosen once per (device, grad dtype) and call, not per tensor
    for i, p in enumerate(params):
        key = (p.device, grads[i].dtype)
        if key not in kernels:
            kernels[key] = fused_kernel(p.device, fused, grads[i].dtype)
        kernel = kernels[key]
        if kernel == "native" and not _native_layout(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], copies[i]):
            if fused:
                raise TypeError(
                    f"adam_power(fused=True) on the CPU: params must be contiguous fp32, bf16 or fp16 CPU tensors "
                    f"and moments contiguous fp32 ones, grads CPU tensors of their shape and copies contiguous "
                    f"bf16/fp16 ones (none for a bf16/fp16 param), got a {p.dtype} param"
                    f"{'' if p.is_contiguous() else ' (non-contiguous)'} with {exp_avgs[i].dtype} moments; "
                    "use fused=None")
            kernel = None
        if kernel == "triton" and not fused and not _triton_layout(params[i], exp_avgs[i], exp_avg_sqs[i]):
            kernel = None
        if kernel is None and fused is None and bias_correction and p.device.type in torch_paths.TORCH_FUSED_DEVICES \
                and p.dtype == exp_avgs[i].dtype == exp_avg_sqs[i].dtype and p.dtype in torch_paths.TORCH_FUSED_DTYPES:
            kernel = "torch_fused"
        paths[kernel or "torch"].append(i)

    def pick(indices, *lists):
        return [[column[i] for i in indices] for column in lists]

    columns = (params, grads, exp_avgs, exp_avg_sqs, steps, copies)
    if paths["native"]:
        threads = num_threads or torch.get_num_threads()
        isa = native.resolve_isa(isa)
        scale = 1.0 if grad_scale is None else float(grad_scale)  # a CPU kernel: a host value
        for p, g, m, v, s, c in zip(*pick(paths["native"], *columns)):
            s += 1
            native.native_adam_power_step(p, g, m, v, c, step=s.item(), isa=isa, num_threads=threads,
                                          grad_scale=scale, **hyper)
    if paths["triton"]:
        p, g, m, v, s, c = pick(paths["triton"], *columns)
        triton_ops.triton_adam_power_step(p, g, m, v, s, low_precision_params=c, **scaled)
    fused_groups: dict[tuple, list[int]] = {}  # torch's fused kernels take one device and dtype a call
    for i in paths["torch_fused"]:
        fused_groups.setdefault((params[i].device, params[i].dtype), []).append(i)
    for indices in fused_groups.values():
        torch_paths.torch_fused_adam_power(*pick(indices, *columns), **scaled)
    if paths["torch"]:
        step_fn = torch_paths.single_tensor_adam_power if foreach is False else torch_paths.multi_tensor_adam_power
        step_fn(*pick(paths["torch"], *columns), **scaled)


def _native_layout(param, grad, exp_avg, exp_avg_sq, copy) -> bool:
    """Whether the native path takes this tensor: a dispatch decision. Which layouts the kernel can take is
    ops.native_adam_power's to say (``native.fits``), and ops.native_adam_power checks every buffer again where it
    hands it over."""
    n = param.numel()
    low_param = native.fits(param, n, tuple(native.COPY_CODES))  # bf16/fp16 weights with fp32 moments
    ok = (native.fits(param, n) or low_param and copy is None) and \
        all(native.fits(t, n) and t.shape == param.shape for t in (exp_avg, exp_avg_sq))
    ok = ok and grad.device.type == "cpu" and grad.is_floating_point() and grad.shape == param.shape
    return ok and (copy is None or (native.fits(copy, n, tuple(native.COPY_CODES)) and copy.shape == param.shape))


def _triton_layout(param, exp_avg, exp_avg_sq) -> bool:
    return all(t.is_cuda and t.dtype == torch.float32 and t.is_contiguous() for t in (param, exp_avg, exp_avg_sq))
