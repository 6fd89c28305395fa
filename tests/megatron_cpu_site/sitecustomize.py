"""Test-only: installs tests/megatron_cpu_shim.py at interpreter start in launched ranks.

Tests that launch the product's own commands (``torchrun -m megatron_patches.pretrain_moe``,
``launch/megatron_moe.sh``) on this CPU-only machine put this directory on PYTHONPATH and set
GRADPOWER_MEGATRON_CPU_SHIM=1. Python imports ``sitecustomize`` on start-up, so every rank
(a process with LOCAL_RANK set by torchrun; not the launcher itself) gets the shim before
megatron-core is imported, and the commands under test stay exactly what a user runs.
"""

import os
import sys

if os.environ.get("GRADPOWER_MEGATRON_CPU_SHIM") == "1" and "LOCAL_RANK" in os.environ:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
    import megatron_cpu_shim

    megatron_cpu_shim.install()
    del sys.path[0]
