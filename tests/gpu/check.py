"""The prepared GPU check (tests/gpu/check.sh runs it): every GPU path in one call, within 8 minutes on one H100.

Steps, each a subprocess with its own time budget (seconds), in order of importance:

  environment          python, torch, triton, the device (nvidia-smi)
  install              the carried wheels (.whl/, from tests/gpu/fetch_wheels.sh) into /tmp/site, offline,
                       the native CPU kernel built in place, and DeepSpeed's FusedAdam JIT-built once (the
                       anchor of the DeepSpeed tests and benchmarks; built here, not inside a later step's budget)
  kernel_tests         tests/test_gpu.py -k kernel and the compiled-kernel test of test_triton_adam_power.py
  bench_triton_adam_power       benchmarks/bench_triton_adam_power.py at 64M and 512M elements: ratio vs torch fused AdamW,
                       % of the copy roofline
  deepspeed_tests      tests/test_gpu.py -k deepspeed (ZeRO-2 bf16/fp16, ZeRO-3, ZeRO-2 offload on one GPU)
  main_job_tests       tests/test_gpu.py -k main_job (a short run on the GPU, stop + resume)
  megatron_tests       tests/test_gpu.py -k megatron_pretrain (train_megatron with AdamPower and GPAS, resumed)
  bench_megatron_step  benchmarks/bench_megatron_step.py: the AdamPower/Adam step ratio, peak extra memory
  bench_deepspeed_step benchmarks/bench_deepspeed_step.py --world-size 1: the train-step ratio

Not in it, for want of time in its 8 minutes: tests/test_gpu.py -k muon (MuonPower on one GPU, about 35 s;
run it by itself when the check leaves device time).

It writes $OUT/gpu_report.json (device, each step's status, seconds, budget and figures, the verdict)
and $OUT/gpu_check.log (the whole output). Without CUDA, or with --dry-run, it is the CI dry run: the
same steps in their CPU form (no install; the GPU tests skip cleanly; the benchmarks at tiny sizes on
the CPU, bench_triton_adam_power through Triton's interpreter), so the script itself is tested on every
submission. A step's status is passed, failed, timeout, or skipped (pytest ran no test: no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SITE = "/tmp/site"  # where the carried wheels are installed on the GPU machine
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
TOTAL_BUDGET = 480  # seconds: the check's 8 minutes on one H100 (the steps' budgets add up to it)
DRY_RUN_SLACK = 5
LAUNCH_TIMEOUT = 60  # seconds one launched job (torchrun, deepspeed) may take in a GPU test


def steps(gpu: bool) -> list[dict]:
    """The check's steps: name, budget (s), and the command on the GPU or, in the dry run, on the CPU."""
    py = sys.executable
    tiny_megatron = ["--hidden", "64", "--layers", "2", "--vocab", "256", "--repeats", "2", "--warmup", "1",
                     "--dtype", "bf16"]
    tiny_deepspeed = ["--dim", "64", "--layers", "1", "--vocab", "256", "--seq", "16", "--warmup", "1", "--steps", "2",
                      "--settings", "zero2"]
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    install = ([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                "--upgrade", "--target", SITE, *wheels] if wheels else [py, "-c", "print('no wheels carried')"])
    return [
        dict(name="environment", budget=8, command=[py, "-c", ENVIRONMENT]),
        dict(name="install", budget=65, command=install if gpu else None,
             then=[[py, "setup.py", "-q", "build_ext", "--inplace"], [py, "-c", BUILD_FUSED_ADAM]] if gpu else [],
             dry=[py, "-c", "import deepspeed, megatron.core, triton; from gradpower_ds.ops import builder; "
                            "print('imports ok; native kernel', builder.load().__name__)"]),
        dict(name="kernel_tests", budget=25, command=PYTEST + ["tests/test_gpu.py", "-k", "kernel",
                                                              "tests/test_triton_adam_power.py::test_cuda_matches_reference"]),
        dict(name="bench_triton_adam_power", budget=20, command=[py, "benchmarks/bench_triton_adam_power.py", "--sizes", "64M", "512M"],
             dry=[py, "benchmarks/bench_triton_adam_power.py", "--interpret-smoke"]),
        dict(name="deepspeed_tests", budget=85, command=PYTEST + ["tests/test_gpu.py", "-k", "deepspeed and not muon"]),
        dict(name="main_job_tests", budget=115, command=PYTEST + ["tests/test_gpu.py", "-k", "main_job"]),
        dict(name="megatron_tests", budget=85, command=PYTEST + ["tests/test_gpu.py", "-k", "megatron_pretrain"]),
        dict(name="bench_megatron_step", budget=20, command=[py, "benchmarks/bench_megatron_step.py", "--repeats", "10"],
             dry=[py, "benchmarks/bench_megatron_step.py", *tiny_megatron, "--threads", "1"]),
        dict(name="bench_deepspeed_step", budget=57,
             command=[py, "benchmarks/bench_deepspeed_step.py", "--world-size", "1", "--steps", "20"],
             dry=[py, "benchmarks/bench_deepspeed_step.py", "--world-size", "1", *tiny_deepspeed]),
    ]


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
    for n, verdict, ratio, pct in re.findall(r"^TARGET n=(\d+): .*: (PASS|FAIL) \(([\d.]+)x, ([\d.]+)%\)", output, re.M):
        found[f"triton_p1.2_vs_torch_fused_adamw_n{n}"] = dict(ratio=float(ratio), roofline_pct=float(pct),
                                                               target=verdict)
    for ratio, case in re.findall(r"^RATIO adampower/adam step time: ([\d.]+) .* case=(\S+)", output, re.M):
        found[f"megatron_step_ratio_{case}"] = float(ratio)
    for ours, theirs, largest, case in re.findall(
            r"^PEAK_EXTRA adampower=([\d.]+) MiB adam=([\d.]+) MiB largest_grad=([\d.]+) MiB case=(\S+)", output, re.M):
        found[f"megatron_peak_extra_mib_{case}"] = dict(adampower=float(ours), adam=float(theirs),
                                                        largest_grad=float(largest))
    for kind, setting, ratio in re.findall(r"^(RATIO|RATIO_OPTIMIZER_STEP) (\S+) ([\d.]+)$", output, re.M):
        found[f"deepspeed_{'train' if kind == 'RATIO' else 'optimizer'}_step_ratio_{setting}"] = float(ratio)
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
    if entry["status"] == "passed" and ran and not ran.get("passed") and not ran.get("failed"):
        entry["status"] = "skipped"  # pytest collected only GPU tests and skipped them: no GPU
    entry["tail"] = output[-1500:]
    return entry


def main(argv: list[str] | None = None) -> int:
    """Runs every step, writes the report; exit 0 when no step failed or timed out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the CPU form of every step, even with a GPU")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"),
                        help="where gpu_report.json and gpu_check.log go (default: $OUT, else runs/gpu_check)")
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHDYNAMO_DISABLE="1")
    if gpu:  # the carried wheels and the in-place native build, for every step and its subprocesses
        env["PYTHONPATH"] = os.pathsep.join([SITE, str(ROOT), env.get("PYTHONPATH", "")])
        env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/torch_extensions")
        # DeepSpeed 0.19.8's JIT builder cannot parse arch suffixes ("9.0a" -> ValueError: '0a'), which the GPU
        # image's TORCH_CUDA_ARCH_LIST may carry: build DeepSpeed's ops for this device's plain capability
        env["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())
        # a launched job's test fails with its output, inside the step's budget, instead of the step timing out
        env["GRADPOWER_TEST_LAUNCH_TIMEOUT"] = str(LAUNCH_TIMEOUT)
        print(f"TORCH_CUDA_ARCH_LIST was {os.environ.get('TORCH_CUDA_ARCH_LIST')!r}; the steps use "
              f"{env['TORCH_CUDA_ARCH_LIST']!r}", flush=True)
    report = dict(mode="gpu" if gpu else "dry run (CPU)", started=time.strftime("%Y-%m-%d %H:%M:%S"),
                  total_budget_s=TOTAL_BUDGET, steps=[])
    with open(out / "gpu_check.log", "w") as log:
        for step in steps(gpu):
            entry = run_step(step, gpu, env, log)
            report["steps"].append(entry)
            print(f"{entry['name']:<22} {entry['status']:<8} {entry['seconds']:6.1f} s (budget {entry['budget_s']}) "
                  f"{json.dumps(entry['figures'])}", flush=True)
    report["device"] = report["steps"][0]["figures"].get("device")
    report["seconds"] = round(sum(s["seconds"] for s in report["steps"]), 1)
    report["passed"] = all(s["status"] in ("passed", "skipped") for s in report["steps"])
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1))
    print(f"{report['mode']} on {report['device']}: {'PASSED' if report['passed'] else 'FAILED'} in "
          f"{report['seconds']} s (budget {TOTAL_BUDGET} s); report {out / 'gpu_report.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
