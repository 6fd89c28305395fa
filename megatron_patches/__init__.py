"""Megatron-core integration of AdamPower: ``OptimizerConfig(optimizer="adampower", gradpower_p=1.2)``.

``apply()`` makes thin, reversible patches to megatron-core (the version in
``SUPPORTED_MEGATRON_CORE``; any other is refused with an error naming it), one
module per patched area: ``megatron_patches.optimizer`` (AdamPower; see its
docstring for the design), ``megatron_patches.checkpoint`` (two fixes to the
DistributedOptimizer's checkpoints with torch's Adam, when TE/apex are absent)
and, where Megatron-LM is importable, ``megatron_patches.arguments``;
``remove()`` undoes them; both are idempotent. Importing this package patches
nothing.

    import megatron_patches
    megatron_patches.apply()
    config = OptimizerConfig(optimizer="adampower", gradpower_p=1.2, gradpower_p_expert=None, lr=3e-4, ...)
    optimizer = get_megatron_optimizer(config, model_chunks)

GPAS in transformer layers is asked for per model, not by ``apply()``:
``apply_gpas(model)`` / ``remove_gpas(model)`` (``megatron_patches.gpas``), before
Megatron's DDP wraps the model. Where Megatron-LM is importable, apply() also lets its
``--optimizer`` accept ``adampower`` and its optimizer config carry the ``--gradpower-p``
flags (see ``megatron_patches.arguments``); ``python -m megatron_patches.pretrain_gpt ARGS``
runs Megatron-LM's pretrain_gpt.py with the patches and the flags (``--gpas`` puts the
gates into the model its provider builds).
"""

from __future__ import annotations

SUPPORTED_MEGATRON_CORE = "0.16.1"

_originals: dict = {}  # (owner, attribute) -> what apply() replaced; empty when not applied


class UnsupportedMegatronError(RuntimeError):
    """The installed megatron-core is not the version these patches were written and tested for."""


def apply_gpas(model_or_layers, act: str = "silu", learnable: bool = True) -> list:
    """GPAS gates in a megatron-core model's TransformerLayers (see megatron_patches.gpas)."""
    from .gpas import apply_gpas as enable

    return enable(model_or_layers, act=act, learnable=learnable)


def remove_gpas(model_or_layers) -> list:
    """Undoes apply_gpas (see megatron_patches.gpas)."""
    from .gpas import remove_gpas as disable

    return disable(model_or_layers)


def check_megatron_version() -> None:
    """Raises UnsupportedMegatronError unless the installed megatron-core is SUPPORTED_MEGATRON_CORE."""
    import megatron.core

    if megatron.core.__version__ != SUPPORTED_MEGATRON_CORE:
        raise UnsupportedMegatronError(
            f"megatron_patches supports megatron-core {SUPPORTED_MEGATRON_CORE} only (it patches its optimizer "
            f"construction), but megatron-core {megatron.core.__version__} is installed: pip install "
            f"megatron-core=={SUPPORTED_MEGATRON_CORE}")


def is_applied() -> bool:
    """Whether apply() is in effect."""
    return bool(_originals)


def apply() -> None:
    """Lets megatron-core build AdamPower for ``OptimizerConfig(optimizer="adampower")`` (idempotent).

    Where Megatron-LM (``megatron.training``) is importable, also patches its ``--optimizer`` choices and
    ``get_megatron_optimizer_config`` (``megatron_patches.arguments``).
    """
    if is_applied():
        return
    check_megatron_version()
    from . import arguments, checkpoint, optimizer

    config_class = optimizer._config_class()
    for owner, name, wrap in optimizer._patch_targets() + checkpoint._patch_targets() + arguments._patch_targets():
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        _originals[(owner, name)] = original
        setattr(owner, name, wrap(original))
    for name, default in optimizer.FIELDS.items():  # configs built before apply() read the defaults
        _originals[(config_class, name)] = None
        setattr(config_class, name, default)


def remove() -> None:
    """Undoes apply(); a no-op when not applied."""
    for (owner, name), original in _originals.items():
        if original is None:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _originals.clear()


__all__ = ["SUPPORTED_MEGATRON_CORE", "UnsupportedMegatronError", "apply", "check_megatron_version", "remove_gpas",
           "apply_gpas", "is_applied", "remove"]
