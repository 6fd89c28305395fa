"""The torch implementations of phi and of the AdamPower step: the paths that run where no kernel does.

``functional.adam_power`` and ``power.grad_power_`` dispatch to these (and to the kernels in ops/);
``kernel_gate`` checks the Triton kernel against ``single_tensor_adam_power`` and ``torch_power_``. They
take validated hyperparameters (the callers check them once, where they enter).

- ``powered_copy``: phi written straight into a grad's copy (the torch step paths' grads);
- ``torch_power_``: phi in place, in bounded chunks (grad_power_ where no kernel takes a tensor);
- ``single_tensor_adam_power``: foreach=False, the reference path;
- ``multi_tensor_adam_power``: foreach=True, and the automatic choice where nothing faster applies;
- ``torch_fused_adam_power``: the automatic choice on CUDA without the Triton kernel: phi into the copy, then
  torch's own fused Adam(W) kernel.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .hyperparams import bias_corrections
from .ops import native_adam_power as native

CHUNK = native.CHUNK  # elements per scratch chunk of torch_power_
MULTI_TENSOR_BATCH = 1 << 24  # elements per multi-tensor batch: two fp32 temporaries of 64 MiB at most
TORCH_FUSED_DEVICES = ("cuda",)  # where the automatic choice's torch path steps with torch's fused Adam(W) kernel
TORCH_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def powered_copy(g: torch.Tensor, dtype: torch.dtype, p: float, eps: float,
                 scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """phi_p(g * scale) as a new `dtype` tensor, g untouched: the torch paths' grad copy.

    phi is written straight into the copy (abs into it, pow_, copysign_ from the grad): 28 bytes per
    element for an fp32 grad, where a copy and then phi in place took 44; no temporary besides the copy
    (a bool mask with eps). scale (a positive float or one-element tensor, a wrapper's unscale/clip
    coefficient): the copy is g * scale first, as ``g.to(dtype).mul_(scale)``, one pass more. p and eps
    arrive validated (the functional core's callers check them).
    """
    if scale is None:
        copy = torch.abs(g) if g.dtype == dtype else g.to(dtype, copy=True).abs_()
    else:
        copy = (torch.mul(g, scale) if g.dtype == dtype else g.to(dtype, copy=True).mul_(scale)).abs_()
    zero = copy == 0 if eps else None  # phi(+-0) = +-0 (a product may underflow to 0 where g is not)
    if eps:
        copy.add_(eps)
    copy.pow_(p)
    if eps:
        copy.masked_fill_(zero, 0.0)
    return copy.copysign_(g)  # scale > 0: g * scale has g's sign, zeros included


def torch_power_(t: torch.Tensor, p: float, eps: float) -> None:
    """phi_p in place with torch ops, computed in fp32 (fp64 for fp64 tensors), in chunks of at most CHUNK elements
    (the scratch is bounded whatever t's size). p and eps arrive validated."""
    compute = torch.float64 if t.dtype == torch.float64 else torch.float32
    for chunk in _chunk_views(t):
        x = chunk if chunk.dtype == compute else chunk.to(compute)
        mag = x.abs()
        if eps:
            mag.add_(eps)
        mag.pow_(p).copysign_(x)
        if eps:
            mag = torch.where(x == 0, x, mag)  # phi(+-0) = +-0
        chunk.copy_(mag)


def _chunk_views(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Views of t of at most CHUNK elements (a non-contiguous t is split along its first dimension)."""
    if t.numel() == 0:
        return
    if t.is_contiguous() or t.dim() == 0:
        flat = t.reshape(-1)
        for begin in range(0, flat.numel(), CHUNK):
            yield flat[begin:begin + CHUNK]
        return
    rows = max(1, CHUNK // max(1, t[0].numel()))
    for begin in range(0, t.shape[0], rows):
        yield t[begin:begin + rows]


def single_tensor_adam_power(params, grads, exp_avgs, exp_avg_sqs, steps, copies, *, lr, beta1, beta2, eps,
                             weight_decay, power, power_eps, adam_w_mode, bias_correction, grad_scale=None) -> None:
    """The single-tensor path (foreach=False): torch ops one tensor at a time in torch.optim.AdamW's order, so that
    with power = 1 it is bitwise torch.optim.Adam(W)(foreach=False); the reference the other paths are held to."""
    for p, grad, exp_avg, exp_avg_sq, step_t, copy in zip(params, grads, exp_avgs, exp_avg_sqs, steps, copies):
        grad = powered_copy(grad, p.dtype, power, power_eps, grad_scale)
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


def multi_tensor_adam_power(params, grads, exp_avgs, exp_avg_sqs, steps, copies, *, lr, beta1, beta2, eps,
                            weight_decay, power, power_eps, adam_w_mode, bias_correction, grad_scale=None) -> None:
    """The multi-tensor path (foreach=True): torch._foreach ops over batches of at most MULTI_TENSOR_BATCH elements,
    phi written into each batch's grad copies (powered_copy)."""
    torch._foreach_add_(steps, 1)
    corrections = [bias_corrections(beta1, beta2, s.item(), bias_correction) for s in steps]
    for ps, gs, ms, vs, bcs in _batches(params, grads, exp_avgs, exp_avg_sqs, corrections):
        gs = [powered_copy(g, p.dtype, power, power_eps, grad_scale) for p, g in zip(ps, gs)]
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
    _copy_out(params, copies)


def torch_fused_adam_power(params, grads, exp_avgs, exp_avg_sqs, steps, copies, *, lr, beta1, beta2, eps,
                           weight_decay, power, power_eps, adam_w_mode, bias_correction, grad_scale=None) -> None:
    """phi into the grads' copy, then torch's fused Adam(W) kernel, per batch (bias_correction is always on here:
    torch's kernel has no switch; the dispatch sends bias_correction=False to the multi-tensor path)."""
    torch._foreach_add_(steps, 1)
    step_kernel = torch._fused_adamw_ if adam_w_mode else torch._fused_adam_  # torch's Adam: L2 into the grad
    for ps, gs, ms, vs, counts in _batches(params, grads, exp_avgs, exp_avg_sqs, [s.item() for s in steps]):
        gs = [powered_copy(g, p.dtype, power, power_eps, grad_scale) for p, g in zip(ps, gs)]
        device_steps = torch.tensor(counts, dtype=torch.float32)  # torch's kernel reads the counts on the device
        if ps[0].is_cuda:
            device_steps = device_steps.pin_memory().to(ps[0].device, non_blocking=True)
        step_kernel(ps, gs, ms, vs, [], list(device_steps.unbind()), lr=lr, beta1=beta1, beta2=beta2,
                    weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
    _copy_out(params, copies)


def _copy_out(params, copies) -> None:
    """Each new param rounded into its low-precision copy, where it has one."""
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
