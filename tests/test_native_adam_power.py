"""The native CPU kernel: phi accuracy over the fp32 range, CPUAdamPower vs the reference optimizer,
every ISA the CPU has (forced on purpose), 1 and 2 threads, copy-out, checkpoints, bad input, the checks at the
kernel's boundary (ops.native_adam_power) and how the kernel is found or built (ops.builder)."""

import io
import os
import subprocess
import sys
import types

import pytest
import torch

from conftest import edge_tensor, grad_stream
from gradpower_ds import AdamPower
from gradpower_ds import CPUAdamPower
from gradpower_ds.ops import NativeExtensionError, resolve_isa
from gradpower_ds.ops import builder
from gradpower_ds.ops import native_adam_power as native

ISAS = [isa for isa in ("avx512", "avx2", "scalar") if builder.load().cpu_supports(isa=native.ISA_CODES[isa])]
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
SUBNORMAL_ULP = 2.0**-149


def all_fp32_sample(n=1 << 21, seed=0) -> torch.Tensor:
    """Random bit patterns (so every exponent, subnormals included, is equally likely), both signs, plus edges."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)
    x = (bits - 2**31).to(torch.int32).view(torch.float32)
    return torch.cat([x, edge_tensor()])


def phi_rtol(p: float) -> float:
    """The documented bound of native phi (csrc/fast_power.h): 2.5e-7 relative for p <= 2, 1e-6 for p <= 8."""
    return 2.5e-7 if p <= 2 else 1e-6


def assert_phi_accurate(got: torch.Tensor, x: torch.Tensor, p: float, eps: float = 0.0):
    ref = torch.sign(x.double()) * (x.double().abs() + eps).pow(p)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)), "NaN must propagate, and only NaN"
    ref32 = ref.float()
    inf = torch.isinf(ref32)
    assert torch.equal(got[inf], ref32[inf]), "overflow/Inf must give the correctly signed Inf"
    finite = torch.isfinite(ref32)
    err = (got[finite].double() - ref[finite]).abs()
    # phi_rtol(p) relative; where the exact result is below fp32's normal range, plus the
    # half subnormal ulp that rounding onto the subnormal grid costs.
    subnormal = ref[finite].abs() < 2.0**-126
    bound = phi_rtol(p) * ref[finite].abs() + subnormal.double() * (SUBNORMAL_ULP / 2)
    ratio = torch.where(bound > 0, err / bound.clamp_min(1e-300), torch.where(err > 0, float("inf"), 0.0))
    worst = ratio.max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"phi error {worst:.3f}x the bound"
    assert torch.equal(got[x == 0], torch.zeros_like(got[x == 0])), "phi(0) must be 0"


def native_grad_power(t: torch.Tensor, p: float, eps: float = 0.0, isa: str | None = None) -> torch.Tensor:
    """phi_p(t) from the native kernel, as a new tensor."""
    return native.native_power_(t.clone(), p, eps, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("p", [1.2, 0.5, 0.8, 1.5, 2.0, 1.0, 4.0, 8.0])
def test_phi_over_whole_fp32_range(isa, p):
    """Random bit patterns (vectors mixing every range: AVX2's full path) and the same sorted by magnitude
    (vectors of neighbours: mostly its normal-range fast path)."""
    x = all_fp32_sample()
    assert_phi_accurate(native_grad_power(x, p, isa=isa), x, p)
    x = x[x.abs().argsort()]
    assert_phi_accurate(native_grad_power(x, p, isa=isa), x, p)


def fast_path_edges(p: float) -> torch.Tensor:
    """Both signs of the values around the bounds of AVX2's normal-range fast path for p (x normal, p * log2 x in
    [-124, 126]) and of fp32's normal range, a few ulps either side, in vectors of their own and mixed with zeros."""
    centres = [2.0**-126, 2.0 ** (-124 / p), 2.0 ** (126 / p), 2.0 ** (-125 / p), 2.0 ** (127 / p)]
    bits = torch.tensor([c for c in centres if c < 3e38], dtype=torch.float32).view(torch.int32)
    around = (bits[:, None] + torch.arange(-8, 8, dtype=torch.int32)).flatten().view(torch.float32)
    around = torch.cat([around, -around])
    with_zeros = torch.stack([around, torch.zeros_like(around)], 1).flatten()  # every other lane +0
    return torch.cat([around, with_zeros, -with_zeros])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("p", [0.5, 1.2, 2.0, 8.0])
def test_phi_at_the_fast_path_bounds(isa, p):
    x = fast_path_edges(p)
    got = native_grad_power(x, p, isa=isa)
    assert_phi_accurate(got, x, p)
    assert torch.equal(got[x == 0].view(torch.int32), torch.zeros_like(got[x == 0]).view(torch.int32)), \
        "phi(+-0) must be +0"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("p", [1.2, 0.5])
def test_phi_under_flush_denormal(isa, p):
    """torch.set_flush_denormal(True) (DAZ + FTZ): a subnormal gradient gives 0, as torch's own arithmetic does
    there, or its true phi (it once came back unchanged, un-powered); never NaN; normal ones keep the usual
    accuracy. Which of the two depends on the thread: flush-denormal is per thread, and torch sets it on the
    calling thread only, not on the kernel's other OpenMP threads."""
    x = all_fp32_sample()
    torch.set_flush_denormal(True)
    try:
        got = native_grad_power(x, p, isa=isa)
    finally:
        torch.set_flush_denormal(False)
    subnormal_in = (x != 0) & (x.abs() < 2.0**-126)
    powered = subnormal_in & (got != 0)
    assert subnormal_in.sum() > 1000
    assert_phi_accurate(got[powered], x[powered], p)
    assert torch.equal(torch.isnan(got), torch.isnan(x))
    exact = torch.sign(x.double()) * x.double().abs().pow(p)
    normal_out = ~subnormal_in & ~(exact.abs() < 2.0**-126) & torch.isfinite(exact.float())
    assert_phi_accurate(got[normal_out], x[normal_out], p)
    assert (got[~subnormal_in & (exact.abs() < 2.0**-126)].abs() < 2.0**-126).all()  # flushed or subnormal


@pytest.mark.parametrize("isa", ISAS)
def test_phi_with_power_eps_and_odd_lengths(isa):
    for n in (0, 1, 15, 16, 17, 31, 33, 1000):
        x = torch.randn(n) * 1e-3
        for p, eps in ((1.2, 1e-8), (1.0, 1e-8)):
            assert_phi_accurate(native_grad_power(x, p, eps, isa=isa), x, p, eps)


def train(opt_cls, inits, grads, groups_fn, **kw):
    ps = [torch.nn.Parameter(x.clone()) for x in inits]
    opt = opt_cls(groups_fn(ps), **kw)
    for step in range(len(grads[0])):
        for p, gs in zip(ps, grads):
            p.grad = gs[step].clone()
        opt.step()
    return [p.detach() for p in ps], opt


SHAPES = [(0,), (1,), (15,), (17,), (3, 11), (1000,), (2 * 65536 + 5,)]


def groups_of_different_power(ps):
    return [{"params": ps[:3], "power": 1.2}, {"params": ps[3:5], "power": 0.8, "adam_w_mode": False},
            {"params": ps[5:], "power": 1.5, "power_eps": 1e-8, "weight_decay": 0.0}]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
def test_200_steps_match_reference(isa, threads):
    inits = [torch.randn(s) for s in SHAPES]
    grads = [grad_stream(s, 200, seed=i) for i, s in enumerate(SHAPES)]
    ref, _ = train(AdamPower, inits, grads, groups_of_different_power, foreach=False, **HYPER)
    ours, _ = train(CPUAdamPower, inits, grads, groups_of_different_power, isa=isa, num_threads=threads, **HYPER)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_power_one_matches_torch_adam(isa, adam_w_mode):
    inits, grads = [torch.randn(4099)], [grad_stream(4099, 200)]
    torch_cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    ref, _ = train(torch_cls, inits, grads, lambda ps: ps, foreach=False, **HYPER)
    ours, _ = train(CPUAdamPower, inits, grads, lambda ps: ps, power=1.0, adam_w_mode=adam_w_mode, isa=isa, **HYPER)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)


def test_state_dict_roundtrip_and_interop_with_adam_power():
    inits, grads = [torch.randn(70000)], [grad_stream(70000, 30)]
    full, _ = train(CPUAdamPower, inits, grads, lambda ps: ps, **HYPER)

    half, opt = train(CPUAdamPower, inits, [grads[0][:15]], lambda ps: ps, **HYPER)
    checkpoint = io.BytesIO()
    torch.save(opt.state_dict(), checkpoint)
    for cls in (CPUAdamPower, AdamPower):
        p = torch.nn.Parameter(half[0].clone())
        resumed = cls([p], **HYPER)
        checkpoint.seek(0)
        resumed.load_state_dict(torch.load(checkpoint))
        for g in grads[0][15:]:
            p.grad = g.clone()
            resumed.step()
        if cls is CPUAdamPower:
            assert torch.equal(p.detach(), full[0])
        else:
            torch.testing.assert_close(p.detach(), full[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_copy_out(isa, dtype):
    for n in (0, 1, 17, 70001):
        p = torch.nn.Parameter(torch.randn(n) * 100)
        p.grad = torch.randn(n)
        copy = torch.full((n,), -7.0, dtype=dtype)
        opt = CPUAdamPower([p], isa=isa, **HYPER)
        opt.step(fp16_param_groups=[[copy]])
        assert torch.equal(copy, p.detach().to(dtype)), "copy-out must be round-to-nearest-even of the new fp32"


def test_bf16_grad_is_widened_not_rejected():
    p = torch.nn.Parameter(torch.randn(33))
    p.grad_dtype = None  # allow a bf16 .grad on an fp32 param, as mixed-precision trainers do
    p.grad = torch.randn(33).bfloat16()
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.float()
    CPUAdamPower([p], **HYPER).step()
    CPUAdamPower([q], **HYPER).step()
    assert torch.equal(p, q)


def test_bad_input():
    with pytest.raises(ValueError, match="power"):
        CPUAdamPower([torch.nn.Parameter(torch.zeros(2))], power=0)
    with pytest.raises(ValueError, match="isa"):
        CPUAdamPower([torch.nn.Parameter(torch.zeros(2))], isa="neon")
    with pytest.raises(ValueError, match="num_threads"):
        CPUAdamPower([torch.nn.Parameter(torch.zeros(2))], num_threads=0)
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))  # bf16/fp16/fp32 params step; fp64 ones do not
    p.grad = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="params must be contiguous fp32, bf16 or fp16 CPU tensors.*float64 param"):
        CPUAdamPower([p]).step()
    q = torch.nn.Parameter(torch.zeros(4))
    q.grad = torch.zeros(4)
    with pytest.raises(TypeError, match="copy-out"):
        CPUAdamPower([q]).step(fp16_param_groups=[[torch.zeros(3, dtype=torch.bfloat16)]])


STEP = dict(step=1.0, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, adam_w_mode=True, power=1.2,
            power_eps=0.0, bias_correction=True, isa="auto", num_threads=1)


def test_kernel_boundary_checks_every_tensor():
    """ops.native_adam_power hands the kernel no address it has not checked: CPU, dtype, contiguous, exactly n elements."""
    def step(param=None, grad=None, m=None, v=None, copy=None):
        fresh = [torch.zeros(8) if t is None else t for t in (param, grad, m, v)]
        native.native_adam_power_step(*fresh, copy, **STEP)

    with pytest.raises(ValueError, match=r"exp_avg must have 8 elements .*got 4"):
        step(m=torch.zeros(4))
    with pytest.raises(ValueError, match=r"grad must have 8 elements"):
        step(grad=torch.zeros(16, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"exp_avg_sq must be a float32 tensor, got torch.float64"):
        step(v=torch.zeros(8, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"param must be contiguous.*\.contiguous\(\)"):
        step(param=torch.zeros(4, 2).t())
    with pytest.raises(TypeError, match=r"exp_avg must be a CPU tensor, got one on meta"):
        step(m=torch.zeros(8, device="meta"))
    with pytest.raises(TypeError, match=r"copy_out must be a bfloat16/float16 tensor, got torch.float32"):
        step(copy=torch.zeros(8))
    with pytest.raises(ValueError, match=r"copy_out must have 8 elements"):
        step(copy=torch.zeros(9, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"t must be a float32 tensor"):
        native.kernel_ptr(torch.zeros(3, dtype=torch.float16), 3, name="t", owner="test")
    with pytest.raises(ValueError, match=r"exp_avg_sq must have 5 elements"):
        native.native_stream_probe(*[torch.zeros(5)] * 3, torch.zeros(6))
    assert native.fits(torch.zeros(3), 3) and not native.fits(torch.zeros(3), 4)
    assert native.fits(torch.zeros(3, dtype=torch.bfloat16), 3, tuple(native.COPY_CODES))
    assert not native.fits(torch.zeros(3, 3).t(), 9)


def test_kernel_takes_keywords_only_and_checks_sizes():
    kernel = builder.load()
    x = torch.ones(4)
    with pytest.raises(TypeError):
        kernel.grad_power(x.data_ptr(), x.data_ptr(), 4, 1.2, 0.0, -1, 1)  # positional: refused
    with pytest.raises(ValueError, match="n must be >= 0"):
        kernel.grad_power(src=x.data_ptr(), dst=x.data_ptr(), n=-1, power=1.2, power_eps=0.0, isa=-1, threads=1)
    kernel.grad_power(src=x.data_ptr(), dst=x.data_ptr(), n=4, power=2.0, power_eps=0.0, isa=-1, threads=1)
    assert torch.equal(x, torch.ones(4))
    arrays = [torch.zeros(5) for _ in range(4)]
    native.native_stream_probe(*arrays, num_threads=1)  # the benchmark's roofline runs through the checked API


def test_stale_installed_build_is_not_used(monkeypatch):
    """An installed module built from other sources (say, before an edit of csrc) is refused, never called."""
    monkeypatch.setattr(builder, "_module", None)
    monkeypatch.setenv("GRADPOWER_NO_JIT", "1")
    real_import = builder.importlib.import_module
    stale = types.SimpleNamespace(__file__="/somewhere/_cpu_adam_power.so", SOURCE_HASH="0" * 16)
    monkeypatch.setattr(builder.importlib, "import_module",
                        lambda name, *a, **k: stale if name == builder.MODULE else real_import(name, *a, **k))
    with pytest.raises(NativeExtensionError, match="stale.*pip install"):
        builder.load()
    monkeypatch.setattr(stale, "SOURCE_HASH", builder.source_hash())
    assert builder.load() is stale


def test_isa_env_var_is_honoured(monkeypatch):
    monkeypatch.setenv("GRADPOWER_CPU_ISA", "scalar")
    assert resolve_isa() == "scalar"
    assert CPUAdamPower([torch.nn.Parameter(torch.zeros(1))]).isa == "scalar"
    monkeypatch.setenv("GRADPOWER_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="sse9"):
        resolve_isa()


def test_missing_extension_gives_clear_error(monkeypatch):
    monkeypatch.setattr(builder, "_module", None)
    monkeypatch.setenv("GRADPOWER_NO_JIT", "1")
    real_import = builder.importlib.import_module

    def fail(name, *a, **k):
        if name == builder.MODULE:
            raise ImportError("simulated: not built")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builder.importlib, "import_module", fail)
    with pytest.raises(NativeExtensionError, match="pip install"):
        CPUAdamPower([torch.nn.Parameter(torch.zeros(1))])


@pytest.mark.slow
def test_jit_build_when_not_installed(tmp_path):
    """Without the installed module, the first use builds the same sources just in time."""
    code = (
        "import importlib, torch\n"
        "from gradpower_ds.ops import builder\n"
        "real = importlib.import_module\n"
        "def fail(name, *a, **k):\n"
        "    if name == builder.MODULE: raise ImportError('simulated')\n"
        "    return real(name, *a, **k)\n"
        "builder.importlib.import_module = fail\n"
        "from gradpower_ds.ops.native_adam_power import native_power_\n"
        "x = torch.tensor([-8.0, 0.0, 2.0])\n"
        "y = native_power_(x.clone(), 1.5)\n"
        "ref = torch.tensor([-(8.0 ** 1.5), 0.0, 2.0 ** 1.5], dtype=torch.float64)\n"
        "assert torch.allclose(y.double(), ref, rtol=2e-7, atol=0), y\n"
        "print('ok', builder.load().__name__)\n"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gradpower_ds_native_adam_power" in out.stdout
    assert "ok" in out.stdout
