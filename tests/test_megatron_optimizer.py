"""megatron_patches: ``OptimizerConfig(optimizer="adampower")`` in megatron-core's get_megatron_optimizer.

Cheap (in-process, no launch): apply()/remove() idempotent and reversible, the
config fields and their validation, the unsupported-version errors (patches and
test shim), the step pre-hook on a plain torch AdamW (dense/expert p, decoupled grads).

Slow (one 2-rank launch, tests/jobs/megatron_optimizer.py, ~15 s): a tiny MoE
GPTModel (EP=2, alltoall) under megatron DDP + the distributed optimizer, fp32
and bf16, 3 clipped steps, against an independent clip -> phi -> AdamW
reference computed from the full model's gradients (see the job's docstring).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core==0.16.1)")

import megatron.core  # noqa: E402
import megatron.core.optimizer as mcore_optimizer  # noqa: E402
from megatron.core.optimizer import AdamOptimizerConfig, OptimizerConfig  # noqa: E402

import megatron_patches  # noqa: E402
from conftest import torchrun  # noqa: E402
from megatron_patches.optimizer import inner_optimizers, power_hook, powers  # noqa: E402

JOBS = Path(__file__).parent / "jobs"


@pytest.fixture
def applied():
    megatron_patches.apply()
    yield
    megatron_patches.remove()


def _patched_attributes():
    return {"build": mcore_optimizer._get_megatron_optimizer_based_on_param_groups,
            "init": OptimizerConfig.__dict__["__init__"], "adam_init": AdamOptimizerConfig.__dict__["__init__"],
            "post_init": OptimizerConfig.__dict__["__post_init__"]}


def test_apply_remove_idempotent_and_reversible():
    before = _patched_attributes()
    assert not megatron_patches.is_applied() and not hasattr(OptimizerConfig, "gradpower_p")
    megatron_patches.apply()
    applied = _patched_attributes()
    megatron_patches.apply()  # a second apply() changes nothing
    try:
        assert megatron_patches.is_applied()
        assert _patched_attributes() == applied
        assert all(applied[k] is not before[k] for k in before)
    finally:
        megatron_patches.remove()
    megatron_patches.remove()
    assert not megatron_patches.is_applied()
    assert _patched_attributes() == before
    assert not hasattr(OptimizerConfig, "gradpower_p") and not hasattr(OptimizerConfig, "gradpower_p_expert")
    with pytest.raises(TypeError, match="gradpower_p"):
        OptimizerConfig(optimizer="adampower", gradpower_p=1.2)


def test_config_fields(applied):
    config = OptimizerConfig(optimizer="adampower", lr=1e-3)
    assert (config.gradpower_p, config.gradpower_p_expert) == (1.2, None)
    assert powers(config) == (1.2, 1.2)
    config = AdamOptimizerConfig(optimizer="adampower", gradpower_p=1.3, gradpower_p_expert=1.5)
    assert config.optimizer == "adampower" and powers(config) == (1.3, 1.5)
    assert OptimizerConfig().optimizer == "adam"  # other optimizers are untouched


@pytest.mark.parametrize("field, value, error", [("gradpower_p", 0.0, ValueError), ("gradpower_p", -1.2, ValueError),
                                                  ("gradpower_p_expert", 0, ValueError),
                                                  ("gradpower_p_expert", float("nan"), ValueError),
                                                  ("gradpower_p", "1.2", TypeError)])
def test_invalid_power_names_the_field(applied, field, value, error):
    with pytest.raises(error, match=f"OptimizerConfig.{field}"):
        OptimizerConfig(optimizer="adampower", **{field: value})
    config = OptimizerConfig(optimizer="adampower")
    setattr(config, field, value)  # changed after construction: refused when the optimizer is built
    with pytest.raises(error, match=f"OptimizerConfig.{field}"):
        mcore_optimizer._get_megatron_optimizer_based_on_param_groups(config, [], [])


def test_cpu_offload_refused(applied):
    config = OptimizerConfig(optimizer="adampower", optimizer_cpu_offload=True)
    with pytest.raises(ValueError, match="optimizer_cpu_offload"):
        mcore_optimizer._get_megatron_optimizer_based_on_param_groups(config, [], [])


def test_unsupported_version(monkeypatch):
    before = _patched_attributes()
    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    with pytest.raises(megatron_patches.UnsupportedMegatronError, match=r"supports megatron-core 0\.16\.1 only.*"
                       r"0\.17\.0 is installed"):
        megatron_patches.apply()
    assert not megatron_patches.is_applied() and _patched_attributes() == before
    sys.path.insert(0, str(Path(__file__).parent))
    import megatron_cpu_shim

    with pytest.raises(RuntimeError, match=r"megatron-core 0\.16\.1, but 0\.17\.0 is installed"):
        megatron_cpu_shim.install()
    assert not megatron_cpu_shim._state


def test_power_hook_dense_and_expert_groups():
    dense, expert = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([{"params": [dense], "is_expert_parallel": False},
                             {"params": [expert], "is_expert_parallel": True}], lr=0.1)
    opt.register_step_pre_hook(power_hook(1.2, 1.5))
    gd, ge = torch.tensor([0.3, -2.0, 0.0, 1e-3, -0.5]), torch.tensor([-0.7, 4.0, 0.0, 2e-2])
    dense.grad, expert.grad = gd.clone(), ge.clone()
    opt.step()
    torch.testing.assert_close(dense.grad, gd.sign() * gd.abs() ** 1.2, rtol=1e-6, atol=0)
    torch.testing.assert_close(expert.grad, ge.sign() * ge.abs() ** 1.5, rtol=1e-6, atol=0)
    assert inner_optimizers(type("M", (), {"optimizer": opt})()) == [opt]


def test_power_hook_decoupled_grad():
    """With the precision-aware optimizer (TE FusedAdam, use_decoupled_grad) the grads are in param.decoupled_grad."""
    param = torch.nn.Parameter(torch.zeros(3))
    param.decoupled_grad = torch.tensor([0.5, -3.0, 0.0])
    opt = type("FakeTEAdam", (), {"use_decoupled_grad": True, "param_groups": [{"params": [param]}]})()
    power_hook(1.2, 1.5)(opt, (), {})
    torch.testing.assert_close(param.decoupled_grad, torch.tensor([0.5 ** 1.2, -(3.0 ** 1.2), 0.0]))
    assert param.grad is None


@pytest.mark.slow
def test_megatron_distributed_moe_matches_reference(tmp_path):
    """2 ranks, EP=2, distributed optimizer, fp32 and bf16: parameters equal clip -> phi -> AdamW after 3 steps."""
    out = tmp_path / "results.json"
    torchrun(JOBS / "megatron_optimizer.py", out, timeout=600)
    results = json.loads(out.read_text())
    for case in ("fp32_adam", "fp32_adampower", "fp32_adampower_p1", "bf16_adam", "bf16_adampower",
                 "bf16_adampower_p1"):
        dtype, optimizer = case.split("_", 1)[0], results[case]
        # one hook per inner optimizer (dense, expert) with the configured powers; none for Megatron's 'adam'
        expected = {"fp32_adam": [], "bf16_adam": []}.get(case, [(1.0, 1.0)] if case.endswith("p1") else [(1.2, 1.5)])
        assert [h["expert_groups"] for h in optimizer["hooks"]] == [[False, False], [True]], case
        assert [[tuple(p) for p in h["powers"]] for h in optimizer["hooks"]] == [expected, expected], case
        # fp32: measured <= 1.2e-7; bf16: measured 0 dense, 1.2e-7 expert (one bf16 rounding step of a tiny
        # weight: master weights equal up to fp32 rounding can round to neighbouring bf16 values)
        tol = 2e-7 if dtype == "fp32" else 1e-4
        errors = optimizer["errors"]
        assert max(errors["right"].values()) <= tol, (case, errors)
        if case.endswith("adampower"):  # p=1.2 dense / 1.5 expert is told apart from p=1 and from swapped p
            for wrong in ("p1", "swapped"):
                assert min(errors[wrong].values()) > 1e-3, (case, errors)
    assert results["fp32_p1_vs_adam"] == 0.0 and results["bf16_p1_vs_adam"] == 0.0


def test_cpu_shim_install_uninstall():
    """The test-only shim redirects CUDA devices to the CPU while installed and leaves no trace after."""
    sys.path.insert(0, str(Path(__file__).parent))
    import megatron_cpu_shim

    stream_class = torch.cuda.Stream
    megatron_cpu_shim.install()
    megatron_cpu_shim.install()  # idempotent
    try:
        t = torch.zeros(2, device="cuda")
        assert t.device.type == "cpu" and t.type() == "torch.cuda.FloatTensor" and t.cuda() is t
        assert torch.cuda.current_device() == torch.device("cpu")
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.synchronize()
    finally:
        megatron_cpu_shim.uninstall()
    assert torch.cuda.Stream is stream_class and not megatron_cpu_shim._state
    assert torch.zeros(2).type() == "torch.FloatTensor"
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(2, device="cuda")
