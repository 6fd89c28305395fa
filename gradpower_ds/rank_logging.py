"""INFO messages of gradpower-ds's loggers on rank 0 only: what every entry point turns on.

The jobs (gradpower_ds.jobs), the runner and Megatron-LM's entry (``python -m
megatron_patches.pretrain_gpt``) call ``enable_rank0_logging`` so that a run's log shows, once,
what was registered and which optimizer was built (e.g. "megatron_patches: AdamPower
(gradpower_p=1.2, ...) on DistributedOptimizer"), whatever level the training script or
framework set on the root logger.
"""

from __future__ import annotations

import logging
import os


def enable_rank0_logging(name: str = "gradpower_ds") -> None:
    """Shows INFO messages of logger `name` and its children (registration, the optimizer DeepSpeed built,
    training progress) on rank 0 only.

    Other ranks show warnings only. Adds one handler to that logger (none when it already has one) and
    stops propagation, so a root handler the script sets up prints nothing twice.
    """
    logger = logging.getLogger(name)
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
