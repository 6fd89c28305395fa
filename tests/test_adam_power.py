"""AdamPower (reference and foreach paths) against torch's Adam(W), a float64 model, and each other."""

import copy
import io

import pytest
import torch

from conftest import grad_stream
from gradpower_ds import AdamPower, CPUAdamPower
from gradpower_ds.ops import native_adam_power
from reference import GRAD_SCALES, Float64AdamPower, assert_grad_scale_is_prescaling

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def run(opt_factory, init, grads):
    p = torch.nn.Parameter(init.clone())
    opt = opt_factory([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_power_one_reference_is_bitwise_torch(adam_w_mode):
    init, grads = torch.randn(1000), grad_stream(1000, 50)
    ours, _ = run(lambda ps: AdamPower(ps, power=1.0, adam_w_mode=adam_w_mode, foreach=False, **HYPER), init, grads)
    torch_cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    theirs, _ = run(lambda ps: torch_cls(ps, foreach=False, **HYPER), init, grads)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("adam_w_mode", [True, False])
@pytest.mark.parametrize("power,power_eps", [(1.2, 0.0), (0.8, 1e-8), (1.5, 0.0)])
def test_matches_float64_model(foreach, adam_w_mode, power, power_eps):
    init, grads = torch.randn(4096), grad_stream(4096, 100)
    ours, _ = run(lambda ps: AdamPower(ps, power=power, power_eps=power_eps, adam_w_mode=adam_w_mode,
                                       foreach=foreach, **HYPER), init, grads)
    ref = Float64AdamPower(init, adam_w_mode=adam_w_mode, power=power, power_eps=power_eps, **HYPER)
    for g in grads:
        ref.step(g)
    torch.testing.assert_close(ours.double(), ref.w, rtol=1e-5, atol=1e-5)


def test_bias_correction_off_matches_float64_model():
    init, grads = torch.randn(300), grad_stream(300, 20)
    ours, _ = run(lambda ps: AdamPower(ps, bias_correction=False, **HYPER), init, grads)
    ref = Float64AdamPower(init, adam_w_mode=True, power=1.2, bias_correction=False, **HYPER)
    for g in grads:
        ref.step(g)
    torch.testing.assert_close(ours.double(), ref.w, rtol=1e-5, atol=1e-5)


def test_foreach_equals_reference_with_groups_of_different_power():
    shapes = [(0,), (1,), (17,), (5, 33), (1000,)]
    inits = [torch.randn(s) for s in shapes]
    grads = [grad_stream(s, 30, seed=i) for i, s in enumerate(shapes)]

    def train(foreach):
        ps = [torch.nn.Parameter(x.clone()) for x in inits]
        groups = [{"params": ps[:2], "power": 1.2}, {"params": ps[2:4], "power": 0.9, "weight_decay": 0.0},
                  {"params": ps[4:], "power": 1.0, "adam_w_mode": False}]
        opt = AdamPower(groups, foreach=foreach, **HYPER)
        for step in range(30):
            for p, gs in zip(ps, grads):
                p.grad = gs[step].clone()
            if step == 3:
                ps[1].grad = None  # a parameter that skips a step keeps its own step count
            opt.step()
        return ps, opt

    ref_ps, ref_opt = train(False)
    fast_ps, fast_opt = train(True)
    for a, b in zip(ref_ps, fast_ps):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert ref_opt.state[ref_ps[1]]["step"].item() == 29
    assert fast_opt.state[fast_ps[1]]["step"].item() == 29


def test_state_dict_roundtrip_continues_identically_and_loads_into_torch_adamw():
    init, grads = torch.randn(257), grad_stream(257, 20)
    full, _ = run(lambda ps: AdamPower(ps, **HYPER), init, grads)

    p = torch.nn.Parameter(init.clone())
    opt = AdamPower([p], **HYPER)
    for g in grads[:10]:
        p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)
    saved_p = p.detach().clone()
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}

    p2 = torch.nn.Parameter(saved_p)
    opt2 = AdamPower([p2], **HYPER)
    opt2.load_state_dict(saved)
    for g in grads[10:]:
        p2.grad = g.clone()
        opt2.step()
    assert torch.equal(p2.detach(), full)

    # the same state loads into torch's AdamW (and p = 1 then continues identically)
    adamw = torch.optim.AdamW([torch.nn.Parameter(saved_p.clone())], foreach=False, **HYPER)
    adamw.load_state_dict(saved)
    assert torch.equal(adamw.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])


def _adamw_state(params: list, grads: list) -> dict:
    """The state dict of torch's AdamW after stepping `params` (two groups) through `grads`."""
    adamw = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], foreach=False,
                              **HYPER)
    for g in grads:
        for p in params:
            p.grad = g[:p.numel()].clone()
        adamw.step()
    return adamw.state_dict()


@pytest.mark.parametrize("cls", [AdamPower, CPUAdamPower])
def test_adamw_state_dict_loads_with_this_optimizers_power_per_group(cls, caplog):
    """An AdamW state dict lacks power, power_eps, adam_w_mode, bias_correction: each group gets its own
    constructor value (p = 1 then continues as AdamW does; p = 1.2 as AdamPower given those values)."""
    grads = grad_stream(257, 8)
    init = [torch.randn(257), torch.randn(100)]
    adamw_params = [torch.nn.Parameter(t.clone()) for t in init]
    saved = _adamw_state(adamw_params, grads[:4])
    assert "power" not in saved["param_groups"][0]

    def continued(power: float, expert_power: float, state: dict):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in adamw_params]
        opt = cls([{"params": ps[:1]}, {"params": ps[1:], "weight_decay": 0.0, "power": expert_power}], power=power,
                  **HYPER)
        with caplog.at_level("WARNING", logger="gradpower_ds.optimizer_base"):
            opt.load_state_dict(copy.deepcopy(state))  # as from a file: torch's load keeps the step tensors
        assert [g["power"] for g in opt.param_groups] == [power, expert_power]
        for g in grads[4:]:
            for p in ps:
                p.grad = g[:p.numel()].clone()
            opt.step()
        return ps

    ones = continued(1.0, 1.0, saved)
    assert "has no adam_w_mode, power, power_eps, bias_correction" in caplog.text
    adamw = torch.optim.AdamW([{"params": adamw_params[:1]}, {"params": adamw_params[1:], "weight_decay": 0.0}],
                              foreach=False, **HYPER)
    adamw.load_state_dict(copy.deepcopy(saved))
    for g in grads[4:]:
        for p in adamw_params:
            p.grad = g[:p.numel()].clone()
        adamw.step()
    for ours, theirs in zip(ones, adamw_params):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)

    explicit = {**saved, "param_groups": [{**g, "power": p, "power_eps": 0.0, "adam_w_mode": True,
                                           "bias_correction": True}
                                          for g, p in zip(saved["param_groups"], (1.2, 1.5))]}
    filled = continued(1.2, 1.5, saved)
    caplog.clear()
    given = continued(1.2, 1.5, explicit)
    assert "has no" not in caplog.text  # a state dict with AdamPower's settings loads without the warning
    assert all(torch.equal(a, b) for a, b in zip(filled, given))
    assert not torch.allclose(filled[0], ones[0])  # p = 1.2 steps differently from p = 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(power=0.0), "power"), (dict(power=-1.0), "power"), (dict(power=float("nan")), "power"),
    (dict(power=float("inf")), "power"), (dict(lr=-1e-3), "lr"), (dict(eps=-1.0), "eps"),
    (dict(betas=(1.0, 0.9)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(weight_decay=float("nan")), "weight_decay"), (dict(power_eps=-1e-8), "power_eps"),
])
def test_bad_hyperparameters_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamPower([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("cls", [AdamPower, CPUAdamPower])
def test_bad_group_power_raises(cls):
    """The optimizer classes validate where hyperparameters enter (construction, add_param_group): the
    functional core adam_power does not re-check them on every step."""
    opt = cls([torch.nn.Parameter(torch.zeros(2))])
    rejected = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"invalid power=0:"):
        opt.add_param_group({"params": [rejected], "power": 0.0})
    with pytest.raises(ValueError, match=r"invalid power_eps=-1e-08"):
        opt.add_param_group({"params": [rejected], "power_eps": -1e-8})
    assert len(opt.param_groups) == 1  # a rejected group is not kept, so its params can be added again
    opt.add_param_group({"params": [rejected], "power": 1.1})
    assert [g["power"] for g in opt.param_groups] == [1.2, 1.1]


# ---- the functional core: every path, bf16 grads, bounded batches --------------------------------------------

PATHS = {"reference": dict(foreach=False), "multi_tensor": dict(foreach=True), "native": dict(fused=True),
         "automatic": dict()}


def _train_paths(options, grad_dtype, shapes=((1000,), (33, 17), (0,), (5,)), steps=20, **hyper):
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
              for i, s in enumerate(shapes)]
    streams = [grad_stream(s, steps, seed=10 + i) for i, s in enumerate(shapes)]
    opt = AdamPower(params, **{**HYPER, "power": 1.2, **hyper}, **options)
    for k in range(steps):
        for p, stream in zip(params, streams):
            p.grad_dtype = None  # lets a bf16 grad sit on an fp32 param
            p.grad = stream[k].to(grad_dtype)
        grads = [p.grad.clone() for p in params]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))  # grads are left untouched
    return params, streams


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("adam_w_mode", [True, False])
def test_every_path_matches_float64_model_with_low_precision_grads(path, grad_dtype, adam_w_mode):
    """fp32 params with fp32/bf16/fp16 grads (widened exactly) on every path, against the float64 model."""
    params, streams = _train_paths(PATHS[path], grad_dtype, adam_w_mode=adam_w_mode)
    for i, (p, stream) in enumerate(zip(params, streams)):
        ref = Float64AdamPower(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)),
                               adam_w_mode=adam_w_mode, power=1.2, **HYPER)
        for g in stream:
            ref.step(g.to(grad_dtype))
        torch.testing.assert_close(p.detach().double(), ref.w, rtol=1e-5, atol=1e-5)


def test_paths_agree_with_each_other():
    """The native kernel and the multi-tensor path against the single-tensor reference path, per element."""
    ref, _ = _train_paths(PATHS["reference"], torch.float32)
    for path in ("multi_tensor", "native"):
        ours, _ = _train_paths(PATHS[path], torch.float32)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_automatic_choice_on_the_cpu_is_the_native_kernel(monkeypatch):
    from gradpower_ds.ops import native_adam_power as native

    calls = []
    real = native.native_adam_power_step
    monkeypatch.setattr(native, "native_adam_power_step", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    _train_paths({}, torch.float32, steps=1)
    assert calls == [(1000,), (33, 17), (0,), (5,)]
    calls.clear()
    _train_paths(dict(foreach=True), torch.float32, steps=1)
    _train_paths(dict(fused=False), torch.float32, steps=1)
    assert not calls


@pytest.mark.parametrize("power", [1.0, 1.2])
def test_multi_tensor_batches_are_bounded_and_exact(monkeypatch, power):
    """Batches of at most MULTI_TENSOR_BATCH elements (a large tensor split into pieces) give the same result: bit for
    bit where phi is the identity; with p = 1.2 within torch's pow, whose vectorised and scalar loops (which elements
    fall in which depends on where a batch starts) differ in the last bit for some inputs."""
    from gradpower_ds import torch_paths

    whole, _ = _train_paths(PATHS["multi_tensor"], torch.bfloat16, power=power)
    sizes = []
    real_batches = torch_paths._batches

    def recorded(*args):
        for batch in real_batches(*args):
            sizes.append(sum(t.numel() for t in batch[0]))
            yield batch

    monkeypatch.setattr(torch_paths, "MULTI_TENSOR_BATCH", 300)
    monkeypatch.setattr(torch_paths, "_batches", recorded)
    pieces, _ = _train_paths(PATHS["multi_tensor"], torch.bfloat16, power=power)
    assert max(sizes) <= 300 and sum(sizes) == 20 * (1000 + 33 * 17 + 5)
    for a, b in zip(whole, pieces):
        if power == 1.0:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", ["reference", "multi_tensor", "native"])
@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_copies_on_every_path(path, copy_dtype):
    from gradpower_ds import adam_power

    params = [torch.randn(257), torch.randn(3, 5)]
    grads = [torch.randn_like(p) for p in params]
    copies = [torch.full_like(p, float("nan"), dtype=copy_dtype) for p in params]
    adam_power(params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
               [torch.tensor(0.0) for _ in params], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
               power=1.2, low_precision_params=copies, **PATHS[path])
    for p, c in zip(params, copies):
        assert torch.equal(c, p.to(copy_dtype))


def test_fused_true_on_the_cpu_needs_fp32_moments():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    # AdamPower keeps moments in the param's dtype, as torch's AdamW (CPUAdamPower keeps fp32 ones)
    with pytest.raises(TypeError, match="moments contiguous fp32 ones.*bfloat16 param with torch.bfloat16 moments"):
        AdamPower([p], fused=True).step()
    AdamPower([p]).step()  # the automatic choice takes the multi-tensor path for bf16 params
    assert p.detach().lt(0).all()


def test_native_path_checks_every_buffer_it_reads():
    """The native kernel reads raw memory: a grad or moment of the wrong size is refused, never read past."""
    from gradpower_ds import adam_power

    param, m, v = torch.zeros(8), torch.zeros(8), torch.zeros(8)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, power=1.2)
    with pytest.raises(TypeError, match="grads CPU tensors of their shape"):
        adam_power([param], [torch.ones(4)], [m], [v], [torch.tensor(0.0)], fused=True, **hyper)
    with pytest.raises(TypeError, match="moments contiguous fp32 ones"):
        adam_power([param], [torch.ones(8)], [torch.zeros(4)], [v], [torch.tensor(0.0)], fused=True, **hyper)
    with pytest.raises(RuntimeError):  # automatic choice: the torch path, whose own shape check speaks
        adam_power([param], [torch.ones(4)], [m], [v], [torch.tensor(0.0)], **hyper)


# ---- the automatic torch path on CUDA (no Triton, or a failed gate): phi into the copy + torch's fused Adam(W) ----

@pytest.fixture
def torch_fused_on_cpu(monkeypatch):
    """The automatic choice's torch fused path on CPU tensors (the CPU among TORCH_FUSED_DEVICES, the native kernel
    unavailable); yields the list of its calls' param counts."""
    from gradpower_ds import torch_paths
    from gradpower_ds.ops import native_adam_power as native

    monkeypatch.setattr(torch_paths, "TORCH_FUSED_DEVICES", ("cpu",))
    monkeypatch.setattr(native, "native_available", lambda: False)
    calls = []
    real = torch_paths.torch_fused_adam_power
    monkeypatch.setattr(torch_paths, "torch_fused_adam_power", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    yield calls


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("adam_w_mode", [True, False])
@pytest.mark.parametrize("power_eps", [0.0, 1e-8])
def test_torch_fused_path_matches_float64_model(torch_fused_on_cpu, grad_dtype, adam_w_mode, power_eps):
    params, streams = _train_paths({}, grad_dtype, adam_w_mode=adam_w_mode, power_eps=power_eps)
    assert torch_fused_on_cpu == [4] * 20  # every step, all four params, one call
    for i, (p, stream) in enumerate(zip(params, streams)):
        ref = Float64AdamPower(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)),
                               adam_w_mode=adam_w_mode, power=1.2, power_eps=power_eps, **HYPER)
        for g in stream:
            ref.step(g.to(grad_dtype))
        torch.testing.assert_close(p.detach().double(), ref.w, rtol=1e-5, atol=1e-5)


def test_torch_fused_path_is_only_the_automatic_choice_with_bias_correction(torch_fused_on_cpu):
    for options in (dict(foreach=True), dict(foreach=False), dict(fused=False)):
        _train_paths(options, torch.float32, steps=1)
    _train_paths({}, torch.float32, steps=1, bias_correction=False)  # torch's kernel always corrects
    assert torch_fused_on_cpu == []
    _train_paths({}, torch.float32, steps=1)
    assert torch_fused_on_cpu == [4]


def test_torch_fused_path_writes_low_precision_copies(torch_fused_on_cpu):
    from gradpower_ds import adam_power

    params = [torch.randn(257), torch.randn(3, 5)]
    copies = [torch.full_like(p, float("nan"), dtype=torch.bfloat16) for p in params]
    adam_power(params, [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params],
               [torch.zeros_like(p) for p in params], [torch.tensor(0.0) for _ in params], lr=1e-2, beta1=0.9,
               beta2=0.999, eps=1e-8, weight_decay=0.1, power=1.2, low_precision_params=copies)
    assert torch_fused_on_cpu == [2] and all(torch.equal(c, p.to(torch.bfloat16)) for p, c in zip(params, copies))


def _bytes_per_element(options, grad_dtype, n=1 << 16):
    """Bytes each aten op of one step reads and writes, per element (tests/byte_count.py), and the op count."""
    from byte_count import ByteCount
    from gradpower_ds import adam_power

    params, grads, exp_avgs, exp_avg_sqs = [torch.randn(n)], [torch.randn(n).to(grad_dtype)], [torch.zeros(n)], \
        [torch.zeros(n)]
    with ByteCount() as count:
        adam_power(params, grads, exp_avgs, exp_avg_sqs, [torch.tensor(0.0)], lr=1e-3, beta1=0.9, beta2=0.999,
                   eps=1e-8, weight_decay=0.1, power=1.2, **options)
    return count.total_bytes() / n


def test_bytes_per_element_of_the_torch_paths(torch_fused_on_cpu):
    """The traffic of the torch paths, counted from the ops they dispatch: the automatic torch path (on CUDA without
    Triton) 60 B/element for fp32 grads, under the 84 of issue 33 (phi 28 + torch's fused AdamW 32 as its schema
    counts it, which marks the grads written; its kernel stores them only with a grad_scale, so 56 moved); the
    multi-tensor path 108, where a copy and then phi in place made it 128; bf16 grads read 2 bytes less and take
    a widening copy."""
    assert _bytes_per_element({}, torch.float32) == 60 and torch_fused_on_cpu == [1]
    assert _bytes_per_element({}, torch.bfloat16) == 64
    assert _bytes_per_element(dict(foreach=True), torch.float32) == 108
    assert _bytes_per_element(dict(foreach=True), torch.bfloat16) == 112


# ---- grad_scale: a wrapper's unscale/clip coefficient folded into the step ----------------------------------------

@pytest.mark.parametrize("path", ["reference", "multi_tensor", "native", "torch_fused"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [*GRAD_SCALES, "tensor"])
@pytest.mark.parametrize("power_eps", [0.0, 1e-8])
def test_grad_scale_is_bitwise_the_grads_multiplied_first(path, grad_dtype, scale, power_eps, monkeypatch):
    from gradpower_ds import adam_power, torch_paths

    if path == "torch_fused":  # the automatic torch path of CUDA, on CPU tensors
        monkeypatch.setattr(torch_paths, "TORCH_FUSED_DEVICES", ("cpu",))
        monkeypatch.setattr(native_adam_power, "native_available", lambda: False)
    options = {} if path == "torch_fused" else PATHS[path]
    scale = torch.tensor([0.37]) if scale == "tensor" else scale

    def step(params, grads, exp_avgs, exp_avg_sqs, steps, **kwargs):
        adam_power(params, grads, exp_avgs, exp_avg_sqs, steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                   weight_decay=0.1, power=1.2, **options, **kwargs)

    assert_grad_scale_is_prescaling(step, [(1000,), (33, 17), (0,), (5,)], grad_dtype, scale, power_eps)


def test_fold_into_next_step_holds_for_one_step_only():
    """The optimizer API DeepSpeed's patches use: the scale and the copy targets apply to the next step alone."""
    for cls in (AdamPower, CPUAdamPower):
        params = [torch.nn.Parameter(torch.randn(64)) for _ in range(2)]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        ours, plain = cls(params, lr=1e-2), cls(twins, lr=1e-2)
        copy = torch.full((64,), float("nan"), dtype=torch.bfloat16)
        for k in range(3):
            grads = [torch.randn(64) for _ in params]
            for p, t, g in zip(params, twins, grads):
                p.grad, t.grad = g.clone(), g.clone() * (0.25 if k == 0 else 1.0)
            if k == 0:
                ours.fold_into_next_step(grad_scale=0.25)
                ours.fold_into_next_step(copy_out={params[1]: copy})  # calls before one step add up
            ours.step()
            plain.step()
            assert all(torch.equal(p, t) for p, t in zip(params, twins)), (cls, k)
            if k == 0:
                assert torch.equal(copy, params[1].detach().to(torch.bfloat16))
        assert not torch.equal(copy, params[1].detach().to(torch.bfloat16))  # written at the first step only


def test_load_state_dict_twice_after_a_default_was_added():
    """DeepSpeed adds keys to an optimizer's defaults (e.g. "differentiable") that its groups lack: a second
    engine.load_checkpoint into the same engine then loaded through a group without that key."""
    param = torch.nn.Parameter(torch.randn(5))
    optimizer = AdamPower([param], lr=1e-2)
    param.grad = torch.ones(5)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    optimizer.defaults["differentiable"] = False
    optimizer.load_state_dict(saved)
    optimizer.load_state_dict(copy.deepcopy(saved))
    assert optimizer.param_groups[0]["power"] == 1.2 and optimizer.state[param]["step"].item() == 1
