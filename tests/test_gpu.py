"""AdamPower on CUDA tensors (both paths) against the CPU reference; skipped cleanly without a GPU."""

import pytest
import torch

from conftest import grad_stream
from gradpower_ds import AdamPower

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("foreach", [False, True])
def test_cuda_matches_cpu_reference(foreach):
    init, grads = torch.randn(10001), grad_stream(10001, 50)
    results = []
    for device, fe in (("cpu", False), ("cuda", foreach)):
        p = torch.nn.Parameter(init.clone().to(device))
        opt = AdamPower([p], lr=1e-2, weight_decay=0.1, power=1.2, foreach=fe)
        for g in grads:
            p.grad = g.to(device)
            opt.step()
        results.append(p.detach().cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
