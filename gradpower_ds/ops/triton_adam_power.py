"""AdamPower on the GPU: one Triton kernel, one pass over the fp32 master state per step.

Per element it reads param, grad, exp_avg and exp_avg_sq once and writes param,
exp_avg and exp_avg_sq once (28 bytes for fp32 grads), doing in registers:
phi_p(g) = sign(g) * (|g| + power_eps)**p, Adam's L2 term or AdamW's decay, the
moments, the bias-corrected update (torch.optim.AdamW's operation order; the
bias corrections are computed on the host per step and passed as scalars) and,
optionally, the rounding of the new weights into a bf16/fp16 copy (mixed
precision master weights). Grads may be fp32, bf16 or fp16 (widened in the
kernel; phi is applied to the widened value); moments are fp32.

|g|**p is exp2(p * log2|g|) in fp32. p == 1 is a compile-time flag: that
specialisation contains no log2/exp2 at all, so AdamPower(power=1) is exactly
Adam(W). Inputs below FLT_MIN and results below 2**-126 are rescaled by 2**24
around log2/exp2, so subnormals survive even where the GPU's approximate
log2/exp2 (or libdevice, which Triton links with FTZ) would flush them.

Multi-tensor, like apex's multi_tensor_apply: one launch covers many tensors.
The host packs, per tensor, the addresses (data_ptr()) of param, grad,
exp_avg, exp_avg_sq and copy, its numel and its first program number into
one int64 table; a second table maps every program to its tensor. Each
program loads its tensor's addresses, casts them to typed pointers and updates
one block of BLOCK elements. The body is compiled twice into the kernel, an
unmasked variant that whole blocks take and a masked one for each tensor's
partial last block (a mask from a numel loaded at run time would stop Triton
from using 16-byte vector accesses), and each program takes one at run time. So
a param group is one launch, or one per (step count, grad dtype, copy dtype)
bucket if its tensors differ in those; groups, each with its own p, are
separate launches. What a step needs besides its
scalars is prepared once per param group and kept (``_Plan``: the tensors
checked, the tables on the device, the step counts), so a training loop's
later steps only check that nothing moved, advance the counters with one add
and launch: 46 us of host time per step for 16 tensors, 172 us re-planned
(``bench_triton_adam_power.py --host-only``). ``triton_grad_power_`` runs the same kernel with only
its phi part (PHI_ONLY): the gradients powered in place, one pass, no scratch.

Automatic choices (``AdamPower(fused=None)``, ``grad_power_``) take this kernel on a GPU once it has
passed its check there (``gradpower_ds.kernel_gate``, once per GPU kind, Triton version and grad
dtype); ``fused=True`` always does.

Triton's interpreter (TRITON_INTERPRET=1) runs this same kernel on CPU tensors,
which is how it is tested without a GPU: there, addresses from data_ptr() are
host memory the interpreter can dereference. It cannot run it on CUDA tensors:
the interpreter copies to the host only the tensors passed as arguments, not
the ones reached through the address table. So interpreted launches require
CPU tensors and compiled ones CUDA tensors.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Sequence

import torch

from ..hyperparams import bias_corrections

try:
    import triton
    import triton.language as tl
except ImportError:  # the package works without Triton; triton_unavailable_reason() says so
    triton = None

# elements per program (16 per thread at 8 warps: four 16-byte accesses per fp32 stream) and warps per program:
# chosen by hand on 2026-11-27; bench_triton_adam_power.py --sweep (in tests/gpu/check.sh) measures the others
# (BLOCK 1024/2048/4096 x 4/8 warps), not yet run on a GPU
BLOCK = 4096
NUM_WARPS = 8
_ALIGN = 16  # bytes; when every address is a multiple, the kernel is told so and can use 16-byte accesses
_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_COPY_DTYPES = (torch.bfloat16, torch.float16)


def triton_unavailable_reason() -> str | None:
    """Why the Triton kernel cannot run here, or None when it can (for error messages)."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if not (torch.cuda.is_available() or _interpreting()):
        return ("there is no CUDA device (TRITON_INTERPRET=1 runs the kernel on CPU tensors through Triton's "
                "interpreter)")
    return None


def triton_available() -> bool:
    """True when Triton imports and either a CUDA device is present or TRITON_INTERPRET=1 is set."""
    return triton_unavailable_reason() is None


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _adam_power_kernel(
    p_addrs, g_addrs, m_addrs, v_addrs, copy_addrs, numels, first_programs, program_tensor, grad_scale,
    lerp_coeff, lerp_from_grad, beta2, one_minus_beta2, eps, neg_step_size, bias_corr2_sqrt, decay, weight_decay,
    power, power_eps,
    GRAD_DTYPE: tl.constexpr, COPY_DTYPE: tl.constexpr, HAS_COPY: tl.constexpr, POWER_IS_ONE: tl.constexpr,
    DECAY: tl.constexpr, L2: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
    PHI_ONLY: tl.constexpr, SCALED: tl.constexpr,
):
    """One block of one tensor: program pid updates block pid - first_programs[t] of tensor t = program_tensor[pid].

    *_addrs hold each tensor's data_ptr()s, numels its sizes. A whole block takes the unmasked variant of the
    body (16-byte accesses), a tensor's partial last block the masked one, in the same launch: the body is
    written once and instantiated twice (static_range), one of the two taken per program at run time. DECAY is
    AdamW's p *= 1 - lr * wd, L2 Adam's g += wd * p; ALIGNED promises 16-byte aligned addresses. SCALED: the
    widened grad is multiplied by the fp32 value at grad_scale first (a wrapper's unscale/clip coefficient, read on
    the device: no host sync); without it grad_scale is not read.
    PHI_ONLY: only g <- phi_p(g), in place, computed in fp32 (the host passes the grads' addresses as
    copy_addrs, HAS_COPY and COPY_DTYPE = their dtype); p/m/v are then not touched.
    """
    pid = tl.program_id(0)
    t = tl.load(program_tensor + pid)
    start = (pid - tl.load(first_programs + t)) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    partial = (start + BLOCK > numel).to(tl.int32)
    for MASKED in tl.static_range(2):
        if partial == MASKED:
            if MASKED:
                mask = offs < numel
            else:
                mask = None
            g_ptr = tl.load(g_addrs + t).to(tl.pointer_type(GRAD_DTYPE))
            if ALIGNED:
                g_ptr = tl.multiple_of(g_ptr, 16)
            g = tl.load(g_ptr + offs, mask=mask)
            if GRAD_DTYPE == tl.bfloat16:  # widened bitwise, exact (the interpreter's bf16 emulation drops subnormals)
                g = (g.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
            else:
                g = g.to(tl.float32)
            if SCALED:
                g = g * tl.load(grad_scale)

            # phi_p(g) = sign(g) * (|g| + power_eps)**p; phi(+-0) = +-0, NaN stays NaN, +-Inf stay +-Inf.
            mag = tl.abs(g) + power_eps
            if not POWER_IS_ONE:
                tiny = mag < 1.1754943508222875e-38  # below FLT_MIN: scale up by 2**24 (exact) for log2
                y = power * (tl.log2(tl.where(tiny, mag * 16777216.0, mag)) - tl.where(tiny, 24.0, 0.0))
                low = y < -126.0  # subnormal result: exp2(y + 24) (y + 24 is exact), then scaled by 2**-24
                mag = tl.exp2(tl.where(low, y + 24.0, y)) * tl.where(low, 5.9604644775390625e-08, 1.0)
            g = tl.where(g > 0, mag, tl.where(g < 0, -mag, g))

            if PHI_ONLY:
                out = g
            else:
                p_ptr = tl.load(p_addrs + t).to(tl.pointer_type(tl.float32))
                m_ptr = tl.load(m_addrs + t).to(tl.pointer_type(tl.float32))
                v_ptr = tl.load(v_addrs + t).to(tl.pointer_type(tl.float32))
                if ALIGNED:
                    p_ptr = tl.multiple_of(p_ptr, 16)
                    m_ptr = tl.multiple_of(m_ptr, 16)
                    v_ptr = tl.multiple_of(v_ptr, 16)
                p = tl.load(p_ptr + offs, mask=mask)
                m = tl.load(m_ptr + offs, mask=mask)
                v = tl.load(v_ptr + offs, mask=mask)

                # Adam(W) in torch.optim.AdamW's order and roundings: add(alpha=), lerp_ and addcmul_ as torch's CPU
                # kernels compute them (one fma each; lerp_ from the nearer end), IEEE-rounded sqrt and division.
                if DECAY:
                    p = p * decay
                if L2:
                    g = tl.fma(weight_decay, p, g)
                m = tl.fma(lerp_coeff, g - m, tl.where(lerp_from_grad, g, m))
                v = tl.fma(one_minus_beta2 * g, g, v * beta2)
                denom = tl.div_rn(tl.sqrt_rn(v), bias_corr2_sqrt) + eps
                p = p + tl.div_rn(neg_step_size * m, denom)

                tl.store(p_ptr + offs, p, mask=mask)
                tl.store(m_ptr + offs, m, mask=mask)
                tl.store(v_ptr + offs, v, mask=mask)
                out = p
            if HAS_COPY:  # PHI_ONLY: phi(g) back into the grad (COPY_DTYPE is its dtype); else the new weights' copy
                c_ptr = tl.load(copy_addrs + t).to(tl.pointer_type(COPY_DTYPE))
                if ALIGNED:
                    c_ptr = tl.multiple_of(c_ptr, 16)
                if COPY_DTYPE == tl.bfloat16:
                    # torch's round-to-nearest-even spelled out, so the result is bitwise x.to(torch.bfloat16) (NaN
                    # becomes 0x7FC0, as in torch's scalar path); the interpreter's bf16 emulation rounds otherwise.
                    bits = out.to(tl.uint32, bitcast=True)
                    bits = tl.where(out != out, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
                    low = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
                else:
                    low = out.to(COPY_DTYPE)
                tl.store(c_ptr + offs, low, mask=mask)


@functools.cache
def _kernel(interpret: bool):
    # Jitted on first use, once per mode: triton.jit reads TRITON_INTERPRET when called, so the
    # interpreted and the compiled kernel are distinct objects, whenever the variable was set.
    return triton.jit(_adam_power_kernel)


def _upload(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Through pinned memory, asynchronously: a plain copy from pageable memory would wait for the stream.
    host = torch.tensor(values, dtype=dtype)
    return host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=64)
def _device_tensor(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Keyed by content, so a hit is always right: one host-to-device copy per new address set.
    return _upload(values, dtype, device)


@functools.lru_cache(maxsize=64)
def _layout(numels: tuple[int, ...], device: torch.device):
    # The program -> tensor map over every block of every tensor (on the device) and, per tensor, the program that
    # takes its block 0, so that program pid works on block pid - first of its tensor.
    programs, firsts = [], []
    for t, n in enumerate(numels):
        firsts.append(len(programs))
        programs.extend([t] * -(-n // BLOCK))
    return _upload(programs, torch.int32, device), tuple(firsts)


def _check(t: torch.Tensor, like: torch.Tensor, dtypes, what: str) -> None:
    if t.dtype not in dtypes or t.device != like.device or t.shape != like.shape or not t.is_contiguous():
        raise TypeError(
            f"triton_adam_power_step: {what} must be a contiguous {'/'.join(str(d) for d in dtypes)} tensor on "
            f"{like.device} shaped {tuple(like.shape)}, got {'' if t.is_contiguous() else 'non-contiguous '}"
            f"{t.dtype} on {t.device} shaped {tuple(t.shape)}"
        )


def triton_adam_power_step(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor], steps: Sequence[torch.Tensor], *, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, adam_w_mode: bool, power: float, power_eps: float, bias_correction: bool,
    low_precision_params: Sequence[torch.Tensor | None] | None = None,
    grad_scale: float | torch.Tensor | None = None,
) -> None:
    """One AdamPower step over a list of tensors, in place, with the fused Triton kernel.

    The functional form of the step (as torch.optim's functional adamw): params,
    exp_avgs and exp_avg_sqs are contiguous fp32 tensors, grads fp32/bf16/fp16
    of the same shapes (non-contiguous ones are copied), steps the per-param
    float32 step counters (incremented here). low_precision_params, if given,
    holds per param a contiguous bf16 or fp16 tensor (or None) that receives
    the updated weights, bitwise equal to param.to(dtype) (NaN payloads aside).
    grad_scale, if given, multiplies the (widened) grads first, as ``grad.float().mul_(grad_scale)`` would:
    a float, or a one-element fp32 tensor on the params' device, read by the kernel (no host sync).
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Hyperparameters arrive
    validated (AdamPower validates its groups; gradpower_ds.hyperparams).

    The tensors' checks, launch tables and step counts are kept in a plan per set of tensors (``_Plan``),
    so a training loop's steps after its first only check that nothing moved and launch.
    """
    n = len(params)
    copies = list(low_precision_params) if low_precision_params is not None else [None] * n
    if not len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(steps) == len(copies) == n:
        raise ValueError("triton_adam_power_step: params, grads, exp_avgs, exp_avg_sqs, steps and "
                         "low_precision_params must have the same length")
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(CAPTURE_ERROR)
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    key = (*map(id, params), *map(id, exp_avgs), *map(id, exp_avg_sqs), *map(id, steps), *map(id, copies))
    signature = _signature(params, grads, copies)
    plan = _plans.get(key)
    if plan is None or plan.signature != signature or not plan.holds(params, exp_avgs, exp_avg_sqs, steps):
        plan = _plans[key] = _Plan(params, grads, exp_avgs, exp_avg_sqs, steps, copies, signature)
        while len(_plans) > _MAX_PLANS:
            del _plans[next(iter(_plans))]  # the oldest
    flags = dict(POWER_IS_ONE=power == 1.0, DECAY=adam_w_mode and weight_decay != 0,
                 L2=not adam_w_mode and weight_decay != 0, PHI_ONLY=False, SCALED=grad_scale is not None)
    scale = _scale_tensor(grad_scale, params[0].device) if grad_scale is not None and n else None
    for launch, step in plan.advance(params, grads, exp_avgs, exp_avg_sqs, steps, copies):
        bc1, bc2_sqrt = bias_corrections(beta1, beta2, step, bias_correction)
        scalars = (
            # torch's lerp_(g, w): m + w * (g - m) for w < 0.5, else g + (w - 1) * (g - m)
            1 - beta1 if beta1 > 0.5 else -beta1, beta1 <= 0.5, beta2, 1 - beta2, eps, -(lr / bc1), bc2_sqrt,
            1 - lr * weight_decay, weight_decay, power, power_eps,
        )
        launch.run(scalars, scale, **flags)


def _scale_tensor(grad_scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """grad_scale as the one-element fp32 tensor on `device` that the kernel reads."""
    if not torch.is_tensor(grad_scale):
        return _device_tensor((float(grad_scale),), torch.float32, device)
    if grad_scale.numel() != 1 or grad_scale.dtype != torch.float32 or grad_scale.device != device:
        raise TypeError(f"triton_adam_power_step: grad_scale must be a float or a one-element float32 tensor on "
                        f"{device}, got {grad_scale.dtype} {tuple(grad_scale.shape)} on {grad_scale.device}")
    return grad_scale


CAPTURE_ERROR = (
    "triton_adam_power_step: an AdamPower step cannot be captured in a CUDA graph: the step counts and bias "
    "corrections are host values, so a replay would repeat the captured step's; run optimizer.step() outside the "
    "graph (capture the forward and backward only)")

_MAX_PLANS = 64  # param groups (a plan each) a process keeps; beyond, the oldest is dropped
_plans: dict[tuple, _Plan] = {}  # by the identity of the tensors of a call


def _signature(params, grads, copies) -> tuple:
    """What a plan's checks and address tables depend on besides the state's identity (``_Plan.holds``): the
    params' and copies' addresses (``param.data = ...`` moves one), the grads' addresses, dtypes and sizes (grads are
    often new tensors each step, at the same address)."""
    return (*(t.data_ptr() for t in (*params, *grads)), *(g.dtype for g in grads), *(g.numel() for g in grads),
            *(c.data_ptr() if c is not None else 0 for c in copies))


def _common_base(steps) -> torch.Tensor | None:
    """The 1-d tensor whose elements the step counters are, in order (AdamPowerBase allocates a group's counters
    so), which one in-place add advances; None when they are separate tensors (e.g. after a state load)."""
    base = steps[0]._base if steps else None
    if base is None or base.dim() != 1 or base.numel() != len(steps) or not base.is_contiguous():
        return None
    start = base.storage_offset()
    ok = all(s._base is base and s.dim() == 0 and s.storage_offset() == start + i for i, s in enumerate(steps))
    return base if ok else None


class _Plan:
    """One param group's step, prepared once: every tensor checked, its launches (one bucket per step count, grad
    dtype and copy dtype) with their address tables on the device, and its step counts.

    It holds no tensor (grads come and go; the state's lifetime is its optimizer's), only weak references to the
    state, addresses, device tables and counts. A call reuses it while the same state tensors come back, with
    everything at the same addresses (``_signature``). Step counters are advanced with one add where they are the
    elements of one tensor (as AdamPowerBase makes them), else one foreach add, and read back only when something
    else wrote them since (their version counters).
    """

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, steps, copies, signature):
        reason = triton_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"triton_adam_power_step: the Triton kernel cannot run: {reason}")
        device_type = "cpu" if _interpreting() else "cuda"
        for p, g, m, v, c in zip(params, grads, exp_avgs, exp_avg_sqs, copies):
            if p.device.type != device_type or p.dtype != torch.float32 or not p.is_contiguous():
                where = "CPU tensors (TRITON_INTERPRET=1 is set)" if device_type == "cpu" else "CUDA tensors"
                raise TypeError(f"triton_adam_power_step: params must be contiguous fp32 {where}, got "
                                f"{'' if p.is_contiguous() else 'non-contiguous '}{p.dtype} on {p.device}")
            _check(g, p, tuple(_TL_DTYPES), "a grad")
            _check(m, p, (torch.float32,), "an exp_avg")
            _check(v, p, (torch.float32,), "an exp_avg_sq")
            if c is not None:
                _check(c, p, _COPY_DTYPES, "a low-precision copy")
        self.signature = signature
        self.state = [weakref.ref(t) for t in (*params, *exp_avgs, *exp_avg_sqs, *steps)]
        base = _common_base(steps)  # one add advances every counter; else one foreach add
        self.step_base = weakref.ref(base) if base is not None else None
        self.counts: list[int] = []
        self.versions: list[int] | None = None  # the counters' versions after this plan last advanced them
        self.offsets: tuple | None = None  # each count minus the first: what the buckets depend on
        self.launches: list[tuple[int, _Launch]] = []  # (offset, launch)

    def holds(self, params, exp_avgs, exp_avg_sqs, steps) -> bool:
        """Whether these are the very state tensors it was made for (not others that reuse their ids)."""
        return all(ref() is t for ref, t in zip(self.state, (*params, *exp_avgs, *exp_avg_sqs, *steps)))

    def advance(self, params, grads, exp_avgs, exp_avg_sqs, steps, copies) -> list[tuple[_Launch, int]]:
        """Increments every step counter; returns this step's (launch, step count) pairs."""
        if self.versions != [s._version for s in steps]:  # first step, or written elsewhere: read them
            self.counts = [int(s.item()) for s in steps]
        if self.step_base is not None:
            self.step_base().add_(1)  # alive: the counters, which holds() found alive, are its views
        else:
            torch._foreach_add_(list(steps), 1)
        self.counts = [c + 1 for c in self.counts]
        self.versions = [s._version for s in steps]
        first = self.counts[0] if self.counts else 0
        offsets = tuple(c - first for c in self.counts)
        if offsets != self.offsets:  # the first step, or the counts no longer move together as before
            buckets: dict[tuple, list[tuple]] = {}
            for offset, p, g, m, v, c in zip(offsets, params, grads, exp_avgs, exp_avg_sqs, copies):
                buckets.setdefault((offset, g.dtype, c.dtype if c is not None else None), []).append((p, g, m, v, c))
            self.offsets = offsets
            self.launches = [(offset, _Launch(tensors, GRAD_DTYPE=grad_dtype, COPY_DTYPE=copy_dtype or torch.bfloat16,
                                              HAS_COPY=copy_dtype is not None))
                             for (offset, grad_dtype, copy_dtype), tensors in buckets.items()]
        return [(launch, first + offset) for offset, launch in self.launches]


def triton_grad_power_(tensors: Sequence[torch.Tensor], power: float, power_eps: float = 0.0) -> None:
    """phi_p in place on contiguous fp32/bf16/fp16 CUDA tensors (CPU ones under TRITON_INTERPRET=1).

    One launch per dtype (two where tensors end in a partial block); computed in fp32 and rounded once
    to each tensor's dtype (bf16 bitwise as torch rounds). p and power_eps must be validated.
    """
    reason = triton_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"triton_grad_power_: the Triton kernel cannot run: {reason}")
    device_type = "cpu" if _interpreting() else "cuda"
    buckets: dict[tuple, list[tuple]] = {}
    for g in tensors:
        if g.device.type != device_type or g.dtype not in _TL_DTYPES or not g.is_contiguous():
            raise TypeError(f"triton_grad_power_: needs contiguous {'/'.join(map(str, _TL_DTYPES))} "
                            f"{device_type.upper()} tensors, got {g.dtype} on {g.device}")
        buckets.setdefault((g.device, g.dtype), []).append((g,) * 5)  # every address column is the grad's
    scalars = (0.0, False, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, power, power_eps)  # only p and power_eps are read
    for (device, dtype), columns in buckets.items():
        _launch(columns, scalars, GRAD_DTYPE=dtype, COPY_DTYPE=dtype, HAS_COPY=True,
                POWER_IS_ONE=power == 1.0, DECAY=False, L2=False, PHI_ONLY=True, SCALED=False)


class _Launch:
    """The kernel over one bucket of (p, g, m, v, copy) tuples, prepared: the address table and the program maps on
    the device, the launch options (its constexprs; dtypes given as torch dtypes). Holds no tensor."""

    def __init__(self, tensors, **constexprs):
        tensors = [ts for ts in tensors if ts[1].numel()]
        self.device = tensors[0][1].device if tensors else None
        if not tensors:
            return
        numels = tuple(ts[1].numel() for ts in tensors)
        self.programs, firsts = _layout(numels, self.device)
        addrs = tuple(t.data_ptr() if t is not None else 0 for column in zip(*tensors) for t in column)
        table = _device_tensor(addrs + numels + firsts, torch.int64, self.device)
        self.rows = table.view(7, len(tensors)).unbind()  # p, g, m, v, copy addresses, numels, first programs
        self.options = dict(
            constexprs,
            GRAD_DTYPE=getattr(tl, _TL_DTYPES[constexprs["GRAD_DTYPE"]]),
            COPY_DTYPE=getattr(tl, _TL_DTYPES[constexprs["COPY_DTYPE"]]),
            ALIGNED=all(a % _ALIGN == 0 for a in addrs),
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,  # roundings as written, as in the interpreter and torch's CPU kernels
        )
        self.grid = (self.programs.numel(),)

    def run(self, scalars, grad_scale: torch.Tensor | None = None, **flags) -> None:
        """Launches it with these scalars, the grads' multiplier (a one-element fp32 tensor, read where SCALED) and
        the step's flags (POWER_IS_ONE, DECAY, L2, PHI_ONLY, SCALED): one launch."""
        if self.device is None:
            return
        kernel = _kernel(_interpreting())
        # Triton launches on the current CUDA device: switched only when it is another
        other = self.device.type == "cuda" and self.device.index != torch.cuda.current_device()
        with torch.cuda.device(self.device) if other else contextlib.nullcontext():
            kernel[self.grid](*self.rows, self.programs, self.programs if grad_scale is None else grad_scale,
                              *scalars, **self.options, **flags)


def _launch(tensors, scalars, **constexprs) -> None:
    """Launches the kernel once over (p, g, m, v, copy) tuples, unprepared (phi in place: ``triton_grad_power_``)."""
    flags = {k: constexprs.pop(k) for k in ("POWER_IS_ONE", "DECAY", "L2", "PHI_ONLY", "SCALED")}
    _Launch(tensors, **constexprs).run(scalars, **flags)
