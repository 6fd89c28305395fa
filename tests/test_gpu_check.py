"""tests/gpu/check.sh, the prepared GPU check, as CI's dry run: every step in its CPU form, and its report.

On a GPU machine the same script runs the GPU forms (tests/gpu/check.py); here the GPU tests skip
cleanly, the benchmarks run at tiny sizes on the CPU and bench_triton_adam_power through Triton's interpreter.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "gpu"))
import check  # noqa: E402  (tests/gpu/check.py)

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["environment", "install", "kernel_tests", "bench_triton_adam_power", "deepspeed_tests", "main_job_tests",
         "megatron_tests", "bench_megatron_step", "bench_deepspeed_step"]


def test_step_budgets_fit_the_eight_minutes():
    for gpu in (True, False):
        assert [s["name"] for s in check.steps(gpu)] == STEPS
        assert sum(s["budget"] for s in check.steps(gpu)) <= check.TOTAL_BUDGET == 480


def test_figures_are_read_from_the_outputs_a_gpu_run_prints():
    bench = ("TARGET n=67108864: our kernel at p=1.2 <= 1.0x torch fused AdamW and >= 90% of roofline: PASS "
             "(0.981x, 93.2%)\n")
    assert check.figures("bench_triton_adam_power", bench) == {
        "triton_p1.2_vs_torch_fused_adamw_n67108864": dict(ratio=0.981, roofline_pct=93.2, target="PASS")}
    megatron = ("RATIO adampower/adam step time: 1.013 (target <= 1.05 on CPU, <= 1.02 on GPU) case=bf16-distributed\n"
                "PEAK_EXTRA adampower=0.0 MiB adam=64.0 MiB largest_grad=256.0 MiB case=bf16-distributed\n")
    assert check.figures("bench_megatron_step", megatron) == {
        "megatron_step_ratio_bf16-distributed": 1.013,
        "megatron_peak_extra_mib_bf16-distributed": dict(adampower=0.0, adam=64.0, largest_grad=256.0)}
    deepspeed = "RATIO zero2 1.0040\nRATIO_OPTIMIZER_STEP zero2 0.9500\n"
    assert check.figures("bench_deepspeed_step", deepspeed) == {
        "deepspeed_train_step_ratio_zero2": 1.004, "deepspeed_optimizer_step_ratio_zero2": 0.95}
    assert check.figures("kernel_tests", "12 passed, 1 skipped in 3.2s") == {"pytest": {"passed": 12, "skipped": 1}}


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "tests" / "gpu" / "check.sh"), "--dry-run", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=1800)
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert proc.returncode == 0, proc.stdout + json.dumps(report["steps"], indent=1)[-6000:]
    assert report["mode"] == "dry run (CPU)" and report["passed"]
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert list(status) == STEPS
    expected_skipped = {"kernel_tests", "deepspeed_tests", "main_job_tests", "megatron_tests"}  # GPU-only tests
    assert {name for name, s in status.items() if s == "skipped"} == expected_skipped, status
    figures = {s["name"]: s["figures"] for s in report["steps"]}
    assert figures["environment"]["device"].startswith("no CUDA device")
    assert any(k.startswith("triton_p1.2_vs_torch_fused_adamw") for k in figures["bench_triton_adam_power"])
    assert figures["bench_megatron_step"]["megatron_step_ratio_bf16-distributed"] > 0
    assert figures["bench_deepspeed_step"]["deepspeed_train_step_ratio_zero2"] > 0
    assert (tmp_path / "gpu_check.log").stat().st_size > 0
