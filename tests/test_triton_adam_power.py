"""The fused Triton AdamPower kernel against the reference AdamPower (foreach=False).

Runs without a GPU: every test here but the CUDA one sets TRITON_INTERPRET=1
through monkeypatch, so nothing leaks into other modules (the kernel is jitted
per mode on first use, so the variable may be set after triton is imported),
and Triton's interpreter runs the kernel on CPU tensors. The CUDA test compiles
it. bf16 grads are compared with the reference fed the same grads widened to
fp32: the kernel powers the widened value.

Tolerances, measured with the interpreter (worst case over the matrix):
- params: rtol 2**-21 (4 ulps) + atol 1e-6 * max|update|; measured beyond 4
  ulps: 2.9e-7 * max|update|. The kernel's phi (fp32 exp2(p * log2|g|), p and
  power_eps rounded to fp32) is ~1e-7 relative off the float64 reference, so
  the updates agree to ~1e-7 relative and the params to a few ulps (84-95% of
  them bitwise). With Adam's L2 term, elements whose first gradient
  phi(g) + wd * p cancels (6 of ~70,000 here) are left out: see
  _ill_conditioned. With p == 1 the kernel reproduces torch's CPU roundings
  (one fma in lerp_, addcmul_ and add(alpha=)): the moments are bitwise equal.
- moments: rtol 1e-6 + atol 1e-7 * max|moment|; measured: 4.7e-8 * max|moment|.
- phi alone on edge values: rtol 1e-5, atol one subnormal step; measured
  4.5e-6 (|g| near 3.4e38 and 1e-45: p * log2|g| ~ +-100 rounded to fp32),
  subnormal results exact. On a GPU log2/exp2 are approximate (~2 ulp), so the
  CUDA test allows the moments 2e-6 relative.
"""

import copy
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install triton; CI installs it from "
                                     "requirements-test.txt)")

from conftest import edge_tensor, grad_stream  # noqa: E402
from gradpower_ds import AdamPower, grad_power, grad_power_  # noqa: E402
from gradpower_ds.hyperparams import ADAM_POWER_DEFAULTS  # noqa: E402
from gradpower_ds.ops import triton_adam_power as tap  # noqa: E402
from gradpower_ds.power import fused_kernel  # noqa: E402
from reference import GRAD_SCALES, assert_grad_scale_is_prescaling  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The interpreter evaluates log2(0) = -inf, Inf - Inf and the like in numpy, which warns; the kernel means them.
pytestmark = [pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

SHAPES = [(0,), (1,), (7,), (1000,), (4097,), (33, 17), (2, 4096)]  # BLOCK = 4096: whole and partial blocks
GROUPS = [dict(power=1.0), dict(power=1.2), dict(power=0.8, power_eps=1e-8), dict(power=1.5),
          dict(power=1.0, power_eps=1e-3)]
STEPS = 5
LR = 1e-2
CONFIGS = {
    "adamw": dict(weight_decay=0.1),
    "adam_l2": dict(weight_decay=0.1, adam_w_mode=False),
    "no_weight_decay": dict(),
    "no_bias_correction": dict(weight_decay=0.1, bias_correction=False),
}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _train(device, grad_dtype=torch.float32, **optimizer_args):
    """STEPS steps of AdamPower over GROUPS x SHAPES; grads arrive in grad_dtype (widened for the reference).

    The (7,) param of every group has no grad at step 0, so its step count lags (a second launch bucket).
    Returns (params per group, initial params per group, first grad of every param per group, optimizer).
    """
    groups, inits, streams = [], [], []
    for gi, hyper in enumerate(GROUPS):
        gen = torch.Generator().manual_seed(gi)
        init = [torch.randn(s, generator=gen) for s in SHAPES]
        inits.append(init)
        groups.append(dict(params=[torch.nn.Parameter(t.to(device, copy=True)) for t in init], **hyper))
        streams.append([[g.to(grad_dtype) for g in grad_stream(s, STEPS, seed=10 * gi + i)]
                        for i, s in enumerate(SHAPES)])
    opt = AdamPower(groups, lr=LR, **optimizer_args)
    reference = optimizer_args.get("foreach") is False
    for k in range(STEPS):
        for group, stream in zip(groups, streams):
            for p, grads, shape in zip(group["params"], stream, SHAPES):
                if k == 0 and shape == (7,):
                    p.grad = None
                elif reference:
                    p.grad = grads[k].float().to(device)
                else:
                    p.grad_dtype = None  # lets a bf16 grad sit on an fp32 param
                    p.grad = grads[k].to(device)
        opt.step()
    firsts = [[grads[1 if shape == (7,) else 0].float() for grads, shape in zip(stream, SHAPES)] for stream in streams]
    return [g["params"] for g in groups], inits, firsts, opt


def _ill_conditioned(first_grad, init, hyper, l2_weight_decay):
    """Elements whose first Adam-L2 gradient phi(g) + wd * p cancels to below 1e-3 |phi(g)| and 1e-4.

    There the first update, lr * g / (|g| + eps) up to bias correction, is decided by phi's last digits:
    any two fp32 implementations of phi (~1e-7 apart) may differ there by ~1e-4 of lr, or even in sign.
    """
    phi = grad_power(first_grad.double(), hyper["power"], hyper.get("power_eps", 0.0))
    cancelled = (phi + l2_weight_decay * init.double()).abs()
    return (cancelled < 1e-3 * phi.abs()) & (cancelled < 1e-4)


def _assert_matches(fused_run, reference_run, l2_weight_decay=0.0, moment_rtol=1e-6):
    fused_params, inits, firsts, fused_opt = fused_run
    ref_params, _, _, ref_opt = reference_run
    excluded = 0
    for group_f, group_r, init, first, hyper in zip(fused_params, ref_params, inits, firsts, GROUPS):
        max_update = max((r.detach().cpu() - i).abs().max().item() for r, i in zip(group_r, init) if i.numel())
        for pf, pr, p0, g0 in zip(group_f, group_r, init, first):
            keep = ~_ill_conditioned(g0, p0, hyper, l2_weight_decay)
            excluded += (~keep).sum().item()
            sf, sr = fused_opt.state[pf], ref_opt.state[pr]
            torch.testing.assert_close(pf.detach().cpu()[keep], pr.detach()[keep], rtol=2**-21,
                                       atol=1e-6 * max_update)
            assert sf["step"].item() == sr["step"].item()
            for key in ("exp_avg", "exp_avg_sq"):
                ref = sr[key]
                scale = ref.abs().max().item() if ref.numel() else 0.0
                torch.testing.assert_close(sf[key].cpu()[keep], ref[keep], rtol=moment_rtol, atol=1e-7 * scale)
    assert excluded <= 10  # of ~70,000 elements


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32_grads", "bf16_grads"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_reference(config, grad_dtype):
    hyper = dict(ADAM_POWER_DEFAULTS, **CONFIGS[config])
    fused = _train("cpu", grad_dtype, fused=True, **CONFIGS[config])
    reference = _train("cpu", grad_dtype, foreach=False, **CONFIGS[config])
    _assert_matches(fused, reference, 0.0 if hyper["adam_w_mode"] else hyper["weight_decay"])


def test_power_one_moments_are_torch_bitwise():
    """p == 1 compiles without log2/exp2: the moments are bitwise the reference's (torch.optim.AdamW's)."""
    fused_params, _, _, fused_opt = _train("cpu", fused=True, weight_decay=0.1)
    ref_params, _, _, ref_opt = _train("cpu", foreach=False, weight_decay=0.1)
    for pf, pr in zip(fused_params[0], ref_params[0]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fused_opt.state[pf][key], ref_opt.state[pr][key])


@pytest.mark.parametrize("beta1", [0.5, 0.3, 0.0])
def test_small_beta1_lerps_from_the_grad_like_torch(beta1):
    """torch's lerp_ with weight 1 - beta1 >= 0.5 computes g + (w - 1) * (g - m): the kernel does too."""
    results = []
    for options in (dict(fused=True), dict(foreach=False)):
        p = torch.nn.Parameter(torch.randn(4097, generator=torch.Generator().manual_seed(0)))
        opt = AdamPower([p], lr=LR, betas=(beta1, 0.999), power=1.0, **options)
        for g in grad_stream(4097, 3):
            p.grad = g
            opt.step()
        results.append(opt.state[p]["exp_avg"])
    assert torch.equal(results[0], results[1])


def _functional_step(params, grads, copies=None, power=1.2, power_eps=0.0, beta1=0.9, steps=1):
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    counters = [torch.tensor(0.0) for _ in params]
    for _ in range(steps):
        tap.triton_adam_power_step(params, grads, exp_avgs, exp_avg_sqs, counters, lr=LR, beta1=beta1,
                                   beta2=0.999, eps=1e-8, weight_decay=0.1, adam_w_mode=True, power=power,
                                   power_eps=power_eps, bias_correction=True, low_precision_params=copies)
    return exp_avgs, exp_avg_sqs


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [*GRAD_SCALES, "tensor"])
@pytest.mark.parametrize("power_eps", [0.0, 1e-8])
def test_grad_scale_is_bitwise_the_grads_multiplied_first(grad_dtype, scale, power_eps):
    """The kernel's SCALED variant (a float, or a one-element tensor it reads on the device) against its unscaled
    variant fed grads multiplied beforehand, as DeepSpeed's and Megatron's unscale/clip would."""
    scale = torch.tensor([0.37]) if scale == "tensor" else scale

    def step(params, grads, exp_avgs, exp_avg_sqs, steps, **kwargs):
        tap.triton_adam_power_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr=LR, beta1=0.9, beta2=0.999,
                                   eps=1e-8, weight_decay=0.1, adam_w_mode=True, power=1.2, bias_correction=True,
                                   **kwargs)

    assert_grad_scale_is_prescaling(step, [(1000,), (4097,), (0,), (5,)], grad_dtype, scale, power_eps)


def test_a_step_being_captured_in_a_cuda_graph_is_refused(monkeypatch):
    """Its host-side step counts would be frozen into the graph (a replay repeating one step's bias corrections):
    refused with what to do instead, before anything is written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    param, step = torch.ones(4), torch.tensor(0.0)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph.*outside the graph"):
        tap.triton_adam_power_step([param], [torch.ones(4)], [torch.zeros(4)], [torch.zeros(4)], [step], lr=LR,
                                   beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, adam_w_mode=True, power=1.2,
                                   power_eps=0.0, bias_correction=True)
    assert torch.equal(param, torch.ones(4)) and step.item() == 0.0


def test_grad_scale_must_be_a_one_element_fp32_tensor_on_the_device():
    params = [torch.zeros(4)]
    with pytest.raises(TypeError, match="grad_scale must be a float or a one-element float32 tensor on cpu"):
        tap.triton_adam_power_step(params, [torch.ones(4)], [torch.zeros(4)], [torch.zeros(4)], [torch.tensor(0.0)],
                                   lr=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, adam_w_mode=True,
                                   power=1.2, power_eps=0.0, bias_correction=True,
                                   grad_scale=torch.tensor([0.5], dtype=torch.float64))


@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_copy_is_param_to_dtype(copy_dtype):
    shapes = [(7,), (0,), (4097,), (33, 17)]
    init = [torch.randn(s) for s in shapes]
    init[2][:6] = torch.tensor([float("inf"), -float("inf"), 3.4028235e38, -3.4028235e38, 1e-40, float("nan")])
    grads = [grad_stream(s, 1, seed=i)[0] for i, s in enumerate(shapes)]
    with_copy, without_copy = [t.clone() for t in init], [t.clone() for t in init]
    copies = [torch.full(s, float("nan"), dtype=copy_dtype) for s in shapes]
    copies[0] = None  # a param without a copy: a bucket of its own
    _functional_step(with_copy, grads, copies, steps=2)
    _functional_step(without_copy, grads, steps=2)
    for p, q, c in zip(with_copy, without_copy, copies):
        assert torch.equal(p.nan_to_num(), q.nan_to_num()) and torch.equal(p.isnan(), q.isnan())
        if c is not None:  # bitwise, but NaN payloads (torch's own vectorised and scalar paths differ there)
            expected = p.to(copy_dtype)
            assert torch.equal(c.isnan(), expected.isnan())
            assert torch.equal(c[~c.isnan()].view(torch.int16), expected[~expected.isnan()].view(torch.int16))


EXTRA_SMALL = [1e-35, -3e-36, 1e-33, -2.5e-31, 1e-30, 5e-39]  # |phi| subnormal for p = 1.2, 1.5


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("power,power_eps", [(1.0, 0.0), (1.0, 1e-8), (0.8, 0.0), (1.2, 0.0), (1.2, 1e-8),
                                             (1.5, 0.0)])
def test_phi_edge_values(power, power_eps, grad_dtype):
    """phi alone on 0, -0, subnormals, FLT_MIN, huge, +-Inf, NaN against gradpower_ds.power.grad_power.

    With beta1 = 0.75 and zero moments, exp_avg after one step is 0.25 * phi(g) (a power-of-two
    scaling, exact but for subnormals, where the reference side rounds the same way).
    """
    g = torch.cat([edge_tensor(), torch.tensor(EXTRA_SMALL)]).to(grad_dtype)
    (m,), _ = _functional_step([torch.zeros(g.shape)], [g], power=power, power_eps=power_eps, beta1=0.75)
    expected = 0.25 * grad_power(g.float(), power, power_eps)
    torch.testing.assert_close(m, expected, rtol=1e-5, atol=2.0**-149, equal_nan=True)
    finite = torch.isfinite(expected) & (expected != 0)
    assert torch.equal(m.isnan(), expected.isnan()) and torch.equal(m.isinf(), expected.isinf())
    assert torch.equal(m[finite].sign(), expected[finite].sign())


def test_fused_true_needs_triton(monkeypatch):
    monkeypatch.setattr(tap, "triton", None)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        fused_kernel(torch.device("cuda"), True)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert fused_kernel(torch.device("cpu"), True) == "native"  # fused=True on CPU tensors: the native kernel


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a CUDA device")
def test_fused_true_needs_a_device_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        fused_kernel(torch.device("cuda"), True)
    assert fused_kernel(torch.device("cuda"), None) is None  # automatic: never a kernel that cannot run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("power,power_eps", [(1.2, 0.0), (0.8, 1e-8), (1.5, 0.0), (1.0, 1e-3)])
def test_phi_only_kernel_in_place(dtype, power, power_eps):
    """triton_grad_power_ (PHI_ONLY): phi in place, computed in fp32, rounded once to the tensor's dtype."""
    edges = torch.cat([edge_tensor(), torch.tensor(EXTRA_SMALL)])
    tensors = [edges.to(dtype), (torch.randn(4097) * 10.0 ** torch.randint(-20, 20, (4097,))).to(dtype),
               torch.randn(33, 17).to(dtype), torch.zeros(0, dtype=dtype)]
    originals = [t.clone() for t in tensors]
    addresses = [t.data_ptr() for t in tensors]
    grad_power_(tensors, power, power_eps, fused=True)
    assert [t.data_ptr() for t in tensors] == addresses
    for got, x in zip(tensors, originals):
        expected = grad_power(x.double(), power, power_eps)  # float64, rounded once below
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=2.0**-149, equal_nan=True)
        else:  # fp32 maths within 1e-5 of float64, then one rounding: equal, or one ulp off at a tie
            torch.testing.assert_close(got, expected.to(dtype), rtol=2.0**-7, atol=0, equal_nan=True)
        assert torch.equal(got.isnan(), x.isnan()) and torch.equal(got == 0, expected.to(dtype) == 0)


def test_fused_and_foreach_are_exclusive():
    with pytest.raises(ValueError, match="mutually exclusive"):
        AdamPower([torch.nn.Parameter(torch.zeros(3))], fused=True, foreach=True)


@pytest.mark.parametrize("options", [dict(fused=False), dict(), dict(foreach=True), dict(foreach=False)])
def test_kernel_not_used_unless_chosen(monkeypatch, options):
    """fused=False never runs the kernel; the automatic choice takes it only for CUDA params."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the Triton kernel ran")

    monkeypatch.setattr(tap, "triton_adam_power_step", forbidden)
    p = torch.nn.Parameter(torch.ones(5))
    p.grad = torch.full((5,), 0.5)
    AdamPower([p], **options).step()
    assert p.detach().lt(1).all()


def test_kernel_rejects_unsupported_tensors():
    params, m, v, s = [torch.zeros(4, dtype=torch.float64)], [torch.zeros(4)], [torch.zeros(4)], [torch.tensor(0.0)]
    kwargs = dict(lr=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, adam_w_mode=True, power=1.2,
                  power_eps=0.0, bias_correction=True)
    with pytest.raises(TypeError, match="contiguous fp32 CPU tensors"):
        tap.triton_adam_power_step(params, [torch.zeros(4)], m, v, s, **kwargs)
    with pytest.raises(TypeError, match="a grad must be"):
        tap.triton_adam_power_step([torch.zeros(4)], [torch.zeros(5)], m, v, s, **kwargs)
    with pytest.raises(ValueError, match="same length"):
        tap.triton_adam_power_step([torch.zeros(4)], [], m, v, s, **kwargs)
    assert s[0].item() == 0.0  # nothing was stepped


def test_bench_gpu_step_smoke():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_triton_adam_power.py"), "--interpret-smoke"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("d2d copy", "ours p=1.2", "ours p=1", "ours p=1.2 +bf16 copy", "torch_adamw_fused",
                 "two-pass p=1.2", "TARGET"):
        assert name in out.stdout, out.stdout


def _compile_for_sm90(constexprs: dict):
    """The kernel compiled ahead of time for an H100 (sm_90) by Triton's own compiler and ptxas: no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "*i64" for name in ("p_addrs", "g_addrs", "m_addrs", "v_addrs", "copy_addrs", "numels",
                                           "first_programs")}
    signature["program_tensor"] = "*i32"
    signature["grad_scale"] = "*fp32"
    signature.update({name: "fp32" for name in ("lerp_coeff", "lerp_from_grad", "beta2", "one_minus_beta2", "eps",
                                                "neg_step_size", "bias_corr2_sqrt", "decay", "weight_decay", "power",
                                                "power_eps")})
    signature["lerp_from_grad"] = "i1"
    signature.update({name: "constexpr" for name in constexprs})
    names = list(signature)
    source = ASTSource(fn=triton.jit(tap._adam_power_kernel), signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=tap.NUM_WARPS, enable_fp_fusion=False))


@pytest.mark.parametrize("phi_only", [False, True], ids=["adam", "phi_only"])
@pytest.mark.parametrize("grad_dtype", ["float32", "bfloat16", "float16"])
def test_kernel_compiles_for_sm90_in_every_variant(phi_only, grad_dtype, monkeypatch):
    """Compiled mode, which the interpreter does not exercise: every constexpr variant lowers to an sm_90 cubin with
    both bodies (whole blocks with 16-byte vector loads, partial ones masked); the phi-only variant has no Adam
    arithmetic (no sqrt) in it. The Adam variants with a copy also take the grads' multiplier (SCALED)."""
    import triton.language as tl

    monkeypatch.delenv("TRITON_INTERPRET")  # triton.jit then gives the compiler's kernel, not the interpreter's

    for power_is_one in (False, True):
        has_copy = phi_only or grad_dtype == "bfloat16"
        try:
            compiled = _compile_for_sm90(dict(
                GRAD_DTYPE=getattr(tl, grad_dtype), COPY_DTYPE=getattr(tl, grad_dtype if phi_only else "bfloat16"),
                HAS_COPY=has_copy, POWER_IS_ONE=power_is_one, DECAY=not phi_only, L2=False, ALIGNED=True,
                BLOCK=tap.BLOCK, PHI_ONLY=phi_only, SCALED=has_copy and not phi_only))
        except Exception as exc:
            if "ptxas" in str(exc) and ("not found" in str(exc) or "No such file" in str(exc)):
                pytest.skip(f"Triton's ptxas is not available here: {exc}")
            raise
        ptx = compiled.asm["ptx"]
        assert compiled.asm.get("cubin")
        # one kernel, both variants: whole blocks with 16-byte accesses, partial ones with masked (guarded) scalar ones
        assert "ld.global.v4" in ptx and re.search(r"@%p\d+ ld\.global\.b(16|32)", ptx), ptx[-2000:]
        assert ("sqrt.rn" in ptx) is not phi_only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_compiled_on_cuda_matches_reference(monkeypatch):
    """The compiled kernel, chosen automatically for CUDA params, against the CPU reference."""
    monkeypatch.delenv("TRITON_INTERPRET")
    calls = []
    kernel_step = tap.triton_adam_power_step
    monkeypatch.setattr(tap, "triton_adam_power_step", lambda *a, **k: calls.append(1) or kernel_step(*a, **k))
    for config in CONFIGS.values():
        hyper = dict(ADAM_POWER_DEFAULTS, **config)
        for grad_dtype in (torch.float32, torch.bfloat16):
            _assert_matches(_train("cuda", grad_dtype, **config), _train("cpu", grad_dtype, foreach=False, **config),
                            0.0 if hyper["adam_w_mode"] else hyper["weight_decay"], moment_rtol=2e-6)
    assert calls
    p = torch.randn(4097, device="cuda")
    copy = torch.empty(4097, device="cuda", dtype=torch.bfloat16)
    exp_avgs, exp_avg_sqs, steps = [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.tensor(0.0)]
    kernel_step([p], [torch.randn_like(p)], exp_avgs, exp_avg_sqs, steps, lr=LR, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, adam_w_mode=True, power=1.2, power_eps=0.0, bias_correction=True,
                low_precision_params=[copy])
    assert torch.equal(copy, p.to(torch.bfloat16))
    assert math.isfinite(p.sum().item())


# ---- the per-group plan: checks, tables and step counts kept between steps --------------------------------------

def _plans_made(monkeypatch):
    made = []
    real = tap._Plan.__init__
    monkeypatch.setattr(tap._Plan, "__init__", lambda self, *a: made.append(1) or real(self, *a))
    return made


def _fused_and_reference(steps=4, between=None):
    """AdamPower(fused=True) and the reference over the same grads, each step's grads new tensors in one persistent
    buffer (as DeepSpeed hands them over): returns both optimizers and params."""
    runs = []
    for options in (dict(fused=True), dict(foreach=False)):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                  for i, s in enumerate([(4097,), (33, 17), (5,)])]
        buffer = torch.zeros(sum(p.numel() for p in params))
        opt = AdamPower(params, lr=LR, weight_decay=0.1, **options)
        for k in range(steps):
            offset = 0
            for i, p in enumerate(params):
                view = buffer[offset:offset + p.numel()].view_as(p)
                view.copy_(grad_stream(p.shape, steps, seed=i)[k])
                p.grad, offset = view, offset + p.numel()  # a new tensor object, the same address, every step
            opt.step()
            if between:
                between(k, opt)
        runs.append((opt, params))
    return runs


def test_a_plan_is_made_once_and_kept_while_the_tensors_stay(monkeypatch):
    made = _plans_made(monkeypatch)
    (fused, ours), (_, reference) = _fused_and_reference()
    assert len(made) == 1  # four steps, new grad tensors at the same addresses: one plan
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=2.0**-21, atol=1e-6)
    assert [fused.state[p]["step"].item() for p in ours] == [4.0] * 3
    assert tap._common_base([fused.state[p]["step"] for p in ours]) is not None  # advanced by one add


def test_step_counts_written_elsewhere_are_read_again(monkeypatch):
    """A step count set from outside (here fill_, as a state load or a user may) is seen at the next step."""
    def set_counts(k, opt):
        if k == 1:
            for state in opt.state.values():
                state["step"].fill_(10.0)
    (fused, ours), (_, reference) = _fused_and_reference(between=set_counts)
    assert [fused.state[p]["step"].item() for p in ours] == [12.0] * 3
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=2.0**-21, atol=1e-6)


def test_moved_or_replaced_tensors_get_a_new_plan(monkeypatch):
    made = _plans_made(monkeypatch)
    p = torch.nn.Parameter(torch.randn(100))
    opt = AdamPower([p], lr=LR, fused=True)
    p.grad = torch.randn(100)
    opt.step()
    p.grad = torch.randn(100)  # another address
    opt.step()
    p.grad_dtype = None
    p.grad = p.grad.to(torch.bfloat16)  # another dtype
    opt.step()
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new state tensors
    opt.step()
    assert len(made) == 4 and opt.state[p]["step"].item() == 4.0


def test_a_plan_holds_no_tensor():
    import gc
    import weakref

    p = torch.nn.Parameter(torch.randn(100))
    p.grad = torch.randn(100)
    opt = AdamPower([p], lr=LR, fused=True)
    opt.step()
    refs = [weakref.ref(t) for t in (p, p.grad, opt.state[p]["exp_avg"], opt.state[p]["step"],
                                     opt.state[p]["step"]._base)]
    del p, opt
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_host_only_benchmark_runs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_triton_adam_power.py"), "--host-only"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TARGET host cost <= 50 us per launch bucket" in out.stdout and "re-planned us" in out.stdout


def test_one_launch_per_bucket_partial_blocks_included(monkeypatch):
    """Whole and partial blocks in one launch: a group of tensors ending in partial blocks is one launch a step, two
    when its grads come in two dtypes (two buckets)."""
    grids = []
    real = tap._kernel

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]
    monkeypatch.setattr(tap, "_kernel", lambda interpret: Counting(real(interpret)))
    params = [torch.nn.Parameter(torch.randn(n)) for n in (4097, 33, 8192)]
    opt = AdamPower(params, lr=LR, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert grids == [(2 + 1 + 2,)]  # 4097: a whole block and a partial one; 33: one partial; 8192: two whole
    grids.clear()
    params[1].grad_dtype = None
    params[1].grad = params[1].grad.to(torch.bfloat16)
    opt.step()
    assert sorted(grids) == [(1,), (4,)]
