"""megatron_patches: ``OptimizerConfig(optimizer="adampower")`` in megatron-core's get_megatron_optimizer.

Cheap (in-process, no launch): apply()/remove() idempotent and reversible, the
config fields and their validation, the unsupported-version errors (patches and
test shim), the AdamPower classes on their own (the fused torch Adam(W) step against
a float64-phi reference, dense/expert p, p = 1 bit for bit, state layout; the
phi-then-step class for TE-style optimizers with decoupled grads) and the
optimizer_cpu_offload wiring (HybridDeviceOptimizer gets the AdamPower classes).

Slow (one 2-rank launch, tests/jobs/megatron_optimizer.py, ~15 s): a tiny MoE
GPTModel (EP=2, alltoall) under megatron DDP + the distributed optimizer, fp32
and bf16, 3 clipped steps, against an independent clip -> phi -> AdamW
reference computed from the full model's gradients (see the job's docstring).
"""

import copy
import inspect
import json
import sys
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core==0.16.1)")

import megatron.core  # noqa: E402
import megatron.core.optimizer as mcore_optimizer  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, optimizer_config  # noqa: E402

import megatron_patches  # noqa: E402
from conftest import torchrun  # noqa: E402
from gradpower_ds import grad_power  # noqa: E402
from megatron_patches.optimizer import config_powers, power_optimizer_class  # noqa: E402

AdamOptimizerConfig = getattr(optimizer_config, "AdamOptimizerConfig", OptimizerConfig)  # megatron-core 0.16.0 on

JOBS = Path(__file__).parent / "jobs"


@pytest.fixture
def applied():
    megatron_patches.apply()
    yield
    megatron_patches.remove()


def _patched_attributes():
    attributes = {"get": mcore_optimizer.get_megatron_optimizer,
                  "build": mcore_optimizer._get_megatron_optimizer_based_on_param_groups,
                  "init": OptimizerConfig.__dict__["__init__"], "adam_init": AdamOptimizerConfig.__dict__["__init__"],
                  "post_init": OptimizerConfig.__dict__["__post_init__"]}
    try:  # megatron-core 0.16 and 0.17 build Muon in muon.get_megatron_muon_optimizer (0.18 on: a forwarding stub)
        from megatron.core.optimizer import muon
    except ImportError:
        return attributes
    return {**attributes, "muon_build": muon.get_megatron_muon_optimizer} if hasattr(muon, "TensorParallelMuon") \
        else attributes


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


def test_apply_defines_te_general_gemm_without_transformer_engine():
    """megatron-core 0.13 through 0.16's MoE router reads moe_utils.te_general_gemm, defined only with TE: apply()
    makes it None (Megatron's own no-TE path), remove() takes it away again. Seen on a GPU without TE: NameError.
    From 0.17 on megatron-core defines it (None without TE) and apply() leaves it alone."""
    from megatron.core.transformer.moe import moe_utils

    if moe_utils.HAVE_TE:
        pytest.skip("TransformerEngine is installed: megatron-core defines te_general_gemm itself")
    defined = megatron_patches.MEGATRON_CORE.installed_at_least("0.17.0")
    assert hasattr(moe_utils, "te_general_gemm") == defined  # (this test process has not installed the CPU shim)
    megatron_patches.apply()
    assert ("te_general_gemm" in " ".join(megatron_patches.PATCHES.describe())) == (not defined)
    try:
        assert moe_utils.te_general_gemm is None
        args = (torch.randn(3, 8), torch.randn(4, 8), None, torch.float32)  # inp, weight, bias (0.16 on), dtype
        if "bias" not in inspect.signature(moe_utils.router_gating_linear).parameters:
            args = args[:2] + args[3:]
        out = moe_utils.router_gating_linear(*args)
        assert out.shape == (3, 4)
    finally:
        megatron_patches.remove()
    assert hasattr(moe_utils, "te_general_gemm") == defined


def test_config_fields(applied):
    config = OptimizerConfig(optimizer="adampower", lr=1e-3)
    assert (config.gradpower_p, config.gradpower_p_expert, config.gradpower_p_adam) == (None, None, None)
    assert config_powers(config) == {"power": 1.2, "expert_power": 1.2}  # AdamPower's default p
    config = AdamOptimizerConfig(optimizer="adampower", gradpower_p=1.3, gradpower_p_expert=1.5)
    assert config.optimizer == "adampower" and config_powers(config) == {"power": 1.3, "expert_power": 1.5}
    assert OptimizerConfig().optimizer == "adam"  # other optimizers are untouched
    with pytest.raises(ValueError, match=r"^OptimizerConfig\(optimizer='adampower'\): gradpower_p_adam has no effect "
                                         r"unless optimizer muonpower \(optimizer is 'adampower'\)"):
        OptimizerConfig(optimizer="adampower", gradpower_p_adam=1.1)


@pytest.mark.parametrize("field, value, error", [("gradpower_p", 0.0, ValueError), ("gradpower_p", -1.2, ValueError),
                                                  ("gradpower_p_expert", 0, ValueError),
                                                  ("gradpower_p_expert", float("nan"), ValueError),
                                                  ("gradpower_p", "1.2", TypeError)])
def test_invalid_power_names_the_field(applied, field, value, error):
    named = rf"^OptimizerConfig\(optimizer='adampower'\): invalid {field}="
    with pytest.raises(error, match=named):
        OptimizerConfig(optimizer="adampower", **{field: value})
    config = OptimizerConfig(optimizer="adampower")
    setattr(config, field, value)  # changed after construction: refused when the optimizer is built
    with pytest.raises(error, match=named):
        mcore_optimizer.get_megatron_optimizer(config, [])
    with pytest.raises(error, match=named):  # also where it reaches the build directly (megatron-core before 0.18)
        mcore_optimizer._get_megatron_optimizer_based_on_param_groups(config, [], [])


def test_cpu_offload_builds_hybrid_optimizer_with_adampower_classes(applied, monkeypatch):
    """optimizer_cpu_offload: Megatron's HybridDeviceOptimizer gets AdamPower's CPU and GPU classes (it keeps them
    when it rebuilds its sub-optimizers); Megatron's own module attributes are restored after the build."""
    built = {}

    class Recorder:
        def __init__(self, param_groups, **kwargs):
            built.update(kwargs)
            self.param_groups = param_groups

    monkeypatch.setattr(mcore_optimizer, "HybridDeviceOptimizer", Recorder)
    adam, cpu_adam = mcore_optimizer.Adam, mcore_optimizer.CPUAdam
    config = OptimizerConfig(optimizer="adampower", gradpower_p=1.3, gradpower_p_expert=1.1, optimizer_cpu_offload=True,
                             lr=1e-3)
    param = torch.nn.Parameter(torch.zeros(3))
    sys.path.insert(0, str(Path(__file__).parent))
    import megatron_cpu_shim

    megatron_cpu_shim.install()  # Megatron's FP32Optimizer wrapper asks for a CUDA device
    try:
        build = mcore_optimizer._get_megatron_optimizer_based_on_param_groups
        # no model-parallel state: pg_collection (megatron-core 0.16.0 on) names none; before it, none is asked for
        extra = {"pg_collection": SimpleNamespace(tp=None)} if "pg_collection" in inspect.signature(build).parameters \
            else {}
        optimizer = build(config, [], [{"params": [param]}], **extra)
    finally:
        megatron_cpu_shim.uninstall()
    assert isinstance(optimizer.optimizer, Recorder)
    assert built["cpu_optimizer_cls"] is power_optimizer_class(cpu_adam, 1.3, 1.1)
    assert built["gpu_optimizer_cls"] is power_optimizer_class(adam, 1.3, 1.1)
    assert issubclass(built["cpu_optimizer_cls"], torch.optim.AdamW)
    assert (mcore_optimizer.Adam, mcore_optimizer.CPUAdam) == (adam, cpu_adam)


def test_unsupported_version(monkeypatch):
    before = _patched_attributes()
    monkeypatch.setattr(megatron.core, "__version__", "0.20.0")  # Megatron-LM main's next release, untested
    with pytest.raises(megatron_patches.UnsupportedMegatronError,
                       match=r"supports megatron-core 0\.13\.0 through 0\.19\.2 \(.*0\.20\.0 is installed"):
        megatron_patches.apply()
    assert not megatron_patches.is_applied() and _patched_attributes() == before
    sys.path.insert(0, str(Path(__file__).parent))
    import megatron_cpu_shim

    with pytest.raises(RuntimeError, match=r"megatron-core 0\.13\.0 through 0\.19\.2, but 0\.20\.0 is installed"):
        megatron_cpu_shim.install()
    assert not megatron_cpu_shim._state


def _two_group_adamw(cls, phi=(1.0, 1.0), **options):
    """3 steps of cls on a dense and an expert group; phi: the (dense, expert) p the grads are powered with first."""
    dense, expert = torch.nn.Parameter(torch.linspace(-1, 1, 5)), torch.nn.Parameter(torch.linspace(2, -2, 4))
    opt = cls([{"params": [dense], "is_expert_parallel": False}, {"params": [expert], "is_expert_parallel": True}],
              lr=0.1, weight_decay=0.1, **options)
    for step in range(3):
        dense.grad, expert.grad = grad_power(GD * (step + 1), phi[0]), grad_power(GE / (step + 1), phi[1])
        opt.step()
    return dense, expert, opt


GD, GE = torch.tensor([0.3, -2.0, 0.0, 1e-3, -0.5]), torch.tensor([-0.7, 4.0, 0.0, 2e-2])


@pytest.mark.parametrize("fused", [None, True])
def test_power_class_dense_and_expert_groups(fused):
    """torch AdamW moved to the AdamPower class steps Adam on phi_p(g), p per group (CPU: the native kernel)."""
    ours = _two_group_adamw(power_optimizer_class(torch.optim.AdamW, 1.2, 1.5), fused=fused)
    ref = _two_group_adamw(torch.optim.AdamW, phi=(1.2, 1.5), foreach=False)
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=2e-7)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=2e-7)
    assert torch.equal(ours[0].grad, GD * 3)  # the grads are not modified
    swapped = _two_group_adamw(torch.optim.AdamW, phi=(1.5, 1.2))
    assert (ours[0] - swapped[0]).abs().max() > 1e-3 and (ours[1] - swapped[1]).abs().max() > 1e-3
    # torch's state layout, so Megatron's checkpoints are unchanged and load into torch's AdamW
    theirs = ref[2].state_dict()
    mine = ours[2].state_dict()
    assert mine["param_groups"] == [dict(g, fused=fused, foreach=None) for g in theirs["param_groups"]]
    for key in (0, 1):
        assert mine["state"][key].keys() == theirs["state"][key].keys()
        assert mine["state"][key]["step"].dtype == theirs["state"][key]["step"].dtype and \
            mine["state"][key]["step"].item() == 3.0


def test_power_class_p1_is_torch_bitwise():
    ours = _two_group_adamw(power_optimizer_class(torch.optim.AdamW, 1.0, 1.0))
    theirs = _two_group_adamw(torch.optim.AdamW)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert type(ours[2]).__name__ == "AdamWPower" and isinstance(ours[2], torch.optim.AdamW)


def test_power_class_keeps_step_hooks_of_an_optimizer_moved_to_it():
    """Megatron's optimizer is built first and moved to the AdamPower class: its step hooks still run."""
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.ones(3)
    opt = torch.optim.AdamW([param])
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    opt.__class__ = power_optimizer_class(torch.optim.AdamW, 1.25, 1.25)  # a class no instance was built of yet
    opt.step()
    assert calls == ["pre", "post"]


def test_power_class_refuses_unsupported_torch_options():
    opt = power_optimizer_class(torch.optim.Adam, 1.2, 1.2)([torch.nn.Parameter(torch.zeros(2))], amsgrad=True)
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()


def test_power_class_for_other_adams_powers_decoupled_grads_first():
    """TE/apex FusedAdam (precision-aware optimizer: grads in param.decoupled_grad): phi in place, then its step."""
    seen = []

    class FakeTEAdam(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})
            self.use_decoupled_grad = True

        def step(self):
            seen.extend(p.decoupled_grad.clone() for g in self.param_groups for p in g["params"])

    param = torch.nn.Parameter(torch.zeros(3))
    param.decoupled_grad = torch.tensor([0.5, -3.0, 0.0])
    power_optimizer_class(FakeTEAdam, 1.2, 1.5)([{"params": [param]}]).step()
    torch.testing.assert_close(seen[0], torch.tensor([0.5 ** 1.2, -(3.0 ** 1.2), 0.0]))
    assert param.grad is None


class FusedAdam(torch.optim.Optimizer):
    """TE's/apex's FusedAdam as their step reads and writes its state, in plain torch (neither runs on a CPU): one
    ``group["step"]`` per group, ``adam_w_mode``, per-group ``bias_correction``, fp32 ``exp_avg``/``exp_avg_sq``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, bias_correction=True,
                 adam_w_mode=True, master_weights=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction))
        self.adam_w_mode, self.master_weights, self.own_steps = int(adam_w_mode), master_weights, 0

    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):
        self.own_steps += 1
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            (beta1, beta2), t = group["betas"], group["step"]
            bc1, bc2 = (1 - beta1 ** t, 1 - beta2 ** t) if group["bias_correction"] else (1.0, 1.0)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                g = p.grad.clone()
                if self.adam_w_mode:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                else:
                    g.add_(p, alpha=group["weight_decay"])
                state["exp_avg"].lerp_(g, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / bc2 ** 0.5).add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bc1)


@pytest.fixture
def fused_adam(monkeypatch):
    """FusedAdam above as apex's (fused_adam_classes finds it), power_optimizer_class's cache cleared around."""
    module = SimpleNamespace(FusedAdam=FusedAdam)
    monkeypatch.setitem(sys.modules, "apex.optimizers", module)
    power_optimizer_class.cache_clear()
    yield FusedAdam
    power_optimizer_class.cache_clear()


@pytest.mark.parametrize("adam_w_mode", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_power_class_steps_a_fused_adams_state_in_one_pass(fused_adam, adam_w_mode, bias_correction):
    """TE/apex FusedAdam moved to the AdamPower class: its state (group step, moments) stepped by AdamPower's fused
    path (here the native kernel), not by its own step, as phi_p then its own step would; a checkpoint of it resumes
    exactly."""
    options = dict(adam_w_mode=adam_w_mode, bias_correction=bias_correction)
    ours = _two_group_adamw(power_optimizer_class(fused_adam, 1.2, 1.5), **options)
    ref = _two_group_adamw(fused_adam, phi=(1.2, 1.5), **options)
    assert ours[2].own_steps == 0 and ref[2].own_steps == 3
    # the native kernel's phi is within 2.5e-7 relative of the reference's: an ulp at |w| ~ 2 (the AVX2 path on Zen 3)
    torch.testing.assert_close(ours[0], ref[0], rtol=2.5e-7, atol=2e-7)
    torch.testing.assert_close(ours[1], ref[1], rtol=2.5e-7, atol=2e-7)
    assert [g["step"] for g in ours[2].param_groups] == [3, 3]
    assert ours[2].state_dict()["state"][0].keys() == {"exp_avg", "exp_avg_sq"}
    # a checkpoint (group steps included) loaded into a fresh one continues as the uninterrupted run
    dense, expert = (torch.nn.Parameter(t.detach().clone()) for t in ours[:2])
    resumed = power_optimizer_class(fused_adam, 1.2, 1.5)(
        [{"params": [dense], "is_expert_parallel": False}, {"params": [expert], "is_expert_parallel": True}],
        lr=0.1, weight_decay=0.1, **options)
    resumed.load_state_dict(copy.deepcopy(ours[2].state_dict()))  # as from a file: tensors of its own
    for opt, params in ((ours[2], ours[:2]), (resumed, (dense, expert))):
        params[0].grad, params[1].grad = GD * 4, GE / 4
        opt.step()
    assert torch.equal(dense, ours[0]) and torch.equal(expert, ours[1])


def test_power_class_gives_a_fused_adam_with_master_weights_phi_then_its_own_step(fused_adam, caplog):
    """A FusedAdam whose state AdamPower's kernel does not step (here master weights) powers its grads in place and
    runs its own step, saying so once."""
    with caplog.at_level("INFO", logger="megatron_patches.optimizer"):
        ours = _two_group_adamw(power_optimizer_class(fused_adam, 1.2, 1.5), master_weights=True)
    ref = _two_group_adamw(fused_adam, phi=(1.2, 1.5), master_weights=True)
    assert ours[2].own_steps == 3
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=2e-7)  # phi in place (the native kernel's, 2.5e-7
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=2e-7)  # relative) against the float64 reference's
    assert caplog.text.count("master_weights=True keeps state AdamPower's kernel does not step") == 1


@pytest.mark.slow
def test_megatron_distributed_moe_matches_reference(tmp_path):
    """2 ranks, EP=2, distributed optimizer, fp32 and bf16: parameters equal clip -> phi -> AdamW after 3 steps."""
    out = tmp_path / "results.json"
    torchrun(JOBS / "megatron_optimizer.py", out, timeout=600)
    results = json.loads(out.read_text())
    for case in ("fp32_adam", "fp32_adampower", "fp32_adampower_p1", "bf16_adam", "bf16_adampower",
                 "bf16_adampower_p1"):
        dtype, optimizer = case.split("_", 1)[0], results[case]
        # each inner optimizer (dense, expert) steps AdamPower with the configured powers; Megatron's 'adam' is torch's
        expected = {"fp32_adam": None, "bf16_adam": None}.get(case, (1.0, 1.0) if case.endswith("p1") else (1.2, 1.5))
        assert [h["expert_groups"] for h in optimizer["inners"]] == [[False, False], [True]], case
        assert [h["powers"] and tuple(h["powers"]) for h in optimizer["inners"]] == [expected, expected], case
        assert {h["cls"] for h in optimizer["inners"]} == {"AdamW" if expected is None else "AdamWPower"}, case
        # fp32: measured <= 1.2e-7; bf16: measured 0 dense, 1.2e-7 expert (one bf16 rounding step of a tiny
        # weight: master weights equal up to fp32 rounding can round to neighbouring bf16 values)
        tol = 2e-7 if dtype == "fp32" else 1e-4
        errors = optimizer["errors"]
        assert max(errors["right"].values()) <= tol, (case, errors)
        if case.endswith("adampower"):  # p=1.2 dense / 1.5 expert is told apart from p=1 and from swapped p
            for wrong in ("p1", "swapped"):
                assert min(errors[wrong].values()) > 1e-3, (case, errors)
    assert results["fp32_p1_vs_adam"] == 0.0 and results["bf16_p1_vs_adam"] == 0.0
    # Megatron's clip coefficient folded into AdamPower's step (each inner optimizer, each step; it clips: < 1) is
    # bitwise its multi_tensor_scale pass (GRADPOWER_FOLD=0); Megatron's own Adam and p = 1 (its own step) fold nothing
    for case in ("fp32_adampower", "bf16_adampower"):
        scales = results[case]["folded_grad_scales"]
        assert len(scales) == 2 * 3 and all(0 < s < 1 for s in scales), scales
        assert results[f"{case}_folded_vs_unfolded"] == 0.0 and results[f"{case}_unfolded_grad_scales"] == []
    assert all(results[case]["folded_grad_scales"] == [] for case in ("fp32_adam", "bf16_adampower_p1"))


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
