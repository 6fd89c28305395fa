"""Blockwise param groups through DeepSpeed on 2 gloo ranks: ZeRO 0-3, ZeRO-2 with optimizer offload (our CPU
kernel), DeepSpeed's WarmupCosineLR and a client LambdaLR.

One launched job (tests/jobs/ds_blockwise.py) trains each case 5 steps of AdamPower and records every group's lr
before each step. The checks:

- the lrs keep the paper's ratios at every step of warmup and decay (and are not all zero);
- the trained fp32 parameters match a single-process reference in which every parameter has its own AdamPower
  at lr = the step's base lr x its block's multiplier (written out in tests/test_blockwise.py, not taken from the
  rules): within FP32_TOL of every tensor;
- WarmupDecayLR with a warmup_max_lr, which gives every group one lr, is refused with an error naming the
  schedulers that keep the ratios (so is WarmupCosineLR on DeepSpeed 0.16, the oldest-versions run: before its
  first step it sets only the first group's lr);
- DeepSpeed's MoE split keeps the multiplier: the expert group has the FFN lr.
"""

from pathlib import Path

import deepspeed
import pytest
import torch
from packaging.version import Version

from conftest import torchrun
from gradpower_ds import AdamPower
from jobs import ds_blockwise, ds_toy
from test_blockwise import expected_multiplier

JOB = Path(__file__).parent / "jobs" / "ds_blockwise.py"
FP32_TOL = 1e-5
TRAINED = [name for name in ds_blockwise.CASES if name != "refused"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("blockwise") / "results.pt"
    torchrun(JOB, out, timeout=1200)
    return torch.load(out)


def base_lrs(lrs: list) -> list[float]:
    """Each step's base lr: the lr of every group over its multiplier, checked to be one number per step."""
    bases = []
    for step in lrs:
        values = [lr / multiplier for _, lr, multiplier in step]
        assert max(values) - min(values) <= 1e-9 * max(values), step
        bases.append(values[0])
    return bases


def reference(bases: list[float]) -> dict[str, torch.Tensor]:
    """One process, unsharded: DeepSpeed's averaged, clipped gradients; each parameter its own AdamPower at
    base lr x its multiplier."""
    master = ds_toy.make_model()
    named = list(master.named_parameters())
    optimizers = [AdamPower([p], lr=0.0, weight_decay=ds_blockwise.WEIGHT_DECAY, foreach=False) for _, p in named]
    for step, base in enumerate(bases):
        grads = ds_toy.reference_gradients(master, step)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])).item()
        coef = min(1.0, 1.0 / (norm + 1e-6))
        for (name, p), g, optimizer in zip(named, grads, optimizers):
            p.grad = g * coef
            optimizer.param_groups[0]["lr"] = base * expected_multiplier(name)
            optimizer.step()
    return {name: p.detach().clone() for name, p in named}


@pytest.mark.parametrize("case", TRAINED)
def test_lrs_keep_their_ratios_and_train_as_the_reference(results, case):
    result = results[case]
    if "error" in result and case.endswith("cosine") and Version(deepspeed.__version__) < Version("0.19.8"):
        # DeepSpeed 0.16's WarmupCosineLR sets only group 0's lr before the first step: refused, not run wrong
        assert "blockwise_embedding: 0 (x10), blockwise_qk: 0.008 (x8)" in result["error"], result["error"]
        return
    bases = base_lrs(result["lrs"])
    assert len(bases) == ds_blockwise.STEPS and max(bases) > 0
    assert len({round(b, 12) for b in bases}) >= 3, "warmup and decay both happened"
    want = reference(bases)
    errors = {k: ((result["params"][k] - want[k]).norm() / want[k].norm()).item() for k in want}
    assert max(errors.values()) <= FP32_TOL, max(errors.items(), key=lambda kv: kv[1])
    flat = reference([bases[0]] * len(bases))  # one lr for all steps: the schedule must show
    assert max(((result["params"][k] - flat[k]).norm() / flat[k].norm()).item() for k in flat) > 100 * FP32_TOL


def test_a_scheduler_that_loses_the_ratios_is_refused(results):
    error = results["refused"]["error"]
    assert "lose the blockwise multipliers" in error and "WarmupCosineLR" in error and "lr_scheduler" in error


def test_moe_split_keeps_the_multipliers(results):
    groups = results["moe"]["groups"]
    experts = [g for g in groups if g[3]]
    assert experts and all(multiplier == 6.0 for _, _, multiplier, _ in experts)
    for name, lr, multiplier, _ in groups:
        assert lr == pytest.approx(ds_blockwise.BASE_LR * multiplier), name
