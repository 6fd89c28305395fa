"""DeepSpeed ZeRO's unscale/clip pass and ZeRO-3's low-precision copy folded into AdamPower's step
(gradpower_ds.deepspeed.fold) change nothing: bit for bit DeepSpeed's own passes.

One launched job (tests/jobs/ds_fold.py, 2 gloo ranks, CPUAdamPower) trains each case with the folds
(GRADPOWER_FOLD=1, the default) and without (0), with a clip threshold below the gradient norms so that
the coefficient clips; fp16 adds the loss scale's inverse. ``slow``.
"""

from pathlib import Path

import pytest
import torch

from conftest import torchrun
from gradpower_ds import folding
from gradpower_ds.deepspeed import fold
from jobs import ds_fold, ds_toy

JOB = Path(__file__).parent / "jobs" / "ds_fold.py"
CASES = [ds_toy.case_name(stage, dtype, offload, False) for stage, dtype, offload in ds_fold.CASES]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fold")
    torchrun(JOB, out, timeout=900)
    return [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_folded_steps_are_bitwise_deepspeeds_passes(ranks, case):
    ds_toy.skip_zero3_where_deepspeed_races(int(case[1]))
    for rank in ranks:
        folded, unfolded = rank[(case, "1")], rank[(case, "0")]
        assert folded["optimizer"] == "CPUAdamPower"
        assert folded["losses"] == unfolded["losses"]
        assert all(torch.equal(folded["params"][k], unfolded["params"][k]) for k in unfolded["params"])
        assert all(torch.equal(a, b) for a, b in zip(folded["low"], unfolded["low"]))  # the bf16/fp16 weights too
        # the folds ran: one coefficient per step, and it clipped (fp16: times the loss scale's inverse, 2**-8)
        assert len(folded["grad_scales"]) == ds_fold.FOLD_STEPS and unfolded["grad_scales"] == []
        limit = 2.0 ** -8 if "fp16" in case else 1.0
        assert all(0 < s < limit * 0.01 for s in folded["grad_scales"]), folded["grad_scales"]
        # ZeRO-3 writes its bf16/fp16 partition in the step itself (not with optimizer offload, not in fp32)
        copies = case.startswith("z3") and "offload" not in case and "fp32" not in case
        assert folded["copy_outs"] == (ds_fold.FOLD_STEPS if copies else 0) and unfolded["copy_outs"] == 0


def test_fold_switch(monkeypatch):
    monkeypatch.delenv(folding.ENV, raising=False)
    assert folding.enabled()
    monkeypatch.setenv(folding.ENV, "0")
    assert not folding.enabled()
    monkeypatch.setenv(folding.ENV, "yes")
    with pytest.raises(ValueError, match="GRADPOWER_FOLD='yes': set 1 .* or 0"):
        folding.enabled()


def test_other_optimizers_keep_deepspeeds_code():
    """A ZeRO optimizer whose inner optimizer is not ours: the wrapper runs DeepSpeed's function unchanged."""
    calls = []

    class Zero:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    wrapped = fold.unscale_and_clip_1_2(lambda zero, grads, norm: calls.append((grads, norm)))
    grads = [torch.ones(3)]
    wrapped(Zero(), grads, 2.0)
    assert calls == [(grads, 2.0)]
