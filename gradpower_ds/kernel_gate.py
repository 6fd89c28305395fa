"""Whether the Triton kernel is the default on a GPU: checked on that GPU, once, before its first use.

The first time a process steps automatically (``fused=None``) on a CUDA device with grads of a
dtype, ``triton_is_default(device, grad_dtype)`` runs the compiled kernel there on a few small
tensors against the torch single-tensor path (``torch_paths``, what AdamPower(foreach=False) steps with):
edge values (+-0, +-tiny, subnormal, large, +-inf, NaN, kept as the reference keeps them), AdamW decay
and Adam's L2 term, bias correction on and off, power_eps, two groups of different p, p = 1, the
bf16 copy-out, and phi alone in place. It passes: Triton is the default for that (device, dtype) in
this process. It fails: the torch path, and one warning saying what differed and how to report it.

The verdict is kept on disk per (GPU name, compute capability, Triton version, gradpower-ds version and
kernel source, grad dtype) in ``$GRADPOWER_CACHE_DIR`` (default ``$XDG_CACHE_HOME/gradpower_ds`` or
``~/.cache/gradpower_ds``), a directory the user owns (created 0700; one owned by another user, or open
to others' writes, is not used), so later processes on that GPU do not check again.

``GRADPOWER_TRITON`` overrides the automatic choice: ``1`` Triton wherever it can run (no check), ``0``
the torch path, ``auto`` (default) the check. Explicit ``fused=True``/``False`` are never overridden.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import torch

from . import torch_paths
from .ops import triton_adam_power as triton_ops
from .versions import VERSION

ENV_CHOICE = "GRADPOWER_TRITON"
ENV_CACHE_DIR = "GRADPOWER_CACHE_DIR"
CHOICES = {"auto": None, "1": True, "0": False}
CACHE_FILE = "triton_gate.json"
REPORT_TO = "the gradpower-ds issue tracker, with this message and the verdict file named below"
_verdicts: dict[tuple, bool] = {}  # this process's, per (device, grad dtype)
log = logging.getLogger(__name__)


def choice() -> bool | None:
    """GRADPOWER_TRITON as True (always Triton), False (never) or None (the check); a bad value raises saying so."""
    value = os.environ.get(ENV_CHOICE, "auto").strip().lower()
    if value not in CHOICES:
        raise ValueError(f"{ENV_CHOICE}={os.environ[ENV_CHOICE]!r}: use 1 (always the Triton kernel where it can "
                         "run), 0 (the torch path) or auto (check the kernel on each GPU once; the default)")
    return CHOICES[value]


def triton_is_default(device: torch.device, grad_dtype: torch.dtype) -> bool:
    """Whether automatic choices step tensors on `device` with `grad_dtype` grads through the Triton kernel."""
    forced = choice()
    if forced is not None or not triton_ops.triton_available():
        return bool(forced) and triton_ops.triton_available()
    key = (device, grad_dtype)
    if key not in _verdicts:
        _verdicts[key] = _cached_or_checked(device, grad_dtype)
    return _verdicts[key]


def device_identity(device: torch.device) -> dict:
    """What the verdict depends on: GPU name, compute capability, Triton version, our version and kernel source."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
    else:  # Triton's interpreter on CPU tensors (tests)
        name, capability = "Triton interpreter", "cpu"
    source = hashlib.sha256(Path(triton_ops.__file__).read_bytes()).hexdigest()[:16]
    return dict(gpu=name, capability=capability, triton=triton_ops.triton.__version__, gradpower_ds=VERSION,
                kernel=source)


def cache_dir() -> Path:
    """The verdicts' directory: $GRADPOWER_CACHE_DIR, else $XDG_CACHE_HOME/gradpower_ds, else ~/.cache/gradpower_ds."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gradpower_ds"


def _usable(directory: Path) -> bool:
    """Creates `directory` (0700) if missing; whether it is ours and closed to others' writes."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _cached_or_checked(device: torch.device, grad_dtype: torch.dtype) -> bool:
    identity = dict(device_identity(device), grad_dtype=str(grad_dtype).removeprefix("torch."))
    key = "|".join(f"{k}={v}" for k, v in identity.items())
    directory = cache_dir()
    path = directory / CACHE_FILE
    usable = _usable(directory)
    cached = _read(path) if usable else {}
    if key in cached:
        verdict = cached[key]
    else:
        started = time.perf_counter()
        difference = check(device, grad_dtype)
        verdict = dict(identity, passed=difference is None, difference=difference,
                       seconds=round(time.perf_counter() - started, 3), checked=time.strftime("%Y-%m-%d %H:%M:%S"))
        if usable:
            _write(path, dict(_read(path), **{key: verdict}))  # read again: keeps what other ranks wrote meanwhile
        log.info("gradpower_ds: the Triton kernel %s on %s (%s grads) in %.2f s", "passed its check" if
                 verdict["passed"] else "FAILED its check", identity["gpu"], identity["grad_dtype"], verdict["seconds"])
    if not verdict["passed"]:
        warnings.warn(
            f"gradpower_ds: the Triton AdamPower kernel differs from the reference on {identity['gpu']} "
            f"({identity['capability']}, Triton {identity['triton']}, {identity['grad_dtype']} grads): "
            f"{verdict['difference']}. Stepping with the torch path instead (correct, slower). Please report it to "
            f"{REPORT_TO}; {ENV_CHOICE}=1 forces the kernel, {ENV_CHOICE}=0 skips this check ("
            f"{f'verdict kept in {path}' if usable else f'verdict not kept: {directory} is not a private directory'})",
            RuntimeWarning, stacklevel=3)
    return verdict["passed"]


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: checked again and rewritten
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(temporary, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as error:
        log.warning("gradpower_ds: could not keep the Triton kernel's verdict in %s (%s); it is checked again in "
                    "the next process", path, error)


def _edge_values(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """n fp32 values: random normal ones with 0, -0, +-tiny, subnormal, large, +-inf and NaN among them."""
    values = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    edges = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40, -1e-41, 3e-45, 1e18, -1e18, float("inf"),
                          -float("inf"), float("nan")])
    values[::max(1, n // len(edges))][:len(edges)] = edges[:min(n, len(edges))]
    return values.to(dtype)


CASES = (  # (power, power_eps, adam_w_mode, weight_decay, bias_correction, bf16 copy-out, grad_scale)
    (1.2, 0.0, True, 0.1, True, False, None),
    (1.2, 1e-8, False, 0.01, True, True, None),
    (0.8, 0.0, True, 0.0, False, True, None),
    (1.0, 0.0, True, 0.1, True, False, None),
    (1.2, 0.0, True, 0.1, True, True, 0.37),  # as DeepSpeed's ZeRO steps it: the clip coefficient and a bf16 copy
)
SIZES = (triton_ops.BLOCK + 37, 1, 300)  # whole blocks and a tail, a single element, a tensor under one block


def check(device: torch.device, grad_dtype: torch.dtype) -> str | None:
    """Runs the kernel on `device` against the reference; None when they agree, else what differed (one line).

    Three steps per case of CASES (each a param group of its own p) on SIZES, fp32 params and moments,
    `grad_dtype` grads with edge values; then phi alone in place on such grads. Agreement: the
    tolerance the kernel's tests hold it to (rtol 1e-5, atol 1e-6, the same inf/NaN positions; phi of
    bf16/fp16 grads one rounding apart at most), bf16 copies bitwise the kernel's own params rounded.
    """
    try:
        for case, (power, power_eps, adam_w_mode, weight_decay, bias_correction, copy_out, grad_scale) in \
                enumerate(CASES):
            hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, power=power,
                         power_eps=power_eps, adam_w_mode=adam_w_mode, bias_correction=bias_correction,
                         grad_scale=grad_scale)
            label = (f"case {case} (p={power}, power_eps={power_eps}, {'AdamW' if adam_w_mode else 'L2'} "
                     f"weight_decay={weight_decay}, bias_correction={bias_correction}"
                     f"{'' if grad_scale is None else f', grad_scale={grad_scale}'})")
            got, want = (_three_steps(where, grad_dtype, copy_out, hyper, step) for where, step in
                         ((device, _kernel_step), (torch.device("cpu"), torch_paths.single_tensor_adam_power)))
            for name in ("param", "exp_avg", "exp_avg_sq"):
                for a, b in zip(got[name], want[name]):
                    torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6, equal_nan=True,
                                               msg=lambda m, name=name: f"{label}, {name}: {_summary(m)}")
            for copy, param in zip(got["bf16 copy"], got["param"]):  # bitwise the kernel's own params rounded
                torch.testing.assert_close(copy, param.to(torch.bfloat16), rtol=0.0, atol=0.0, equal_nan=True,
                                           msg=lambda m: f"{label}, bf16 copy-out: {_summary(m)}")
        for power, power_eps in ((1.2, 0.0), (0.8, 1e-8)):
            grads = [_edge_values(n, grad_dtype, seed=7 + n) for n in SIZES]
            got = [g.to(device, copy=True) for g in grads]
            triton_ops.triton_grad_power_(got, power, power_eps)
            for g in grads:
                torch_paths.torch_power_(g, power, power_eps)
            ulp = 0.0 if grad_dtype == torch.float32 else torch.finfo(grad_dtype).eps  # one rounding apart at most
            for a, b in zip(got, grads):
                torch.testing.assert_close(a.cpu(), b, rtol=max(1e-5, ulp), atol=0.0, equal_nan=True,
                                           msg=lambda m, p=power: f"phi_p in place (p={p}): {_summary(m)}")
    except AssertionError as error:
        return " ".join(str(error).split())
    except Exception as error:  # a kernel that cannot compile or launch here fails its check the same way
        return f"{type(error).__name__}: {error}"
    return None


def _summary(message: str) -> str:
    """torch.testing's mismatch report in one line (how many elements differ, the greatest differences and where)."""
    return "; ".join(line.strip() for line in message.splitlines()[1:] if line.strip())


def _kernel_step(params, grads, exp_avgs, exp_avg_sqs, steps, copies, **hyper) -> None:
    triton_ops.triton_adam_power_step(params, grads, exp_avgs, exp_avg_sqs, steps, low_precision_params=copies, **hyper)


def _three_steps(device: torch.device, grad_dtype: torch.dtype, copy_out: bool, hyper: dict, step) -> dict:
    """Three AdamPower steps on SIZES on `device` by `step` (the kernel's or the reference's functional step): the
    params, moments and bf16 copies after them, by name."""
    params = [_edge_values(n, torch.float32, seed=n).nan_to_num_(0.0, 1e3, -1e3).to(device) for n in SIZES]
    exp_avgs, exp_avg_sqs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    counts = [torch.tensor(0.0) for _ in params]
    copies = [torch.empty_like(p, dtype=torch.bfloat16) if copy_out else None for p in params]
    for k in range(3):
        grads = [_edge_values(n, grad_dtype, seed=100 * k + n).to(device) for n in SIZES]
        step(params, grads, exp_avgs, exp_avg_sqs, counts, copies, **hyper)
    return {"param": params, "exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs,
            "bf16 copy": [c for c in copies if c is not None]}
