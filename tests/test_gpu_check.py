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
STEPS = ["environment", "install", "select", "kernel_tests", "bench_triton_adam_power", "deepspeed_tests",
         "main_job_tests", "megatron_tests", "bench_megatron_step", "bench_deepspeed_step"]
TEST_STEPS = ["kernel_tests", "deepspeed_tests", "main_job_tests", "megatron_tests"]


def test_step_budgets_fit_one_device_command():
    for gpu in (True, False):
        assert [s["name"] for s in check.steps(gpu)] == STEPS
        assert sum(s["budget"] for s in check.steps(gpu)) <= check.TOTAL_BUDGET == 540  # 10-minute commands


def _collected(*args) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


@pytest.mark.slow
def test_every_gpu_test_is_selected_once():
    """The selection covers every test marked gpu in the whole suite (collected here independently, over all of
    tests/), each in one step, the compiled-kernel and MuonPower ones included."""
    selected = check.select_tests(dict(os.environ), timeout=600)
    assert sorted(selected) == sorted(TEST_STEPS) and all(selected.values())
    chosen = [node for ids in selected.values() for node in ids]
    assert sorted(chosen) == sorted(_collected("-m", "gpu", "tests")) and len(set(chosen)) == len(chosen)
    for node in ("tests/test_triton_adam_power.py::test_kernel_compiled_on_cuda_matches_reference",
                 "tests/test_gpu.py::test_kernel_gate_makes_triton_the_default_on_this_gpu[dtype0]",
                 "tests/test_gpu.py::test_deepspeed_muon_power_on_one_gpu"):
        assert node in chosen, node
    assert all(node.split("::")[-1].startswith("test_deepspeed_") for node in selected["deepspeed_tests"])


def test_a_gpu_test_no_step_claims_fails_the_selection(monkeypatch, tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_orphan.py").write_text(
        "import pytest\n\n@pytest.mark.gpu\ndef test_kernel_fine():\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_something_else():\n    pass\n")
    monkeypatch.setattr(check, "ROOT", tmp_path)
    with pytest.raises(RuntimeError, match=r"GPU tests no step runs .*test_orphan.py::test_something_else"):
        check.select_tests(dict(os.environ), timeout=120)


def test_a_skip_on_a_gpu_fails_the_step(tmp_path):
    step = dict(name="kernel_tests", budget=60, command=[sys.executable, "-c", "print('3 passed, 1 skipped in 1.0s')"])
    with open(tmp_path / "log", "w") as log:
        on_gpu = check.run_step(step, True, dict(os.environ), log)
        dry = check.run_step(dict(step, dry=[sys.executable, "-c", "print('4 skipped in 1.0s')"]), False,
                             dict(os.environ), log)
    assert on_gpu["status"] == "failed" and "1 test(s) skipped on a GPU" in on_gpu["reason"]
    assert dry["status"] == "skipped"


def test_targets_are_judged_from_the_figures():
    steps_run = [dict(figures={"triton_p1.2_vs_torch_fused_adamw_n1048576": dict(ratio=1.08, roofline_pct=60.0),
                               "triton_p1.2_vs_torch_fused_adamw_n67108864": dict(ratio=0.98, roofline_pct=93.0)}),
                 dict(figures={"deepspeed_optimizer_step_ratio_zero2": 1.04, "deepspeed_train_step_ratio_zero2": 1.03,
                               "deepspeed_engine_step_ratio_zero2": 1.01, "megatron_step_ratio_bf16-distributed": 1.01,
                               "megatron_inner_step_ratio_bf16-distributed": 1.4, "pytest": {"passed": 3}})]
    verdicts = {t["figure"]: t["met"] for t in check.judge_targets(steps_run)}
    assert verdicts == {
        "triton_p1.2_vs_torch_fused_adamw_n1048576.ratio": False,
        "triton_p1.2_vs_torch_fused_adamw_n67108864.ratio": True,
        "triton_p1.2_vs_torch_fused_adamw_n67108864.roofline_pct": True,  # the 1M roofline is not a target
        "deepspeed_optimizer_step_ratio_zero2": True, "deepspeed_train_step_ratio_zero2": False,
        "deepspeed_engine_step_ratio_zero2": True, "megatron_step_ratio_bf16-distributed": True}  # inner: reported


def test_figures_are_read_from_the_outputs_a_gpu_run_prints():
    bench = ("TARGET n=67108864 (16 tensors): our kernel at p=1.2 <= 1.0x torch fused AdamW and >= 90% of roofline: "
             "PASS (0.981x, 93.2%)\n")
    bench += ("SWEEP n=67108864 BLOCK=2048 num_warps=8: 0.700 ms  <- best\n"
              "SWEEP n=67108864 BLOCK=4096 num_warps=8: 0.744 ms  (current)\n")
    assert check.figures("bench_triton_adam_power", bench) == {
        "triton_p1.2_vs_torch_fused_adamw_n67108864": dict(ratio=0.981, roofline_pct=93.2, target="PASS"),
        "triton_sweep_best_n67108864": dict(block=2048, num_warps=8, ms=0.7)}
    megatron = ("ANCHOR case=bf16-distributed adam=AdamW (torch.optim.adamw, fused)\n"
                "RATIO adampower/adam step time: 1.013 (target <= 1.05 on CPU, <= 1.02 on GPU) case=bf16-distributed\n"
                "RATIO_INNER adampower/adam inner step: 0.870 case=bf16-distributed\n"
                "PEAK_EXTRA adampower=0.0 MiB adam=64.0 MiB largest_grad=256.0 MiB case=bf16-distributed\n")
    assert check.figures("bench_megatron_step", megatron) == {
        "megatron_step_ratio_bf16-distributed": 1.013, "megatron_inner_step_ratio_bf16-distributed": 0.87,
        "megatron_anchor_bf16-distributed": "AdamW (torch.optim.adamw, fused)",
        "megatron_peak_extra_mib_bf16-distributed": dict(adampower=0.0, adam=64.0, largest_grad=256.0)}
    deepspeed = "RATIO zero2 1.0040\nRATIO_ENGINE_STEP zero2 1.0100\nRATIO_OPTIMIZER_STEP zero2 0.9500\n"
    assert check.figures("bench_deepspeed_step", deepspeed) == {
        "deepspeed_train_step_ratio_zero2": 1.004, "deepspeed_engine_step_ratio_zero2": 1.01,
        "deepspeed_optimizer_step_ratio_zero2": 0.95}
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
    would_run = {line.split(" would run on a GPU: ")[0]: line.split(": ", 1)[1].split()
                 for line in proc.stdout.splitlines() if " would run on a GPU: " in line}
    assert sorted(would_run) == sorted(TEST_STEPS)
    compiled_kernel_test = "tests/test_triton_adam_power.py::test_kernel_compiled_on_cuda_matches_reference"
    assert compiled_kernel_test in would_run["kernel_tests"]
    assert figures["select"]["gpu_tests"] == {name: len(ids) for name, ids in would_run.items()}
    target_lines = [line for line in proc.stdout.splitlines() if line.startswith("TARGET ")]
    assert target_lines and all(line.endswith("not judged (dry run)") for line in target_lines), target_lines
    assert {t["figure"].split("_n")[0] for t in report["targets"]} >= {"triton_p1.2_vs_torch_fused_adamw"}
