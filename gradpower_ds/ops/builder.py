"""The one description of how the native CPU kernel is built and loaded.

`setup.py` builds it at install time from `extension()`; if the compiled module
is missing at run time (e.g. a source checkout on PYTHONPATH), `load()` builds
it just in time with the same sources and flags through
torch.utils.cpp_extension (cached under ~/.cache/torch_extensions), unless
GRADPOWER_NO_JIT=1. No `-march` flag is used: the library is baseline x86-64
and picks AVX-512 / AVX2 / scalar code at run time.

This module imports neither torch nor the package, so setup.py can load it.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

MODULE = "gradpower_ds._cpu_adam_power"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ["cpu_adam_power.cpp"]
# -ffp-contract=off: the kernel spells out each rounding, in torch.optim.AdamW's order.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wno-psabi"]
LINK_FLAGS = ["-fopenmp"]

_log = logging.getLogger(__name__)
_module = None


class NativeExtensionError(RuntimeError):
    """The native CPU kernel is neither installed nor buildable here."""


def extension():
    """Returns the pybind11 Extension that setup.py compiles (sources relative to the repo root)."""
    from pybind11.setup_helpers import Pybind11Extension

    return Pybind11Extension(
        MODULE,
        [f"gradpower_ds/csrc/{s}" for s in SOURCES],
        include_dirs=["gradpower_ds/csrc"],
        extra_compile_args=CXX_FLAGS,
        extra_link_args=LINK_FLAGS,
        cxx_std=17,
    )


def _jit_build():
    from torch.utils.cpp_extension import load as torch_load

    _log.warning("gradpower_ds: native CPU kernel not installed; building it now (one time, ~10 s)")
    return torch_load(
        name="gradpower_ds_cpu_adam_power",
        sources=[str(CSRC / s) for s in SOURCES],
        extra_include_paths=[str(CSRC)],
        extra_cflags=CXX_FLAGS,
        extra_ldflags=LINK_FLAGS,
        verbose=False,
    )


def load():
    """Returns the native module: the installed build, else a just-in-time build.

    Raises NativeExtensionError, saying what to do, when neither is possible.
    """
    global _module
    if _module is not None:
        return _module
    try:
        _module = importlib.import_module(MODULE)
        return _module
    except ImportError as installed_error:
        if os.environ.get("GRADPOWER_NO_JIT") == "1":
            raise NativeExtensionError(
                f"gradpower_ds: the native CPU kernel ({MODULE}) is not built ({installed_error}). "
                "Install the package with `pip install .` (needs g++ with OpenMP), or unset "
                "GRADPOWER_NO_JIT to build it on first use."
            ) from installed_error
    try:
        _module = _jit_build()
    except Exception as build_error:  # compiler missing, no OpenMP, ...
        raise NativeExtensionError(
            "gradpower_ds: the native CPU kernel is not installed and building it failed: "
            f"{build_error}. It needs a C++17 compiler with OpenMP (e.g. `apt-get install g++`); "
            "then reinstall with `pip install .`. The pure-PyTorch optimizer "
            "gradpower_ds.AdamPower computes the same update without it."
        ) from build_error
    return _module
