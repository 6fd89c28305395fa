"""Test-only: installs tests/megatron_cpu_shim.py at interpreter start in launched ranks.

Tests that launch the product's own commands (``torchrun -m gradpower_ds.jobs.train_megatron``,
``launch/megatron_moe.sh``) on this CPU-only machine put this directory on PYTHONPATH and set
GRADPOWER_MEGATRON_CPU_SHIM=1. Python imports ``sitecustomize`` on start-up, so every rank
(a process with LOCAL_RANK set by torchrun; not the launcher itself) gets the shim before
megatron-core is imported, and the commands under test stay exactly what a user runs.

With GRADPOWER_TEST_GATE_GRADS=FOLDER as well, each rank also records its GPAS gates' gradients as
megatron DDP accumulated them (``main_grad``, before ``finalize_model_grads`` reduces them), one JSON
line per step (a list per gate) in FOLDER/gate_grads_rank{RANK}.jsonl: an observation of the command,
which itself is unchanged.
"""

import os
import sys


def record_gate_grads(folder: str) -> None:
    """Wraps megatron.core.distributed.finalize_model_grads (looked up by the job when it trains) to record the
    gates' local gradients first."""
    import json

    import megatron.core.distributed as megatron_ddp

    from gradpower_ds.gpas import gate_parameters

    original = megatron_ddp.finalize_model_grads
    path = os.path.join(folder, f"gate_grads_rank{os.environ.get('RANK', '0')}.jsonl")

    def finalize_model_grads(model, *args, **kwargs):
        grads = [p.main_grad.float().flatten().tolist() for chunk in model for p in gate_parameters(chunk)]
        with open(path, "a") as f:
            f.write(json.dumps(grads) + "\n")
        return original(model, *args, **kwargs)

    megatron_ddp.finalize_model_grads = finalize_model_grads


if os.environ.get("GRADPOWER_MEGATRON_CPU_SHIM") == "1" and "LOCAL_RANK" in os.environ:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
    import megatron_cpu_shim

    megatron_cpu_shim.install()
    del sys.path[0]
    if os.environ.get("GRADPOWER_TEST_GATE_GRADS"):
        record_gate_grads(os.environ["GRADPOWER_TEST_GATE_GRADS"])
