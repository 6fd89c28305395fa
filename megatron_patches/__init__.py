"""Megatron-core integration of AdamPower and MuonPower: ``OptimizerConfig(optimizer="adampower" | "muonpower", ...)``.

``apply()`` makes thin, reversible patches to megatron-core (a version in the tested range
``SUPPORTED_MEGATRON_CORE``; any other is refused with an error naming it), all
listed in ``megatron_patches.patches``, one module per patched area:
``megatron_patches.optimizer`` (AdamPower; see its docstring for the design),
``megatron_patches.checkpoint`` (fixes to the DistributedOptimizer's
checkpoints with torch's Adam, when TE/apex are absent) and, where Megatron-LM is
importable, ``megatron_patches.arguments``; ``remove()`` undoes them; both are
idempotent. Importing this package patches nothing.

    import megatron_patches
    megatron_patches.apply()
    config = OptimizerConfig(optimizer="adampower", gradpower_p=1.2, gradpower_p_expert=None, lr=3e-4, ...)
    optimizer = get_megatron_optimizer(config, model_chunks)
    # MuonPower: OptimizerConfig(optimizer="muonpower", gradpower_p=0.9) with get_megatron_muon_optimizer

GPAS in transformer layers is asked for per model, not by ``apply()``:
``apply_gpas(model)`` / ``remove_gpas(model)`` (``megatron_patches.gpas``), before
Megatron's DDP wraps the model. Where Megatron-LM is importable, apply() also lets its
``--optimizer`` accept ``adampower`` and ``muonpower`` and its optimizer config carry the ``--gradpower-p``
flags (see ``megatron_patches.arguments``); ``python -m megatron_patches.pretrain_gpt ARGS``
runs Megatron-LM's pretrain_gpt.py with the patches and the flags (``--gpas`` puts the
gates into the model its provider builds).
"""

from __future__ import annotations

from .gpas import GPASUnsupportedError, apply_gpas, remove_gpas
from .patches import MEGATRON_CORE, PATCHES, SUPPORTED_MEGATRON_CORE, UnsupportedMegatronError


def apply() -> None:
    """Lets megatron-core build AdamPower / MuonPower for ``OptimizerConfig(optimizer="adampower" | "muonpower")``
    (idempotent).

    Where Megatron-LM (``megatron.training``) is importable, also patches its ``--optimizer`` choices and
    ``get_megatron_optimizer_config`` (``megatron_patches.arguments``). The list: ``megatron_patches.patches``.
    """
    PATCHES.apply()


def remove() -> None:
    """Undoes apply(); a no-op when not applied."""
    PATCHES.remove()


def is_applied() -> bool:
    """Whether apply() is in effect."""
    return PATCHES.is_applied()


__all__ = ["GPASUnsupportedError", "MEGATRON_CORE", "PATCHES", "SUPPORTED_MEGATRON_CORE", "UnsupportedMegatronError", "apply",
           "apply_gpas", "is_applied", "remove", "remove_gpas"]
