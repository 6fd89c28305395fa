"""MuonPower through DeepSpeed: ZeRO 0-3 x fp32/bf16 (and ZeRO-2/3 with optimizer offload), on 2 gloo ranks.

One launched job (tests/jobs/ds_muon.py) trains every case with MuonPower (power 1.5, adam_power 1.2), MuonPower
(1, 1) and DeepSpeed's own "Muon"; each test here checks one case:

- MuonPower(1, 1) equals DeepSpeed's Muon bit for bit (every parameter, every case);
- MuonPower(1.5, 1.2) matches ds_toy.muon_reference_run, a single-process run that applies phi (float64) before
  DeepSpeed's own muon_update, and AdamPower (the reference path) to the other parameters: fp32 within FP32_TOL
  of every tensor (measured: 6.8e-8 at most) where DeepSpeed's Newton-Schulz runs in fp32, FP16_NS_TOL where it
  runs in fp16 (fp32_tolerance; measured 0.99-1.11e-4), bf16 (forward/backward in bf16 against the fp32
  reference) within LOW_PRECISION_TOL of the update (measured: 0.047 for ZeRO 1-3, 0.059 at stage 0, whose wrapper sums the
  gradients in bf16); and far from DeepSpeed's Muon (fp32: 2.3e-2 per tensor; bf16: 2.9-3.1x further from the
  reference than ours), so the checks can tell the power is applied;
- a checkpoint saved after one step and loaded into a new engine continues bit for bit (RESUME_CASES).

Bad input (no power, p <= 0, an unknown key, fp16, a model without a Muon matrix) is refused with a ValueError
naming the setting (test_muon_power_refusals, in one more launched process).
"""

import functools
from pathlib import Path

import pytest
import torch

from conftest import torchrun
from jobs import ds_muon, ds_toy

JOB = Path(__file__).parent / "jobs" / "ds_muon.py"
REFUSALS = Path(__file__).parent / "jobs" / "ds_muon_refusals.py"
FP32_TOL = 1e-5
FP16_NS_TOL = 1e-3  # fp32 models where DeepSpeed's Newton-Schulz runs in fp16 (fp32_tolerance)
LOW_PRECISION_TOL = 0.1
CASES = ds_toy.muon_cases()

pytestmark = pytest.mark.slow


def needs_deepspeed_muon():
    from gradpower_ds.deepspeed import muon_power

    if not muon_power.DEEPSPEED_MUON.is_tested(muon_power.DEEPSPEED_MUON.installed()):
        pytest.skip(f"MuonPower needs DeepSpeed {muon_power.DEEPSPEED_MUON.supported}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    needs_deepspeed_muon()
    out = tmp_path_factory.mktemp("muon") / "results.pt"
    torchrun(JOB, out, timeout=1800)
    return torch.load(out)


@functools.cache
def reference(dtype: str, stage0: bool, world: int = 2) -> dict:
    # DeepSpeed's stage-0 bf16 wrapper (FP16_UnfusedOptimizer in 0.19.8) sums gradients in bf16 and steps once on
    # all-zero gradients when it initialises the optimizer; the reference does the same (as tests/test_deepspeed_matrix)
    low_stage0 = stage0 and dtype != "fp32"
    return ds_toy.muon_reference_run(ds_muon.MUON_STEPS, dtype, ds_muon.POWER, ds_muon.ADAM_POWER,
                                     accumulate=dtype if low_stage0 else "fp32", zero_grad_step=low_stage0,
                                     world=world, **ds_muon.MUON_PARAMS)


def fp32_tolerance() -> float:
    """The fp32 cases' tolerance: FP32_TOL where DeepSpeed's Newton-Schulz ("gram", as MuonPower and the reference
    call it) runs in fp32; FP16_NS_TOL where it runs in fp16, which DeepSpeed picks on a CPU whose oneDNN has fp16
    (an Intel Xeon with AVX512-FP16/AMX, not the AMD EPYC VMs): there the last-bit differences of the 2-rank
    gradient reduction come out of fp16 NS at 0.99-1.11e-4 (measured, 2026-12-03, six cases). DeepSpeed exports
    the dtype for exactly this (original_muon.ns_compute_dtype)."""
    from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype

    return FP32_TOL if ns_compute_dtype("gram") == torch.float32 else FP16_NS_TOL


def tensor_rel_error(got: dict, want: dict) -> float:
    """Largest per-tensor ||got - want|| / ||want||."""
    return max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want)


def update_rel_error(got: dict, want: dict) -> float:
    """||got - want|| / ||want - init|| over all parameters."""
    init = {name: p.detach() for name, p in ds_toy.make_model().named_parameters()}
    diff = torch.stack([(got[k] - want[k]).norm() for k in want]).norm()
    update = torch.stack([(want[k] - init[k]).norm() for k in want]).norm()
    return (diff / update).item()


@pytest.mark.parametrize("case", CASES, ids=[ds_toy.muon_case_name(*c) for c in CASES])
def test_muon_power_matches_reference_and_deepspeed_muon(results, case):
    name = ds_toy.muon_case_name(*case)
    ours, ours_p1, muon = (results[(name, label)] for label in ("power", "power1", "ds_muon"))
    assert ours["optimizer"] == ours_p1["optimizer"] == "MuonPower"
    assert muon["optimizer"] == "MuonWithAuxAdam"
    assert ours["aux"] == ("CPUAdamPower")  # the CPU accelerator: the native kernel, as for AdamPower
    assert ours_p1["aux"] == muon["aux"]  # adam_power 1: DeepSpeed's own auxiliary Adam
    for key in muon["params"]:
        assert torch.equal(ours_p1["params"][key], muon["params"][key]), key

    stage, dtype, _ = case
    want = reference(dtype, stage == 0)
    if dtype == "fp32":
        tolerance = fp32_tolerance()
        assert tensor_rel_error(ours["params"], want) <= tolerance
        assert tensor_rel_error(ours["params"], muon["params"]) > 10 * tolerance  # measured 2.3e-2
    else:
        error = update_rel_error(ours["params"], want)
        assert error <= LOW_PRECISION_TOL
        assert update_rel_error(muon["params"], want) > 2.5 * error  # the power shows through bf16's rounding


@pytest.mark.parametrize("name", ds_muon.RESUME_CASES)
def test_muon_power_resumes_exactly(results, name):
    straight, resumed = results[(name, "power")]["params"], results[(name, "resumed")]["params"]
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_muon_power_refusals():
    """Every refusal on every tested DeepSpeed: the settings first; then, on a DeepSpeed without the Muon MuonPower
    hooks, the version (0.16.0 in the oldest-versions run)."""
    from gradpower_ds.deepspeed import muon_power

    proc = torchrun(REFUSALS, nproc=1, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED ")]
    refused = dict(line[len("REFUSED "):].split(": ", 1) for line in lines)
    assert len(refused) == 6, proc.stdout
    assert "muonpower needs power, MuonPower's p" in refused["no power"]
    assert "openai/parameter-golf" in refused["no power"]
    assert refused["power 0"].endswith("invalid power=0: must be a finite number > 0 (1.0 is plain Muon)")
    assert "invalid adam_power=-1" in refused["adam_power -1"]
    assert "unknown key(s) ['nesterov']" in refused["unknown key"]
    installed = muon_power.DEEPSPEED_MUON.installed()
    if muon_power.DEEPSPEED_MUON.is_tested(installed):
        assert 'cannot run with "fp16"' in refused["fp16"]
        assert "no parameter for Muon" in refused["no matrix"]
    else:
        for label in ("fp16", "no matrix"):
            assert refused[label].startswith("DeepSpeed optimizer 'MuonPower' needs DeepSpeed's Muon as of 0.19.8")
            assert f"DeepSpeed {installed} is installed" in refused[label]
