"""The main job's precision, and what "auto" picks: the fast one on this machine.

bf16 is fast on GPUs and on CPUs with native bf16 instructions (AVX512_BF16 or AMX); on other
CPUs (e.g. AVX2-only AMD EPYC Rome/Milan hosts) torch emulates bf16 matmuls, about 50x slower
than fp32 (measured on a 2-core AMD EPYC Zen 3: 152 ms against 2.9 ms for a 1024x128 by 128x512
product), so "auto" picks fp32 there. An explicit "bf16" is honoured, with a warning saying so.
"""

from __future__ import annotations

import torch

AUTO = "auto"
PRECISIONS = (AUTO, "bf16", "fp32", "fp16")
NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16")  # torch.cpu.get_capabilities() keys


def native_bf16_features(capabilities: dict | None = None) -> list[str]:
    """The CPU's native-bf16 features (from torch.cpu.get_capabilities(), or `capabilities`); [] where none."""
    caps = torch.cpu.get_capabilities() if capabilities is None else capabilities
    return [name for name in NATIVE_BF16_FEATURES if caps.get(name)]


def resolve_precision(requested: str, cuda: bool | None = None, capabilities: dict | None = None) -> tuple[str, str]:
    """(precision, why): `requested` itself unless it is "auto", which means bf16 on a GPU or on a CPU with
    native bf16, else fp32. `cuda`/`capabilities` default to this machine's (given in tests)."""
    if requested != AUTO:
        return requested, "as configured"
    if torch.cuda.is_available() if cuda is None else cuda:
        return "bf16", "auto: bf16 on GPUs"
    features = native_bf16_features(capabilities)
    if features:
        return "bf16", f"auto: this CPU has native bf16 ({', '.join(features)})"
    return "fp32", ("auto: fp32, as this CPU has no native bf16 (no avx512_bf16 or AMX), where bf16 matmuls are "
                    "emulated, about 50x slower")


def slow_bf16_warning(precision: str, cuda: bool | None = None, capabilities: dict | None = None) -> str | None:
    """The warning for bf16 asked for on a CPU without native bf16 (None when it is not the case)."""
    on_gpu = torch.cuda.is_available() if cuda is None else cuda
    if precision != "bf16" or on_gpu or native_bf16_features(capabilities):
        return None
    return ("precision bf16 on a CPU without native bf16 (no avx512_bf16 or AMX): torch emulates bf16 matmuls "
            "there, about 50x slower than fp32 (measured on an AMD EPYC Zen 3: 152 ms against 2.9 ms for a "
            "1024x128 by 128x512 product). Set precision to auto (the default) or fp32 to train at fp32 speed")
