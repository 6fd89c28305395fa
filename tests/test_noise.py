"""gradpower_ds.noise against closed-form cases: synthetic gradients with known mean and covariance."""

import math

import pytest
import torch

from gradpower_ds.noise import NoiseScale, coordinate_snr, noise_terms


@pytest.mark.parametrize("grad_sq, trace, b_small, b_big", [(1.0, 10.0, 1, 8), (0.02, 3.5, 4, 64), (5.0, 0.0, 2, 3)])
def test_noise_terms_invert_the_expected_norms(grad_sq, trace, b_small, b_big):
    """E|g_b|^2 = |G|^2 + tr(Sigma) / b: given those expectations, the estimates are exact."""
    small, big = grad_sq + trace / b_small, grad_sq + trace / b_big
    got = noise_terms(small, b_small, big, b_big)
    assert got == pytest.approx((grad_sq, trace), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dim, b_small, ranks", [(64, 2, 4), (200, 8, 2)])
def test_noise_scale_of_synthetic_gradients(dim, b_small, ranks):
    """Per-example gradients mu + L z with known mu and Sigma = L L^T: the averaged estimates find |mu|^2, tr(Sigma)
    and B_simple = tr(Sigma) / |mu|^2 within a few standard errors; small batches as a data-parallel job has them
    (each rank's micro-batch), the big one their mean."""
    gen = torch.Generator().manual_seed(dim)
    mu = torch.randn(dim, generator=gen, dtype=torch.float64) * 0.3
    scale = torch.linspace(0.5, 2.0, dim, dtype=torch.float64)
    mix = torch.eye(dim, dtype=torch.float64) + 0.1 * torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    chol = mix * scale  # Sigma = chol @ chol.T
    trace, grad_sq = (chol**2).sum().item(), (mu**2).sum().item()
    steps, b_big = 2000, b_small * ranks
    terms = []
    for _ in range(steps):
        examples = mu + torch.randn(b_big, dim, generator=gen, dtype=torch.float64) @ chol.T
        small = examples.view(ranks, b_small, dim).mean(1)
        small_sq = (small**2).sum(1).mean().item()
        big_sq = (examples.mean(0) ** 2).sum().item()
        terms.append(noise_terms(small_sq, b_small, big_sq, b_big))
    est = torch.tensor(terms, dtype=torch.float64)
    mean, stderr = est.mean(0), est.std(0) / math.sqrt(steps)
    assert abs(mean[0].item() - grad_sq) < 4 * stderr[0].item(), (mean[0].item(), grad_sq, stderr[0].item())
    assert abs(mean[1].item() - trace) < 4 * stderr[1].item(), (mean[1].item(), trace, stderr[1].item())
    noise = NoiseScale(decay=0.0)
    noise.update(mean[0].item(), mean[1].item())
    assert noise.value == pytest.approx(trace / grad_sq, rel=0.05)


def test_noise_terms_refuse_batches_out_of_order():
    with pytest.raises(ValueError, match=r"needs 0 < b_small < b_big, got b_small=8, b_big=8"):
        noise_terms(1.0, 8, 1.0, 8)


def test_noise_scale_averages_and_resumes():
    noise = NoiseScale(decay=0.5)
    assert noise.value is None
    assert noise.update(-1.0, 4.0) is None  # a negative |G|^2 estimate (possible for one step) gives no value yet
    assert noise.update(3.0, 8.0) == pytest.approx(6.0 / 1.0)  # averages: |G|^2 (-1 + 3) / 2, tr (4 + 8) / 2
    saved = noise.state_dict()
    resumed = NoiseScale()
    resumed.load_state_dict(saved)
    assert resumed.update(2.0, 2.0) == noise.update(2.0, 2.0)
    with pytest.raises(ValueError, match=r"invalid decay=1"):
        NoiseScale(decay=1)
    with pytest.raises(ValueError, match="non-finite"):
        noise.update(float("nan"), 1.0)


def test_coordinate_snr_closed_form_and_edges():
    # two rows m - d, m + d: mean m, std (Bessel) d * sqrt(2)
    m = torch.tensor([0.5, -2.0, 0.0, 3.0, 0.0])
    d = torch.tensor([0.25, 1.0, 1.0, 0.0, 0.0])
    snr = coordinate_snr(torch.stack([m - d, m + d]))
    expected = torch.tensor([0.5 / (0.25 * math.sqrt(2)), 2.0 / math.sqrt(2), 0.0, math.inf, 0.0], dtype=torch.float64)
    assert torch.allclose(snr, expected, rtol=1e-12)
    gen = torch.Generator().manual_seed(1)
    rows = torch.tensor([1.0, -0.5]) + torch.tensor([2.0, 0.25]) * torch.randn(20000, 2, generator=gen)
    assert coordinate_snr(rows).tolist() == pytest.approx([0.5, 2.0], rel=0.03)
    assert coordinate_snr([torch.ones(3), torch.ones(3).bfloat16().float() * 3]).dtype == torch.float64
    with pytest.raises(ValueError, match=r"needs a \(k >= 2, n\) tensor of k gradients, got shape \(1, 3\)"):
        coordinate_snr(torch.ones(1, 3))
