"""The DeepSpeed step benchmark runs end to end at a tiny size on 2 ranks (so it cannot rot); no timing is asserted."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import JIT_ENV

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_deepspeed_step_smoke():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_deepspeed_step.py"), "--dim", "64", "--layers", "1",
         "--vocab", "256", "--seq", "16", "--warmup", "1", "--steps", "2", "--settings", "zero2", "zero2-offload",
         "zero2-muon"],
        # a generous limit: on first use DeepSpeed JIT-builds 3 ops (minutes on 2 cores) before the tiny run
        capture_output=True, text=True, timeout=900, env=dict(os.environ, **JIT_ENV),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for prefix in ("RATIO", "RATIO_OPTIMIZER_STEP"):
        for setting in ("zero2", "zero2-offload", "zero2-muon"):
            match = re.search(rf"^{prefix} {setting} (\S+)$", out.stdout, re.MULTILINE)
            assert match, f"no '{prefix} {setting}' line in:\n{out.stdout}"
            value = float(match.group(1))
            assert math.isfinite(value) and value > 0, match.group(0)
    for name in ("AdamPower (CPUAdamPower)", "AdamW (FusedAdam)", "AdamW (DeepSpeedCPUAdam)", "MuonPower (MuonPower)",
                 "Muon (MuonWithAuxAdam)", "torch", "deepspeed"):
        assert name in out.stdout, out.stdout
