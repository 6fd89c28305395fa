"""Build script: the Python packages plus the native CPU kernel (pybind11, OpenMP).

The kernel's sources and flags live in gradpower_ds/ops/builder.py, shared with
the just-in-time build, the tested DeepSpeed/megatron-core ranges (the extras)
in gradpower_ds/versions.py, and the jobs wing's dependencies (the "jobs" extra)
in gradpower_ds/jobs/__init__.py; they are loaded here by path so that building
needs neither torch nor the package itself.
"""

import importlib.util
from pathlib import Path

from pybind11.setup_helpers import build_ext
from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    """A module of the package loaded by path (no imports of the package or torch)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builder = _load("_gp_builder", ROOT / "gradpower_ds" / "ops" / "builder.py")
versions = _load("_gp_versions", ROOT / "gradpower_ds" / "versions.py")
jobs = _load("_gp_jobs", ROOT / "gradpower_ds" / "jobs" / "__init__.py")

setup(
    name="gradpower-ds",
    version=versions.VERSION,
    description="GradPower/AdamPower and GPAS for DeepSpeed and Megatron-core pretraining",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gradpower_ds", "gradpower_ds.*", "megatron_patches", "megatron_patches.*"]),
    package_data={"gradpower_ds": ["csrc/*.h", "csrc/*.cpp"], "gradpower_ds.jobs": ["p_vs_batch.json"]},
    ext_modules=[builder.extension()],
    cmdclass={"build_ext": build_ext},
    # Ranges, never pins: installing gradpower-ds keeps the torch, DeepSpeed and megatron-core a
    # cluster image already has (any torch >= 2.4 satisfies this, so pip never replaces it, e.g. by
    # a CUDA build); DeepSpeed and megatron-core are extras, each the tested range of versions.py.
    # The library (optimizers, kernels, integrations) needs only torch and packaging; the jobs wing
    # (gradpower_ds.jobs: the main job, compare, the demo model and data, metrics) adds its progress bar,
    # plots, event files and data loading in the "jobs" extra. The test environments' exact pins are
    # requirements-test*.txt.
    install_requires=["torch>=2.4", "packaging"],
    extras_require={
        "jobs": list(jobs.EXTRA),
        "deepspeed": [versions.requirement("deepspeed")],
        "megatron": [versions.requirement("megatron-core")],
    },
    zip_safe=False,
)
