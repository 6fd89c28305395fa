"""The prepared GPU check (tests/gpu/check.sh runs it): every CUDA test and benchmark in one call, within 9 minutes.

Steps, each a subprocess with its own time budget (seconds), in order of importance:

  environment          python, torch, triton, the device (nvidia-smi)
  install              the carried wheels (.whl/, from tests/gpu/fetch_wheels.sh) into a fresh private site dir,
                       offline, the native CPU kernel built in place, and DeepSpeed's FusedAdam JIT-built once (the
                       anchor of the DeepSpeed tests and benchmarks; built here, not inside a later step's budget)
  select               collects every test marked ``gpu`` (pytest -m gpu) and assigns each, by the prefix of its
                       name, to the step that runs it: test_kernel_* to kernel_tests, test_deepspeed_* to
                       deepspeed_tests, test_main_job_* to main_job_tests, test_megatron_* to megatron_tests; a GPU
                       test no step claims fails the check (nothing is dropped by a filter)
  kernel_tests         the kernel on CUDA: every path, the per-GPU gate, the compiled kernel against the reference
  bench_triton_adam_power       benchmarks/bench_triton_adam_power.py: ratio vs torch fused AdamW, % of the copy roofline
  deepspeed_tests      DeepSpeed on one GPU (ZeRO-2 bf16/fp16, ZeRO-3, ZeRO-2 offload; MuonPower)
  main_job_tests       a short run of the main job on the GPU, stop + resume
  megatron_tests       train_megatron with AdamPower and GPAS, resumed
  bench_megatron_step  benchmarks/bench_megatron_step.py: the AdamPower/Adam step ratio, peak extra memory
  bench_deepspeed_step benchmarks/bench_deepspeed_step.py --world-size 1: the train-step ratio

A step's status is passed, failed or timeout; on a GPU a skipped test fails its step (a CUDA test must
run there). The last lines print every performance target as PASS or FAIL (TARGETS below); a missed
target fails the check as a failed test does. It writes $OUT/gpu_report.json (device, each step's
status, seconds, budget, tests and figures, the targets, the verdict) and $OUT/gpu_check.log (the whole
output). Without CUDA, or with --dry-run, it is the CI dry run: the same steps in their CPU form (no
install; the selected GPU tests, printed by node id, skip; the benchmarks at tiny sizes on the CPU,
bench_triton_adam_power through Triton's interpreter; the targets printed, not judged), so the script
itself is tested on every submission.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
TOTAL_BUDGET = 540  # seconds: the check's 9 minutes on one H200 (the steps' budgets add up to it)
TEST_STEPS = {"kernel_": "kernel_tests", "deepspeed_": "deepspeed_tests", "main_job_": "main_job_tests",
              "megatron_": "megatron_tests"}  # a GPU test's name prefix (after test_) -> the step that runs it
TARGETS = (  # (figure name pattern, comparison, bound, what it is); every match is judged
    (r"triton_p1.2_vs_torch_fused_adamw_n\d+\.ratio", "<=", 1.00, "Triton AdamPower / torch fused AdamW"),
    (r"triton_p1.2_vs_torch_fused_adamw_n(6710886[4-9]|[1-9]\d{8,})\.roofline_pct", ">=", 90.0,
     "kernel-only % of the copy roofline at >= 64M elements"),
    (r"deepspeed_optimizer_step_ratio_.*", "<=", 1.05, "DeepSpeed optimizer.step AdamPower / FusedAdam"),
    (r"deepspeed_engine_step_ratio_.*", "<=", 1.02, "DeepSpeed engine.step AdamPower / FusedAdam"),
    (r"deepspeed_train_step_ratio_.*", "<=", 1.02, "DeepSpeed train step AdamPower / FusedAdam"),
    (r"megatron_step_ratio_.*", "<=", 1.02, "Megatron optimizer step AdamPower / fused Adam"),
)
DRY_RUN_SLACK = 5
LAUNCH_TIMEOUT = 60  # seconds one launched job (torchrun, deepspeed) may take in a GPU test


def steps(gpu: bool, site: str = "") -> list[dict]:
    """The check's steps: name, budget (s), and the command on the GPU or, in the dry run, on the CPU.

    site: where the carried wheels go. A test step's command is pytest over the node ids the select
    step assigns it (select_tests).
    """
    py = sys.executable
    tiny_megatron = ["--hidden", "64", "--layers", "2", "--vocab", "256", "--repeats", "2", "--warmup", "1",
                     "--dtype", "bf16"]
    tiny_deepspeed = ["--dim", "64", "--layers", "1", "--vocab", "256", "--seq", "16", "--warmup", "1", "--steps", "2",
                      "--settings", "zero2"]
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    install = ([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                "--upgrade", "--target", site, *wheels] if wheels else [py, "-c", "print('no wheels carried')"])

    def tests(name: str, budget: int) -> dict:  # its node ids come from the select step (run_tests)
        return dict(name=name, budget=budget, command=PYTEST, tests=True)

    return [
        dict(name="environment", budget=8, command=[py, "-c", ENVIRONMENT]),
        dict(name="install", budget=65, command=install if gpu else None,
             then=[[py, "setup.py", "-q", "build_ext", "--inplace"], [py, "-c", BUILD_FUSED_ADAM]] if gpu else [],
             dry=[py, "-c", "import deepspeed, megatron.core, triton; from gradpower_ds.ops import builder; "
                            "print('imports ok; native kernel', builder.load().__name__)"]),
        dict(name="select", budget=12, command=None, internal=True),
        tests("kernel_tests", 30),
        dict(name="bench_triton_adam_power", budget=35,
             command=[py, "benchmarks/bench_triton_adam_power.py", "--sizes", "1M", "64M", "512M", "--sweep"],
             dry=[py, "benchmarks/bench_triton_adam_power.py", "--interpret-smoke", "--sweep"]),
        tests("deepspeed_tests", 120),
        tests("main_job_tests", 100),
        tests("megatron_tests", 80),
        dict(name="bench_megatron_step", budget=20, command=[py, "benchmarks/bench_megatron_step.py", "--repeats", "10"],
             dry=[py, "benchmarks/bench_megatron_step.py", *tiny_megatron, "--threads", "1"]),
        dict(name="bench_deepspeed_step", budget=70,
             command=[py, "benchmarks/bench_deepspeed_step.py", "--world-size", "1", "--steps", "20"],
             dry=[py, "benchmarks/bench_deepspeed_step.py", "--world-size", "1", *tiny_deepspeed]),
    ]


def gpu_test_files() -> list[str]:
    """The test files that hold tests marked gpu (read, not imported)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def select_tests(env: dict, timeout: float) -> dict:
    """{step: [node ids]} for every test marked gpu, assigned by name prefix (TEST_STEPS); raises naming any
    GPU test that no step claims, or a collection that fails."""
    proc = subprocess.run([*PYTEST, "--collect-only", "-m", "gpu", *gpu_test_files()], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode != 0 or not ids:
        raise RuntimeError(f"collecting the GPU tests failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    selected: dict[str, list[str]] = {step: [] for step in TEST_STEPS.values()}
    unclaimed = []
    for node in ids:
        name = node.split("::")[-1].removeprefix("test_")
        step = next((s for prefix, s in TEST_STEPS.items() if name.startswith(prefix)), None)
        (selected[step] if step else unclaimed).append(node)
    if unclaimed:
        raise RuntimeError(f"GPU tests no step runs (name them test_<{'|'.join(TEST_STEPS)}>...): {unclaimed}")
    return selected


BUILD_FUSED_ADAM = "from deepspeed.ops.op_builder import FusedAdamBuilder; print(FusedAdamBuilder().load())"

ENVIRONMENT = """
import platform, subprocess, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda)
try:
    import triton; print('triton', triton.__version__)
except ImportError:
    print('triton: not installed')
print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device (dry run)')
if torch.cuda.is_available():
    print(subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True).stdout.strip())
"""


def figures(name: str, output: str) -> dict:
    """The numbers a step printed that the report keeps (ratios, targets, pytest counts, the device)."""
    found: dict = {}
    counts = re.findall(r"(\d+) (passed|failed|skipped|error|errors)", output)
    if counts:
        found["pytest"] = {kind: int(n) for n, kind in counts}
    if name == "environment":
        found["device"] = re.search(r"^device: (.*)$", output, re.M).group(1)
    for n, verdict, ratio, pct in re.findall(r"^TARGET n=(\d+)\b.*: (PASS|FAIL) \(([\d.]+)x, ([\d.]+)%\)", output, re.M):
        found[f"triton_p1.2_vs_torch_fused_adamw_n{n}"] = dict(ratio=float(ratio), roofline_pct=float(pct),
                                                               target=verdict)
    for n, block, warps, ms in re.findall(r"^SWEEP n=(\d+) BLOCK=(\d+) num_warps=(\d+): ([\d.]+) ms  <- best",
                                          output, re.M):
        found[f"triton_sweep_best_n{n}"] = dict(block=int(block), num_warps=int(warps), ms=float(ms))
    for ratio, case in re.findall(r"^RATIO adampower/adam step time: ([\d.]+) .* case=(\S+)", output, re.M):
        found[f"megatron_step_ratio_{case}"] = float(ratio)
    for ours, theirs, largest, case in re.findall(
            r"^PEAK_EXTRA adampower=([\d.]+) MiB adam=([\d.]+) MiB largest_grad=([\d.]+) MiB case=(\S+)", output, re.M):
        found[f"megatron_peak_extra_mib_{case}"] = dict(adampower=float(ours), adam=float(theirs),
                                                        largest_grad=float(largest))
    for kind, setting, ratio in re.findall(r"^RATIO(|_ENGINE_STEP|_OPTIMIZER_STEP) (\S+) ([\d.]+)$", output, re.M):
        found[f"deepspeed_{kind.split('_')[1].lower() if kind else 'train'}_step_ratio_{setting}"] = float(ratio)
    for ratio, case in re.findall(r"^RATIO_INNER adampower/adam inner step: ([\d.]+) case=(\S+)", output, re.M):
        found[f"megatron_inner_step_ratio_{case}"] = float(ratio)
    for case, anchor in re.findall(r"^ANCHOR case=(\S+) adam=(.+)$", output, re.M):
        found[f"megatron_anchor_{case}"] = anchor
    return found


def run_step(step: dict, gpu: bool, env: dict, log) -> dict:
    """Runs one step (and its follow-up command) under its budget; returns its report entry.

    The dry run allows DRY_RUN_SLACK times the budget: 2 CPU cores run the CPU forms, and may JIT-build
    DeepSpeed's CPU ops on first use.
    """
    commands = [step["command"], *step.get("then", [])] if gpu else [step.get("dry", step["command"])]
    commands = [c for c in commands if c]
    budget = step["budget"] if gpu else DRY_RUN_SLACK * step["budget"]
    entry = dict(name=step["name"], budget_s=budget, status="passed", figures={})
    start = time.monotonic()
    output = ""
    for command in commands:
        left = budget - (time.monotonic() - start)
        log.write(f"\n=== {step['name']}: {' '.join(command)}\n")
        log.flush()
        # its own process group, so a timeout also ends what it launched (ranks left behind would hold the GPU
        # through the later steps)
        with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) as proc:
            try:
                text, _ = proc.communicate(timeout=max(1, left))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                text, _ = proc.communicate()
                entry["status"] = "timeout"
        output += text
        log.write(text)
        if entry["status"] == "timeout":
            break
        if proc.returncode != 0:
            entry["status"] = "failed"
            entry["returncode"] = proc.returncode
            break
    entry["seconds"] = round(time.monotonic() - start, 1)
    entry["figures"] = figures(step["name"], output)
    ran = entry["figures"].get("pytest", {})
    if entry["status"] == "passed" and ran.get("skipped"):
        if gpu:  # a CUDA test that skips on a GPU did not test what it is for
            entry["status"] = "failed"
            entry["reason"] = f"{ran['skipped']} test(s) skipped on a GPU (see -rs in the tail)"
        elif not ran.get("passed") and not ran.get("failed"):
            entry["status"] = "skipped"  # the dry run: every GPU test skips without one
    entry["tail"] = output[-1500:]
    return entry


def judge_targets(steps_run: list[dict]) -> list[dict]:
    """Every figure a target applies to (TARGETS), with its verdict."""
    flat = {}
    for step in steps_run:
        for key, value in step["figures"].items():
            for field, number in (value.items() if isinstance(value, dict) else [("", value)]):
                if isinstance(number, (int, float)):
                    flat[f"{key}.{field}" if field else key] = number
    judged = []
    for pattern, comparison, bound, what in TARGETS:
        for key, value in sorted(flat.items()):
            if re.fullmatch(pattern, key):
                met = value <= bound if comparison == "<=" else value >= bound
                judged.append(dict(figure=key, value=value, target=f"{comparison} {bound}", what=what, met=met))
    return judged


def main(argv: list[str] | None = None) -> int:
    """Runs every step, writes the report; exit 0 when no step failed or timed out and, on a GPU, every
    performance target was met."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the CPU form of every step, even with a GPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"),
                        help="where gpu_report.json and gpu_check.log go (default: $OUT, else runs/gpu_check)")
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the gate's verdicts in a fresh directory, so the kernel tests check the kernel on this GPU
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHDYNAMO_DISABLE="1",
               GRADPOWER_CACHE_DIR=tempfile.mkdtemp(prefix="gradpower_gate_"))
    env.pop("GRADPOWER_TRITON", None)
    site = ""
    if gpu:  # the carried wheels and the in-place native build, for every step and its subprocesses
        site = tempfile.mkdtemp(prefix="gradpower_site_")  # private (0700), a new name each run
        env["PYTHONPATH"] = os.pathsep.join([site, str(ROOT), env.get("PYTHONPATH", "")])
        env.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="gradpower_torch_ext_"))
        # DeepSpeed 0.19.8's JIT builder cannot parse arch suffixes ("9.0a" -> ValueError: '0a'), which the GPU
        # image's TORCH_CUDA_ARCH_LIST may carry: build DeepSpeed's ops for this device's plain capability
        env["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())
        # a launched job's test fails with its output, inside the step's budget, instead of the step timing out
        env["GRADPOWER_TEST_LAUNCH_TIMEOUT"] = str(LAUNCH_TIMEOUT)
        print(f"TORCH_CUDA_ARCH_LIST was {os.environ.get('TORCH_CUDA_ARCH_LIST')!r}; the steps use "
              f"{env['TORCH_CUDA_ARCH_LIST']!r}", flush=True)
    report = dict(mode="gpu" if gpu else "dry run (CPU)", started=time.strftime("%Y-%m-%d %H:%M:%S"),
                  total_budget_s=TOTAL_BUDGET, steps=[])
    selected: dict = {}
    with open(out / "gpu_check.log", "w") as log:
        for step in steps(gpu, site):
            if step.get("internal"):
                entry = run_selection(step, gpu, env, selected)
            elif step.get("tests") and not selected.get(step["name"]):
                entry = dict(name=step["name"], budget_s=step["budget"], status="failed", seconds=0.0, figures={},
                             reason="no tests selected for it (the select step failed or found none)")
            else:
                if step.get("tests"):
                    step = dict(step, command=step["command"] + selected[step["name"]])
                    if not gpu:
                        print(f"{step['name']} would run on a GPU: {' '.join(selected[step['name']])}", flush=True)
                entry = run_step(step, gpu, env, log)
            report["steps"].append(entry)
            print(f"{entry['name']:<22} {entry['status']:<8} {entry['seconds']:6.1f} s (budget {entry['budget_s']}) "
                  f"{json.dumps(entry['figures'])}", flush=True)
    report["device"] = report["steps"][0]["figures"].get("device")
    report["seconds"] = round(sum(s["seconds"] for s in report["steps"]), 1)
    report["targets"] = judge_targets(report["steps"])
    tests_passed = all(s["status"] in ("passed", "skipped") for s in report["steps"])
    missed = [t for t in report["targets"] if not t["met"]]
    report["passed"] = tests_passed and (not gpu or not missed)
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1))
    for target in report["targets"]:
        verdict = ("PASS" if target["met"] else "FAIL") if gpu else "not judged (dry run)"
        print(f"TARGET {target['what']}: {target['figure']} = {target['value']:g} (target {target['target']}): "
              f"{verdict}")
    failed = [s["name"] for s in report["steps"] if s["status"] not in ("passed", "skipped")]
    why = "; ".join(filter(None, [f"failed steps: {', '.join(failed)}" if failed else "",
                                  f"{len(missed)} performance target(s) missed" if gpu and missed else ""]))
    print(f"{report['mode']} on {report['device']}: {'PASSED' if report['passed'] else 'FAILED: ' + why} in "
          f"{report['seconds']} s (budget {TOTAL_BUDGET} s); report {out / 'gpu_report.json'}")
    return 0 if report["passed"] else 1


def run_selection(step: dict, gpu: bool, env: dict, selected: dict) -> dict:
    """The select step: fills `selected` (step -> node ids) for the test steps after it."""
    budget = step["budget"] if gpu else DRY_RUN_SLACK * step["budget"]
    entry = dict(name=step["name"], budget_s=budget, status="passed", figures={})
    start = time.monotonic()
    try:
        selected.update(select_tests(env, budget))
        entry["figures"] = {"gpu_tests": {name: len(ids) for name, ids in selected.items()}}
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        entry.update(status="failed", reason=str(error)[-3000:])
        print(entry["reason"], flush=True)
    entry["seconds"] = round(time.monotonic() - start, 1)
    return entry


if __name__ == "__main__":
    sys.exit(main())
