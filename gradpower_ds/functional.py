"""The functional core of AdamPower: one signature, four implementations (as torch.optim's functional adam).

``adam_power`` steps lists of tensors in place and dispatches, per tensor, to:

- the native CPU kernel (phi + Adam(W) fused, one pass; ``ops.native_adam_power``) for fp32
  CPU params: the default there, and what ``fused=True`` means on the CPU;
- the Triton kernel (one pass; ``ops.triton_adam_power``) for fp32 CUDA params:
  with ``fused=True``, and by default once it has passed its check on that GPU
  (``gradpower_ds.kernel_gate``: run once per GPU kind, Triton version and grad dtype);
- the multi-tensor torch path (``foreach=True``, and the default elsewhere):
  torch._foreach ops over batches of at most MULTI_TENSOR_BATCH elements, with
  phi written by torch ops straight into the grads' copy (``power.powered_copy``),
  so its temporaries are bounded whatever the size of a gradient;
- the torch fused path (automatic on CUDA where the Triton kernel is not chosen: no Triton,
  or it failed its check): phi written into the grads' copy (``power.powered_copy``), then
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

from .hyperparams import bias_corrections
from .ops import native_adam_power as native
from .ops import triton_adam_power as triton_ops
from .power import fused_kernel, powered_copy

MULTI_TENSOR_BATCH = 1 << 24  # elements per multi-tensor batch: two fp32 temporaries of 64 MiB at most
TORCH_FUSED_DEVICES = ("cuda",)  # where the automatic choice's torch path steps with torch's fused Adam(W) kernel
TORCH_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def adam_power(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
               exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], *, lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float, power: float, power_eps: float = 0.0,
               adam_w_mode: bool = True, bias_correction: bool = True, foreach: bool | None = None,
               fused: bool | None = None, low_precision_params: Sequence[torch.Tensor | None] | None = None,
               isa: str | None = None, num_threads: int | None = None) -> None:
    """One AdamPower step: params, exp_avgs, exp_avg_sqs and steps (float32 counters, incremented) in place.

    Adam(W) fed with phi_p(g) = sign(g)(|g| + power_eps)^p, with Adam's L2 term
    (adam_w_mode=False) added to the powered grad. ``fused``/``foreach`` choose the
    implementation (see the module docstring): fused=None, foreach=None is automatic;
    foreach=True/False the torch multi-/single-tensor path; fused=True the device's
    kernel or an error. low_precision_params: per param None or a bf16/fp16 tensor
    that receives the new weights. isa, num_threads: the native kernel's (CPUAdamPower's).
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
        if kernel is None and fused is None and bias_correction and p.device.type in TORCH_FUSED_DEVICES and \
                p.dtype == exp_avgs[i].dtype == exp_avg_sqs[i].dtype and p.dtype in TORCH_FUSED_DTYPES:
            kernel = "torch_fused"
        paths[kernel or "torch"].append(i)

    def pick(indices, *lists):
        return [[column[i] for i in indices] for column in lists]

    columns = (params, grads, exp_avgs, exp_avg_sqs, steps, copies)
    if paths["native"]:
        threads = num_threads or torch.get_num_threads()
        isa = native.resolve_isa(isa)
        for p, g, m, v, s, c in zip(*pick(paths["native"], *columns)):
            s += 1
            native.native_adam_power_step(p, g, m, v, c, step=s.item(), isa=isa, num_threads=threads, **hyper)
    if paths["triton"]:
        p, g, m, v, s, c = pick(paths["triton"], *columns)
        triton_ops.triton_adam_power_step(p, g, m, v, s, low_precision_params=c, **hyper)
    fused_groups: dict[tuple, list[int]] = {}  # torch's fused kernels take one device and dtype a call
    for i in paths["torch_fused"]:
        fused_groups.setdefault((params[i].device, params[i].dtype), []).append(i)
    for indices in fused_groups.values():
        _torch_fused_adam_power(*pick(indices, *columns), **hyper)
    if paths["torch"]:
        step_fn = _single_tensor_adam_power if foreach is False else _multi_tensor_adam_power
        step_fn(*pick(paths["torch"], *columns), **hyper)


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


def _single_tensor_adam_power(params, grads, exp_avgs, exp_avg_sqs, steps, copies, *, lr, beta1, beta2, eps,
                              weight_decay, power, power_eps, adam_w_mode, bias_correction) -> None:
    for p, grad, exp_avg, exp_avg_sq, step_t, copy in zip(params, grads, exp_avgs, exp_avg_sqs, steps, copies):
        grad = powered_copy(grad, p.dtype, power, power_eps)
        step_t += 1
        if weight_decay != 0:
            if adam_w_mode:
                p.mul_(1 - lr * weight_decay)
            else:
                grad.add_(p, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bc1, bc2_sqrt = bias_corrections(beta1, beta2, step_t.item(), bias_correction)
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-(lr / bc1))
        if copy is not None:
            copy.copy_(p)


def _multi_tensor_adam_power(params, grads, exp_avgs, exp_avg_sqs, steps, copies, *, lr, beta1, beta2, eps,
                             weight_decay, power, power_eps, adam_w_mode, bias_correction) -> None:
    torch._foreach_add_(steps, 1)
    corrections = [bias_corrections(beta1, beta2, s.item(), bias_correction) for s in steps]
    for ps, gs, ms, vs, bcs in _batches(params, grads, exp_avgs, exp_avg_sqs, corrections):
        gs = [powered_copy(g, p.dtype, power, power_eps) for p, g in zip(ps, gs)]
        if weight_decay != 0:
            if adam_w_mode:
                torch._foreach_mul_(ps, 1 - lr * weight_decay)
            else:
                torch._foreach_add_(gs, ps, alpha=weight_decay)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - beta2)
        del gs
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_div_(denoms, [bc2_sqrt for _, bc2_sqrt in bcs])
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(ps, ms, denoms, [-(lr / bc1) for bc1, _ in bcs])
    for p, copy in zip(params, copies):
        if copy is not None:
            copy.copy_(p)


def _torch_fused_adam_power(params, grads, exp_avgs, exp_avg_sqs, steps, copies, *, lr, beta1, beta2, eps,
                            weight_decay, power, power_eps, adam_w_mode, bias_correction) -> None:
    """phi into the grads' copy, then torch's fused Adam(W) kernel, per batch (bias_correction is always on here:
    torch's kernel has no switch; the dispatch sends bias_correction=False to the multi-tensor path)."""
    torch._foreach_add_(steps, 1)
    step_kernel = torch._fused_adamw_ if adam_w_mode else torch._fused_adam_  # torch's Adam: L2 into the grad
    for ps, gs, ms, vs, counts in _batches(params, grads, exp_avgs, exp_avg_sqs, [s.item() for s in steps]):
        gs = [powered_copy(g, p.dtype, power, power_eps) for p, g in zip(ps, gs)]
        device_steps = torch.tensor(counts, dtype=torch.float32)  # torch's kernel reads the counts on the device
        if ps[0].is_cuda:
            device_steps = device_steps.pin_memory().to(ps[0].device, non_blocking=True)
        step_kernel(ps, gs, ms, vs, [], list(device_steps.unbind()), lr=lr, beta1=beta1, beta2=beta2,
                    weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
    for p, copy in zip(params, copies):
        if copy is not None:
            copy.copy_(p)


def _batches(params, grads, exp_avgs, exp_avg_sqs, extras):
    """Lists (params, grads, exp_avgs, exp_avg_sqs, extras) of flat views, at most MULTI_TENSOR_BATCH elements
    a batch, with each tensor's extra (its bias corrections, its step count) beside each of its pieces; a larger
    contiguous tensor is split into pieces (a non-contiguous one goes whole)."""
    batch: list[list] = [[], [], [], [], []]
    size = 0
    for p, g, m, v, bc in zip(params, grads, exp_avgs, exp_avg_sqs, extras):
        splittable = all(t.is_contiguous() for t in (p, g, m, v))
        step = MULTI_TENSOR_BATCH if splittable else max(1, p.numel())
        for begin in range(0, p.numel(), step):
            pieces = [t.view(-1)[begin:begin + step] for t in (p, g, m, v)] if splittable else [p, g, m, v]
            if size and size + pieces[0].numel() > MULTI_TENSOR_BATCH:
                yield batch
                batch, size = [[], [], [], [], []], 0
            for column, piece in zip(batch, pieces + [bc]):
                column.append(piece)
            size += pieces[0].numel()
    if size:
        yield batch
