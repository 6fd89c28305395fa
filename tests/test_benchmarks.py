"""The benchmark scripts run end to end at a tiny size (so they cannot rot); no timing is asserted."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_cpu_step_smoke():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_cpu_step.py"), "--sizes", "4099", "--threads", "1",
         "--repeats", "1", "--skip-deepspeed"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("roofline (probe)", "ours p=1.2", "ours p=1", "torch_adamw_fused", "naive p=1.2"):
        assert name in out.stdout, out.stdout
