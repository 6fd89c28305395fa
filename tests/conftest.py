"""Shared test helpers: edge-value tensors and deterministic gradient streams."""

import pytest
import torch

FP32_EDGES = [0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1.1754942e-38, 1.1754944e-38, 3.4028235e38, -3.4028235e38,
              float("inf"), float("-inf"), float("nan"), 1e-3, -2.5, 123456.0, 0.5, 2.0]


def edge_tensor(dtype=torch.float32) -> torch.Tensor:
    """Zeros, subnormals, the normal/subnormal boundary, huge values, +-Inf and NaN, plus ordinary values."""
    return torch.tensor(FP32_EDGES, dtype=torch.float32).to(dtype)


def grad_stream(shape, steps, seed=0, scale=1e-2):
    """A reproducible list of gradients with a realistic spread of magnitudes (incl. exact zeros)."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(steps):
        g = torch.randn(shape, generator=gen) * scale * torch.exp(torch.randn(shape, generator=gen))
        if g.numel():
            g.view(-1)[:: max(1, g.numel() // 7)] = 0.0
        grads.append(g)
    return grads


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
