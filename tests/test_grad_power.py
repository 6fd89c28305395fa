"""grad_power / grad_power_ / grad_power_foreach against a float64 formula, edge values and bad input."""

import math

import pytest
import torch

from conftest import edge_tensor
from gradpower_ds import grad_power, grad_power_, grad_power_foreach


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
def test_dtypes_and_in_place(dtype):
    x = (torch.randn(3, 5) * 3).to(dtype)
    ref = phi64(x.flatten(), 1.2).to(dtype).view(3, 5)
    out = grad_power(x, 1.2)
    assert out.dtype == dtype and out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(out, ref, rtol=0 if dtype in (torch.bfloat16, torch.float16) else 2e-7, atol=0)
    y = x.clone()
    assert grad_power_(y, 1.2) is y
    torch.testing.assert_close(y, out, rtol=0, atol=0)


def test_power_one_is_identity_and_input_untouched():
    x = torch.randn(100)
    keep = x.clone()
    assert torch.equal(grad_power(x, 1.0), x)
    assert torch.equal(x, keep)


def test_foreach_matches_reference():
    # torch's vectorised fp32 pow rounds p to fp32: documented deviation <= ~4e-6 relative.
    xs = [torch.randn(7), torch.randn(3, 4) * 1e-5, torch.empty(0), edge_tensor(), torch.randn(300).bfloat16()]
    for p, eps in [(1.2, 0.0), (0.7, 1e-8), (1.0, 0.0)]:
        outs = grad_power_foreach(xs, p, eps)
        for x, o in zip(xs, outs):
            rtol = 1e-2 if x.dtype == torch.bfloat16 else 5e-6
            torch.testing.assert_close(o, grad_power(x, p, eps), rtol=rtol, atol=0, equal_nan=True)
            assert o.data_ptr() != x.data_ptr() or x.numel() == 0


@pytest.mark.parametrize("p", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_power_raises_naming_it(p):
    with pytest.raises(ValueError, match="power"):
        grad_power(torch.ones(2), p)


def test_bad_eps_and_types():
    with pytest.raises(ValueError, match="power_eps"):
        grad_power(torch.ones(2), 1.2, -1e-8)
    with pytest.raises(TypeError, match="power"):
        grad_power(torch.ones(2), "1.2")
