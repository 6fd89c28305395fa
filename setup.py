"""Build script: the Python packages plus the native CPU kernel (pybind11, OpenMP).

The kernel's sources and flags live in gradpower_ds/ops/builder.py, shared with
the just-in-time build; it is loaded here by path so that building needs
neither torch nor the package itself.
"""

import importlib.util
from pathlib import Path

from pybind11.setup_helpers import build_ext
from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_gp_builder", ROOT / "gradpower_ds" / "ops" / "builder.py")
builder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(builder)

setup(
    name="gradpower-ds",
    version="0.1.0",
    description="GradPower/AdamPower and GPAS for DeepSpeed and Megatron-core pretraining",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gradpower_ds", "gradpower_ds.*", "megatron_patches", "megatron_patches.*"]),
    package_data={"gradpower_ds": ["csrc/*.h", "csrc/*.cpp"]},
    ext_modules=[builder.extension()],
    cmdclass={"build_ext": build_ext},
    # torch is pinned by requirements.txt (the CPU wheel on our machines); a range here
    # keeps pip from replacing an installed torch with a CUDA build.
    install_requires=["torch>=2.4", "numpy", "packaging", "tqdm", "matplotlib", "tensorboard"],
    extras_require={
        "deepspeed": ["deepspeed==0.19.8"],
        "megatron": ["megatron-core==0.16.1"],
    },
    zip_safe=False,
)
