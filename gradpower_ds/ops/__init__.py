"""Native (C++) kernels: the fused CPU AdamPower used on its own and by ZeRO-Offload."""

from .builder import NativeExtensionError
from .cpu_adam_power import CPUAdamPower, native_grad_power, resolve_isa

__all__ = ["CPUAdamPower", "NativeExtensionError", "native_grad_power", "resolve_isa"]
