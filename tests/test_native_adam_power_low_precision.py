"""CPUAdamPower takes bf16/fp16 params as DeepSpeedCPUAdam does: fp32 moments, the update computed in fp32, the
new weights rounded into the param.

Tested the way DeepSpeed's tests/unit/ops/adam/test_cpu_adam.py tests its class (param dtype x sizes 22, 64,
128, 1024, 1M, 10 steps, against torch's AdamW on an fp32 copy of the weights, to DeepSpeed's tolerance), plus
a stricter reference: torch's AdamW stepping fp32 weights widened from the 16-bit param each step (fp32
moments kept), its result rounded back, and φ applied in float64 first (p = 1.2). On every ISA.
"""

import pytest
import torch

from gradpower_ds import CPUAdamPower, grad_power
from gradpower_ds.ops import native_adam_power as native
from test_native_adam_power import ISAS

SIZES = [22, 64, 128, 1024, 1 << 20]
STEPS = 10
LR, WD = 1e-3, 0.01

def _grads(n: int, dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen) * 1e-2).to(dtype) for _ in range(STEPS)]


def _run_ours(init: torch.Tensor, grads, power: float, isa: str) -> tuple[torch.Tensor, CPUAdamPower]:
    param = torch.nn.Parameter(init.clone())
    if grads[0].dtype != init.dtype:
        param.grad_dtype = None  # torch >= 2.10 refuses a grad of another dtype unless told
    opt = CPUAdamPower([param], lr=LR, weight_decay=WD, power=power, isa=isa)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    return param.detach(), opt


def _strict_reference(init: torch.Tensor, grads, power: float) -> torch.Tensor:
    """torch AdamW on fp32 weights widened from the 16-bit param each step (fp32 moments), rounded back; φ in float64."""
    weights = torch.nn.Parameter(init.float())
    opt = torch.optim.AdamW([weights], lr=LR, weight_decay=WD, foreach=False)
    low = init.clone()
    for g in grads:
        with torch.no_grad():
            weights.copy_(low.float())
        weights.grad = grad_power(g.float(), power)
        opt.step()
        low = weights.detach().to(init.dtype)
    return low


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", SIZES)
def test_like_deepspeeds_cpu_adam_test_against_torch_adamw(isa, dtype, n):
    init = torch.rand(n).to(dtype)
    grads = _grads(n, dtype)
    ours, opt = _run_ours(init, grads, 1.0, isa)
    assert ours.dtype == dtype
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32  # fp32 moments, as DeepSpeed's
    fp32 = torch.nn.Parameter(init.float())
    torch_opt = torch.optim.AdamW([fp32], lr=LR, weight_decay=WD)
    for g in grads:
        fp32.grad = g.float()
        torch_opt.step()
    # DeepSpeed's test_cpu_adam tolerance for 16-bit params: 1e-2 (absolute, values in [0, 1)); 1e-6 for fp32
    torch.testing.assert_close(ours.float(), fp32.detach(), atol=1e-2 if dtype != torch.float32 else 1e-6, rtol=0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("power", [1.0, 1.2])
def test_sixteen_bit_params_match_the_fp32_update_rounded_back(isa, dtype, power):
    n = 4099  # whole vectors and a scalar tail
    init = (torch.randn(n) * 0.5).to(dtype)
    grads = _grads(n, dtype, seed=1)
    ours, _ = _run_ours(init, grads, power, isa)
    want = _strict_reference(init, grads, power)
    # our fp32 update differs from torch's by at most an fp32 ulp or so (it multiplies by 1/sqrt(bias_correction2)
    # where torch divides; φ is within 2e-7): after rounding to 16 bits almost every element is equal, the rest one
    # 16-bit ulp apart (a near-tie rounded the other way)
    equal = (ours == want).float().mean().item()
    assert equal >= 0.99, equal
    ulp = (want.float().abs() * torch.finfo(dtype).eps).clamp_min(torch.finfo(dtype).tiny)
    assert ((ours.float() - want.float()).abs() <= ulp * 1.0001).all()
    assert not torch.equal(ours, init)  # it trained


def test_sixteen_bit_params_keep_fp32_moments_through_a_checkpoint():
    param = torch.nn.Parameter(torch.randn(1000).to(torch.bfloat16))
    opt = CPUAdamPower([param], lr=LR)
    for g in _grads(1000, torch.bfloat16)[:3]:
        param.grad = g
        opt.step()
    saved = opt.state_dict()
    before = {k: v.clone() for k, v in opt.state[param].items()}
    fresh = CPUAdamPower([param], lr=LR)
    fresh.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        assert fresh.state[param][key].dtype == torch.float32
        assert torch.equal(fresh.state[param][key], before[key])  # not rounded through bf16 on the way
    assert fresh.state[param]["step"].item() == 3


def test_a_sixteen_bit_param_takes_no_separate_copy():
    param = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    param.grad = torch.ones(8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"copies contiguous bf16/fp16 ones \(none for a bf16/fp16 param\)"):
        CPUAdamPower([param]).step(fp16_param_groups=[[torch.zeros(8, dtype=torch.bfloat16)]])
    moments = [torch.zeros(8) for _ in range(2)]  # the kernel's own boundary says it too
    with pytest.raises(TypeError, match="receives its new weights itself; pass copy=None"):
        native.native_adam_power_step(param.detach(), param.grad, *moments, torch.zeros(8, dtype=torch.bfloat16),
                                      step=1, lr=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                      adam_w_mode=True, power=1.2, power_eps=0.0, bias_correction=True,
                                      isa="scalar", num_threads=1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("power", [1.0, 1.2])
def test_kernel_reads_sixteen_bit_params_like_the_widening_path(isa, dtype, power):
    """A 16-bit grad goes to the kernel as it is (16-bit loads and stores in the kernel); an fp32 grad of the same
    values takes the chunked path (param widened into fp32 scratch, rounded back by the copy-out). Same maths:
    bitwise the same weights and moments, across chunk boundaries and vector tails."""
    n = native.CHUNK + 37
    init = torch.rand(n).to(dtype)
    grads = _grads(n, dtype, seed=3)
    direct, direct_opt = _run_ours(init, grads, power, isa)
    widened, widened_opt = _run_ours(init, [g.float() for g in grads], power, isa)
    assert torch.equal(direct, widened)
    for key in ("exp_avg", "exp_avg_sq"):
        a, b = (next(iter(o.state.values()))[key] for o in (direct_opt, widened_opt))
        assert a.dtype == torch.float32 and torch.equal(a, b)
