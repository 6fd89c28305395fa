"""Kernels: the native CPU kernel (``native``), the Triton GPU kernel (``triton_adam_power``).

Kernels only: the optimizers built on them (``gradpower_ds.AdamPower``,
``gradpower_ds.CPUAdamPower``) live one level up and import these, never the reverse.
"""

from .builder import NativeExtensionError
from .native_adam_power import resolve_isa

__all__ = ["NativeExtensionError", "resolve_isa"]
