"""GPAS gates train under DeepSpeed ZeRO-2 and ZeRO-3 on 2 processes (gloo), gates kept in sync across ranks."""

import json
from pathlib import Path

import pytest

from conftest import torchrun

JOB = Path(__file__).parent / "jobs" / "ds_gpas_steps.py"


@pytest.mark.slow
def test_gates_under_zero2_and_zero3(tmp_path):
    out = tmp_path / "result"
    torchrun(JOB, out, timeout=600)
    rows = [json.loads(line) for rank in (0, 1) for line in Path(f"{out}.{rank}").read_text().splitlines()]
    for stage in (2, 3):
        r0, r1 = [r for r in rows if r["stage"] == stage]
        assert all(abs(v) > 0 for v in r0["gates"]), "the gates must have trained"
        assert r0["gates"] == r1["gates"], "gates must stay identical across ranks"
        assert all(l == l and l < 10 for l in r0["losses"] + r1["losses"])
        assert [g["wd"] for g in r0["groups"]] == [0.1, 0.0], "gates go to the group without weight decay"
