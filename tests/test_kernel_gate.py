"""gradpower_ds.kernel_gate: the per-GPU check that makes the Triton kernel the default, on the CPU.

The check itself runs through Triton's interpreter on CPU tensors (TRITON_INTERPRET=1), the GPU's
identity is mocked; a kernel made wrong on purpose must fail it. The verdict's cache, the override
variable and the wiring into the automatic choice (once per device and grad dtype) are tested around it.
"""

import json
import os
import warnings

import pytest
import torch

import gradpower_ds.functional as functional
from gradpower_ds import kernel_gate, power
from gradpower_ds.ops import triton_adam_power as tap

pytestmark = pytest.mark.skipif(tap.triton is None, reason="needs Triton (its interpreter runs the kernel on the CPU)")
CPU = torch.device("cpu")
H200 = dict(gpu="NVIDIA H200", capability="sm_90", triton="3.9.0", gradpower_ds="0.1.0", kernel="abc")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """The interpreter on, the verdicts' directory in tmp, this process's verdicts forgotten, no override."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("GRADPOWER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GRADPOWER_TRITON", raising=False)
    monkeypatch.setattr(kernel_gate, "_verdicts", {})


def _counting_check(monkeypatch, result=None):
    """Replaces the check with one that returns `result` and counts its calls."""
    calls = []
    monkeypatch.setattr(kernel_gate, "check", lambda device, dtype: calls.append((device, dtype)) or result)
    monkeypatch.setattr(kernel_gate, "device_identity", lambda device: dict(H200))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_kernel_passes_its_check(dtype):
    assert kernel_gate.check(CPU, dtype) is None


def _wrong_bias_correction(beta1, beta2, step, bias_correction):
    bc1, bc2_sqrt = real_bias_corrections(beta1, beta2, step, bias_correction)
    return bc1, bc2_sqrt * (1 + 1e-3)


real_bias_corrections = tap.bias_corrections


def test_a_wrong_step_fails_the_check_saying_where(monkeypatch):
    monkeypatch.setattr(tap, "bias_corrections", _wrong_bias_correction)
    difference = kernel_gate.check(CPU, torch.float32)
    assert difference.startswith("case 0 (p=1.2, power_eps=0.0, AdamW weight_decay=0.1, bias_correction=True), "
                                 "param: Mismatched elements:"), difference
    assert "\n" not in difference


def test_an_ignored_grad_scale_fails_the_check(monkeypatch):
    monkeypatch.setattr(tap, "_scale_tensor", lambda scale, device: torch.ones(1, device=device))
    assert kernel_gate.check(CPU, torch.float32).startswith(
        "case 4 (p=1.2, power_eps=0.0, AdamW weight_decay=0.1, bias_correction=True, grad_scale=0.37), param: ")


def test_a_wrong_phi_fails_the_check(monkeypatch):
    real_launch = tap._launch

    def phi_off(tensors, scalars, **flags):
        real_launch(tensors, scalars, **flags)
        if flags["PHI_ONLY"]:
            for columns in tensors:
                columns[1].view(-1)[1:2].mul_(1.05)  # one element off by 5%, beyond one bf16 rounding
    monkeypatch.setattr(tap, "_launch", phi_off)
    assert kernel_gate.check(CPU, torch.bfloat16).startswith("phi_p in place (p=1.2): Mismatched elements: ")


def test_a_kernel_that_cannot_launch_fails_the_check(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("PTX not supported")
    monkeypatch.setattr(tap._Launch, "run", broken)
    assert kernel_gate.check(CPU, torch.float32) == "RuntimeError: PTX not supported"


def test_the_real_check_decides_and_is_kept_on_disk(tmp_path):
    assert kernel_gate.triton_is_default(CPU, torch.float32) is True
    kept = json.loads((tmp_path / "cache" / kernel_gate.CACHE_FILE).read_text())
    (key, verdict), = kept.items()
    assert verdict["passed"] is True and verdict["difference"] is None
    assert verdict["gpu"] == "Triton interpreter" and verdict["grad_dtype"] == "float32"
    assert verdict["triton"] == tap.triton.__version__ and f"triton={tap.triton.__version__}" in key
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700


def test_checked_once_per_device_and_dtype_then_read_from_disk(monkeypatch):
    calls = _counting_check(monkeypatch)
    for _ in range(3):
        assert kernel_gate.triton_is_default(CPU, torch.float32) and kernel_gate.triton_is_default(CPU, torch.bfloat16)
    assert calls == [(CPU, torch.float32), (CPU, torch.bfloat16)]
    monkeypatch.setattr(kernel_gate, "_verdicts", {})  # a new process on the same GPU kind
    assert kernel_gate.triton_is_default(CPU, torch.float32)
    assert len(calls) == 2
    monkeypatch.setattr(kernel_gate, "_verdicts", {})
    monkeypatch.setattr(kernel_gate, "device_identity", lambda device: dict(H200, triton="3.10.0"))
    assert kernel_gate.triton_is_default(CPU, torch.float32)  # another Triton: checked again
    assert len(calls) == 3


def test_a_failed_check_means_the_torch_path_and_one_warning_per_process(monkeypatch):
    calls = _counting_check(monkeypatch, result="param: Mismatched elements: 1 / 4133")
    with pytest.warns(RuntimeWarning) as caught:
        assert kernel_gate.triton_is_default(CPU, torch.float32) is False
        assert kernel_gate.triton_is_default(CPU, torch.float32) is False
    assert len(caught) == 1
    message = str(caught[0].message)
    for part in ("NVIDIA H200", "sm_90", "Triton 3.9.0", "float32 grads", "param: Mismatched elements: 1 / 4133",
                 "torch path", kernel_gate.REPORT_TO, "GRADPOWER_TRITON=1"):
        assert part in message, part
    monkeypatch.setattr(kernel_gate, "_verdicts", {})
    with pytest.warns(RuntimeWarning, match="Mismatched elements"):  # the kept verdict, said again in a new process
        assert kernel_gate.triton_is_default(CPU, torch.float32) is False
    assert len(calls) == 1


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), ("auto", True), (" AUTO ", True)])
def test_the_variable_forces_either_path(monkeypatch, value, expected):
    calls = _counting_check(monkeypatch)
    monkeypatch.setenv("GRADPOWER_TRITON", value)
    assert kernel_gate.triton_is_default(CPU, torch.float32) is expected
    assert len(calls) == (value.strip().lower() == "auto")


def test_a_bad_variable_says_what_to_set(monkeypatch):
    monkeypatch.setenv("GRADPOWER_TRITON", "yes")
    with pytest.raises(ValueError, match=r"GRADPOWER_TRITON='yes': use 1 .* 0 .* or auto"):
        kernel_gate.triton_is_default(CPU, torch.float32)


def test_forced_on_still_needs_triton_to_run(monkeypatch):
    monkeypatch.setenv("GRADPOWER_TRITON", "1")
    monkeypatch.setattr(tap, "triton_available", lambda: False)
    assert kernel_gate.triton_is_default(CPU, torch.float32) is False


def test_a_damaged_cache_is_checked_again_and_rewritten(monkeypatch, tmp_path):
    calls = _counting_check(monkeypatch)
    (tmp_path / "cache").mkdir(mode=0o700)
    (tmp_path / "cache" / kernel_gate.CACHE_FILE).write_text("{not json")
    assert kernel_gate.triton_is_default(CPU, torch.float32)
    assert len(calls) == 1 and len(json.loads((tmp_path / "cache" / kernel_gate.CACHE_FILE).read_text())) == 1


def test_a_directory_others_can_write_is_not_used(monkeypatch, tmp_path):
    calls = _counting_check(monkeypatch)
    (tmp_path / "cache").mkdir()
    os.chmod(tmp_path / "cache", 0o777)
    assert kernel_gate.triton_is_default(CPU, torch.float32)
    assert not (tmp_path / "cache" / kernel_gate.CACHE_FILE).exists()
    monkeypatch.setattr(kernel_gate, "_verdicts", {})
    assert kernel_gate.triton_is_default(CPU, torch.float32) and len(calls) == 2  # nothing kept: checked again


def test_the_default_cache_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("GRADPOWER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernel_gate.cache_dir() == tmp_path / "xdg" / "gradpower_ds"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert kernel_gate.cache_dir() == kernel_gate.Path.home() / ".cache" / "gradpower_ds"


def test_automatic_choice_on_cuda_follows_the_gate(monkeypatch):
    monkeypatch.setattr(tap, "triton_available", lambda: True)
    asked = []
    monkeypatch.setattr(kernel_gate, "triton_is_default", lambda device, dtype: asked.append(dtype) or
                        dtype == torch.float32)
    cuda = torch.device("cuda", 0)
    assert power.fused_kernel(cuda, None, torch.float32) == "triton"
    assert power.fused_kernel(cuda, None, torch.bfloat16) is None
    assert power.fused_kernel(cuda, False, torch.float32) is None and power.fused_kernel(cuda, True) == "triton"
    assert asked == [torch.float32, torch.bfloat16]  # explicit choices never ask the gate


def test_the_kernel_is_chosen_once_per_device_and_grad_dtype_per_step(monkeypatch):
    """Decision once: 40 tensors of two grad dtypes, one step, two choices; the torch paths never choose again."""
    chosen = []
    real = functional.fused_kernel
    monkeypatch.setattr(functional, "fused_kernel", lambda *a: chosen.append(a) or real(*a))
    monkeypatch.setattr(power, "fused_kernel", lambda *a: pytest.fail(f"the phi pass chose again: {a}"))
    params = [torch.randn(5) for _ in range(40)]
    grads = [torch.randn(5, dtype=torch.float32 if i % 2 else torch.bfloat16) for i in range(40)]
    for options in (dict(), dict(foreach=True), dict(foreach=False), dict(fused=False)):
        chosen.clear()
        functional.adam_power(params, grads, [torch.zeros(5) for _ in params], [torch.zeros(5) for _ in params],
                              [torch.tensor(0.0) for _ in params], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=0.0, power=1.2, **options)
        assert sorted(str(dtype) for _, _, dtype in chosen) == ["torch.bfloat16", "torch.float32"], options


def test_no_global_switch_is_left():
    assert not hasattr(tap, "VERIFIED_ON_GPU") and not hasattr(tap, "triton_by_default")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_gate.choice() is None
