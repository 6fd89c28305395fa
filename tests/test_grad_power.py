"""grad_power (the float64 reference) and grad_power_ (the fast in-place path) against a float64 formula.

grad_power_ is checked on each of its routes (the native kernel, chunked torch ops; the Triton
route is in test_triton_adam_power.py), dtypes, shapes (empty, 0-d, non-contiguous, several chunks)
and edge values, with the accuracy bounds its docstring states.
"""

import math

import pytest
import torch

from conftest import edge_tensor
from gradpower_ds import grad_power, grad_power_
from gradpower_ds import power as power_module
from gradpower_ds import torch_paths


def phi64(t: torch.Tensor, p: float, eps: float = 0.0) -> torch.Tensor:
    """Independent float64 reference: sign(g) * (|g| + eps)**p, written with Python math per element."""
    out = []
    for v in t.double().tolist():
        if math.isnan(v):
            out.append(float("nan"))
        elif v == 0.0:
            out.append(0.0)
        else:
            out.append(math.copysign((abs(v) + eps) ** p, v))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("p", [0.5, 1.0, 1.2, 2.0])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_matches_float64_formula_on_edges(p, eps):
    x = torch.cat([edge_tensor(), torch.randn(257) * 10.0 ** torch.randint(-30, 30, (257,)).float()])
    got = grad_power(x, p, eps)
    ref = phi64(x, p, eps).float()
    torch.testing.assert_close(got, ref, rtol=2e-7, atol=0.0, equal_nan=True)
    assert torch.equal(got == 0, ref == 0)  # phi(0) = 0 exactly, with and without eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_reference_dtypes(dtype):
    x = (torch.randn(3, 5) * 3).to(dtype)
    ref = phi64(x.flatten(), 1.2).to(dtype).view(3, 5)
    out = grad_power(x, 1.2)
    assert out.dtype == dtype and out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(out, ref, rtol=0 if dtype in (torch.bfloat16, torch.float16) else 2e-7, atol=0)


def test_power_one_is_identity_and_input_untouched():
    x = torch.randn(100)
    keep = x.clone()
    assert torch.equal(grad_power(x, 1.0), x)
    assert torch.equal(x, keep)
    assert grad_power_(x, 1.0) is x and torch.equal(x, keep)


# Relative bounds against the float64 reference, over fp32 values from 1e-30 to 1e30: the native kernel
# (its documented 2.5e-7 for p <= 2, csrc/fast_power.h; measured 2.1e-7 at p = 2; with power_eps, whose addition
# rounds in fp32, a little more) and torch's fp32 pow, which rounds p to fp32 (measured 3.5e-6 at |g| ~ 1e+-30).
BOUNDS = {None: 2.5e-7, False: 5e-6}
EPS_BOUND = 3e-7  # the native kernel with power_eps != 0
WIDE = [0.8, 1.2, 1.5, 2.0]


def _wide_values(n=4099):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, generator=gen) * 10.0 ** torch.randint(-30, 30, (n,), generator=gen).float()


@pytest.mark.parametrize("fused", [None, False], ids=["native", "torch"])
@pytest.mark.parametrize("p", WIDE)
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_in_place_matches_reference_fp32(fused, p, eps):
    x = torch.cat([edge_tensor(), _wide_values()])
    y = x.clone()
    assert grad_power_(y, p, eps, fused=fused) is y
    ref = phi64(x, p, eps)
    bound = max(BOUNDS[fused], EPS_BOUND if eps else 0.0)
    finite = torch.isfinite(ref.float()) & (ref.float().abs() >= 2.0**-126)  # normal fp32 results
    torch.testing.assert_close(y[finite].double(), ref[finite], rtol=bound, atol=0)
    torch.testing.assert_close(y, ref.float(), rtol=bound, atol=2.0**-149, equal_nan=True)
    assert torch.equal(y == 0, ref.float() == 0)  # phi(0) = 0 exactly, with and without eps


@pytest.mark.parametrize("fused", [None, False], ids=["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_in_place_low_and_double_precision(fused, dtype):
    """bf16/fp16 computed in fp32 and rounded once: the reference's rounding or its neighbour at a near-tie;
    fp64 computed in fp64 (torch ops)."""
    x = torch.cat([edge_tensor(), torch.randn(3000) * 3]).to(dtype)
    y = x.clone()
    grad_power_(y, 1.2, fused=fused)
    ref = grad_power(x, 1.2)
    if dtype == torch.float64:
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(y, ref, rtol=2.0**-7, atol=0, equal_nan=True)
        exact = (y == ref) | (y.isnan() & ref.isnan())
        assert exact.float().mean() > 0.99


@pytest.mark.parametrize("fused", [None, False], ids=["native", "torch"])
def test_in_place_shapes_and_chunks(fused, monkeypatch):
    """Empty, 0-d, non-contiguous and multi-chunk tensors, one at a time and as a list; only t changes."""
    monkeypatch.setattr(torch_paths, "CHUNK", 1000)  # several chunks on the torch route
    monkeypatch.setattr(power_module.native, "CHUNK", 1000)  # and on the native route's bf16 scratch
    base = torch.randn(70, 90)
    tensors = [torch.empty(0), torch.tensor(-2.5), torch.randn(60, 40).t(), torch.randn(5000),
               torch.randn(2500).bfloat16(), base[:, ::3]]
    expected = [grad_power(t, 1.3) for t in tensors]
    keep = base.clone()
    outs = grad_power_(tensors, 1.3, fused=fused)
    assert outs is tensors
    for got, ref in zip(tensors, expected):
        # a non-contiguous tensor takes the torch route whatever fused says
        rtol = 2.0**-7 if got.dtype == torch.bfloat16 else BOUNDS[fused if got.is_contiguous() else False]
        torch.testing.assert_close(got, ref, rtol=rtol, atol=0)
    torch.testing.assert_close(base[:, ::3], expected[5], rtol=BOUNDS[False], atol=0)  # views write through
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[:, ::3] = False
    assert torch.equal(base[untouched], keep[untouched])


def test_in_place_fused_true_refuses_what_no_kernel_takes():
    with pytest.raises(TypeError, match="non-contiguous"):
        grad_power_(torch.randn(4, 4).t(), 1.2, fused=True)
    with pytest.raises(TypeError, match="float64"):
        grad_power_(torch.randn(4, dtype=torch.float64), 1.2, fused=True)


@pytest.mark.parametrize("p", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_power_raises_naming_it(p):
    with pytest.raises(ValueError, match="power"):
        grad_power(torch.ones(2), p)


def test_bad_eps_and_types():
    with pytest.raises(ValueError, match="power_eps"):
        grad_power(torch.ones(2), 1.2, -1e-8)
    with pytest.raises(TypeError, match="power"):
        grad_power(torch.ones(2), "1.2")
