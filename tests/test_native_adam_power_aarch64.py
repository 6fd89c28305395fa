"""The native kernel builds for aarch64 (GH200/GB200 hosts) and its scalar phi is accurate there.

Debian's cross toolchain (g++-aarch64-linux-gnu) and qemu-user-static are used where installed,
else fetched with `apt-get download` and unpacked (no root needed) into a cache beside the
venv ($VIRTUAL_ENV or sys.prefix/cross-aarch64); the tests skip only where neither works (a
machine without apt). Two checks:

- the extension's C++ (native_adam_power.cpp and its headers, builder.CXX_FLAGS) compiles to an
  aarch64 object holding the scalar instantiations and none of the x86 ones;
- tests/cross/phi_driver.cpp (the kernel's phi, scalar path) built for aarch64 and run under
  qemu-aarch64 meets the same accuracy bound as on x86 (test_native_adam_power.assert_phi_accurate)
  over 2M random fp32 bit patterns plus edge values.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pybind11
import pytest
import torch

from gradpower_ds.ops import builder
from test_native_adam_power import all_fp32_sample, assert_phi_accurate

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "gradpower_ds" / "csrc"
CACHE = Path(os.environ.get("VIRTUAL_ENV", sys.prefix)) / "cross-aarch64"
TOOLCHAIN = "g++-aarch64-linux-gnu"
EM_AARCH64 = 183  # ELF e_machine

pytestmark = pytest.mark.slow


def _fetch(packages: list[str]) -> None:
    """apt-get download `packages` and the cross/aarch64 packages they need, unpacked into CACHE."""
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    tree = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                           "--no-breaks", "--no-replaces", "--no-enhances", *packages],
                          capture_output=True, text=True, check=True).stdout.split()
    wanted = sorted({name for name in tree if name[0].isalnum() and ":" not in name and (
        name in packages or "aarch64" in name or "arm64-cross" in name or name.endswith("-cross-base"))})
    subprocess.run(["apt-get", "download", *wanted], cwd=debs, capture_output=True, check=True, timeout=600)
    for deb in glob.glob(str(debs / "*.deb")):
        subprocess.run(["dpkg", "-x", deb, str(CACHE / "root")], check=True)
    shutil.rmtree(debs)
    for emulator in glob.glob(str(CACHE / "root" / "usr" / "bin" / "qemu-*")):  # qemu-user-static: every target
        if not emulator.endswith("/qemu-aarch64-static"):
            os.remove(emulator)


@pytest.fixture(scope="module")
def cross():
    """(g++ command, environment, qemu-aarch64 command) for aarch64, installed or fetched into CACHE."""
    gxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64-static")
    env = dict(os.environ)
    if not (gxx and qemu):
        root = CACHE / "root"
        if not (root / "usr" / "bin" / "aarch64-linux-gnu-g++").exists() or \
                not (root / "usr" / "bin" / "qemu-aarch64-static").exists():
            if not (shutil.which("apt-get") and shutil.which("dpkg")):
                pytest.skip(f"no {TOOLCHAIN} and no apt-get/dpkg to fetch it")
            try:
                _fetch([TOOLCHAIN, "qemu-user-static"])
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
                pytest.skip(f"could not fetch {TOOLCHAIN} with apt-get: {exc}")
        gxx, qemu = str(root / "usr/bin/aarch64-linux-gnu-g++"), str(root / "usr/bin/qemu-aarch64-static")
        # the unpacked binutils find their shared libraries here
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(root / "usr/lib/x86_64-linux-gnu"),
                                                  env.get("LD_LIBRARY_PATH", "")])
    return gxx, env, qemu


def compile_aarch64(cross, source: Path, out: Path, *flags: str) -> None:
    gxx, env, _ = cross
    proc = subprocess.run([gxx, *builder.CXX_FLAGS, f"-I{CSRC}", *flags, str(source), "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    header = out.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64


def test_extension_compiles_for_aarch64_with_the_scalar_path_only(cross, tmp_path):
    obj = tmp_path / "cpu_adam_power.o"
    compile_aarch64(cross, CSRC / "native_adam_power.cpp", obj, "-c", "-fPIC", f"-I{pybind11.get_include()}",
                    f"-I{sysconfig.get_paths()['include']}")
    gxx, env, _ = cross
    nm = subprocess.run([gxx.replace("g++", "nm"), "-C", str(obj)], capture_output=True, text=True, env=env,
                        check=True).stdout
    assert "adam_scalar" in nm and "power_scalar" in nm, "the scalar kernels are built"
    assert "avx" not in nm.lower(), "no x86 instantiation is built for aarch64"


def test_phi_is_accurate_on_aarch64_under_qemu(cross, tmp_path):
    driver = tmp_path / "phi_driver"
    compile_aarch64(cross, ROOT / "tests" / "cross" / "phi_driver.cpp", driver, "-static")
    x = all_fp32_sample()
    (tmp_path / "in.bin").write_bytes(x.numpy().tobytes())
    for p, eps in ((1.2, 0.0), (0.5, 0.0), (2.0, 0.0), (1.2, 1e-8)):
        subprocess.run([cross[2], str(driver), str(tmp_path / "in.bin"), str(tmp_path / "out.bin"), str(x.numel()),
                        repr(p), repr(eps)], check=True, timeout=600)
        got = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.float32)
        assert_phi_accurate(got, x, p, eps)
