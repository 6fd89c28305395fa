"""Kernels: the native CPU kernel (``native``), the Triton GPU kernel (``triton_adam_power``).

``CPUAdamPower`` (the optimizer on the native kernel, used on its own and by
ZeRO-Offload) is importable from here too; it is loaded on first access, since
it is built on the functional core, which itself uses these kernels.
"""

from .builder import NativeExtensionError
from .native import native_grad_power, resolve_isa

__all__ = ["CPUAdamPower", "NativeExtensionError", "native_grad_power", "resolve_isa"]


def __getattr__(name: str):
    if name == "CPUAdamPower":
        from .cpu_adam_power import CPUAdamPower

        return CPUAdamPower
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
