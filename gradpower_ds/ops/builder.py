"""The one description of how the native CPU kernel is built and loaded.

`setup.py` builds it at install time from `extension()`, stamping it with
`source_hash()` of the sources it compiled. If the compiled module is missing at
run time (e.g. a source checkout on PYTHONPATH), or was built from other
sources than those beside this file (a stale in-place build after an edit of
gradpower_ds/csrc), `load()` builds the sources just in time with the same
flags through torch.utils.cpp_extension (cached under $TORCH_EXTENSIONS_DIR,
by default ~/.cache/torch_extensions), unless GRADPOWER_NO_JIT=1. No `-march`
flag is used: the library is baseline x86-64 and picks AVX-512 / AVX2 / scalar
code at run time.

This module imports neither torch nor the package, so setup.py can load it.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from pathlib import Path

MODULE = "gradpower_ds._native_adam_power"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ["native_adam_power.cpp"]
# -ffp-contract=off: the kernel spells out each rounding, in torch.optim.AdamW's order.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-Wno-psabi"]
LINK_FLAGS = ["-fopenmp"]

_log = logging.getLogger(__name__)
_module = None


class NativeExtensionError(RuntimeError):
    """The native CPU kernel is neither installed nor buildable here."""


def source_hash() -> str | None:
    """A digest of the kernel's sources (csrc/*.cpp, *.h), or None where they are not beside this file."""
    files = sorted([*CSRC.glob("*.cpp"), *CSRC.glob("*.h")])
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def extension():
    """Returns the pybind11 Extension that setup.py compiles (sources relative to the repo root)."""
    from pybind11.setup_helpers import Pybind11Extension

    return Pybind11Extension(
        MODULE,
        [f"gradpower_ds/csrc/{s}" for s in SOURCES],
        include_dirs=["gradpower_ds/csrc"],
        define_macros=[("GP_SOURCE_HASH", f'"{source_hash()}"')],
        extra_compile_args=CXX_FLAGS,
        extra_link_args=LINK_FLAGS,
        cxx_std=17,
    )


def _jit_build(reason: str):
    from torch.utils.cpp_extension import load as torch_load

    _log.warning("gradpower_ds: the installed native CPU kernel is %s; using a just-in-time build of the sources "
                 "instead (built once per source version, ~20 s on 2 cores; `pip install .` installs it)", reason)
    return torch_load(
        name="gradpower_ds_native_adam_power",
        sources=[str(CSRC / s) for s in SOURCES],
        extra_include_paths=[str(CSRC)],
        extra_cflags=CXX_FLAGS,
        extra_ldflags=LINK_FLAGS,
        verbose=False,
    )


def _installed():
    """(the installed module, None) if it was built from the sources beside this file, else (None, why not)."""
    try:
        module = importlib.import_module(MODULE)
    except ImportError as error:
        return None, f"not built ({error})"
    expected = source_hash()
    if expected is not None and getattr(module, "SOURCE_HASH", None) != expected:
        return None, f"stale ({module.__file__} was built from other sources than those in {CSRC})"
    return module, None


def load():
    """Returns the native module: the installed build of these sources, else a just-in-time build.

    Raises NativeExtensionError, saying what to do, when neither is possible.
    """
    global _module
    if _module is not None:
        return _module
    module, reason = _installed()
    if module is not None:
        _module = module
        return _module
    if os.environ.get("GRADPOWER_NO_JIT") == "1":
        raise NativeExtensionError(
            f"gradpower_ds: the native CPU kernel ({MODULE}) is {reason}. "
            "Install the package with `pip install .` (needs g++ with OpenMP), or unset "
            "GRADPOWER_NO_JIT to build it on first use."
        )
    try:
        _module = _jit_build(reason)
    except Exception as build_error:  # compiler missing, no OpenMP, ...
        raise NativeExtensionError(
            f"gradpower_ds: the installed native CPU kernel is {reason} and building it failed: "
            f"{build_error}. It needs a C++17 compiler with OpenMP (e.g. `apt-get install g++`); "
            "then reinstall with `pip install .`. The pure-PyTorch optimizer "
            "gradpower_ds.AdamPower computes the same update without it."
        ) from build_error
    return _module
