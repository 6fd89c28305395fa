"""Test-only shim: runs megatron-core (the tested range, 0.13.0 through 0.19.2) on a CPU-only torch with gloo.

megatron-core assumes CUDA in many places that a CPU run reaches: ``device='cuda'``
and ``torch.cuda.current_device()`` tensors (optimizer, grad scaler, clip_grads,
causal mask, rotary embedding, global memory buffer, grad buffers),
``.type() == 'torch.cuda.FloatTensor'`` checks (float16/distributed optimizer,
clip_grads), ``torch.cuda.Stream``/``Event``/``synchronize`` (DDP, alltoall
token dispatcher), the CUDA RNG behind its RNG tracker, and
``moe_utils.te_general_gemm``, which is undefined without TransformerEngine.
``install()`` papers over exactly these:

- a TorchFunctionMode sends every CUDA device (``'cuda'``, ``'cuda:0'``, an int
  such as ``torch.cuda.current_device()``) to the CPU, makes ``Tensor.cuda()`` a
  no-op and ``Tensor.type()`` report CPU float tensors as ``torch.cuda.*``;
- ``torch.cuda`` streams and events become do-nothing stand-ins, ``synchronize`` a no-op;
- the RNG tracker's CUDA state get/set/seed use the CPU generator;
- ``all_to_all_single`` gets its split sizes as Python lists (gloo wants lists);
- ``moe_utils.te_general_gemm = None`` (the path Megatron takes without TE);
- megatron-core's Muon needs NVIDIA's emerging-optimizers. megatron-core 0.16.1 was written for its
  v0.1.0 (Megatron-LM pins that git tag); the package index has only 0.3.0, which declares Python
  >= 3.12 (launch/setup_env.sh installs it with ``--ignore-requires-python`` on 3.11) and renamed two
  keywords megatron-core 0.16 passes. So: on Python 3.11 ``typing.override`` (from typing_extensions),
  and, where megatron-core passes the old names to a release with the new ones (0.16),
  ``OrthogonalizedOptimizer(use_nesterov=)`` and ``newton_schulz_tp(mode=)`` are passed on as
  ``nesterov=`` and ``tp_mode=`` (the same maths: v0.1.0 and 0.3.0 share the update and the quintic
  Newton-Schulz coefficients). megatron-core 0.17 on passes the new names itself.

For Megatron-LM's ``pretrain()`` (core_v0.16.1, e.g. ``python -m megatron_patches.pretrain_gpt``
with ``--distributed-backend gloo``; run it with ``TORCHDYNAMO_DISABLE=1``, as torch.compile'd
fusions take minutes to build on a few CPU cores), also:

- ``megatron.training.initialize`` sees a ``torch.cuda`` whose ``is_available()`` is True and
  ``device_count()`` is 1 (it asserts CUDA, and sets up model parallelism and the RNG tracker
  only with a device); torch itself keeps seeing no CUDA (dynamo, autocast, ...);
- ``megatron.legacy.fused_kernels.load`` (nvcc) is a no-op; ``compile_helpers`` (``make`` in
  megatron-core's datasets folder, which the wheel ships prebuilt, without a Makefile) is
  skipped when ``helpers_cpp`` imports;
(Loading a distributed-optimizer checkpoint without Apex/TE needs ``megatron_patches.checkpoint``,
which ``megatron_patches.apply()`` installs: that gap is megatron-core's on any device, not the CPU's.)

The Megatron-LM modules are patched right after they are imported (an import hook), since
they become importable only when the entry point puts the checkout on sys.path.

Nothing here is used by the product (``gradpower_ds``, ``megatron_patches``). Known
limits: expert layers need ``add_bias_linear=False``; only the code paths the tests
use were exercised. ``uninstall()`` undoes everything.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import inspect
import os
import sys
import typing

import torch
import torch.distributed as dist
import typing_extensions
from torch.overrides import TorchFunctionMode

_state: dict = {}  # "mode" -> the active mode; (owner, name) -> original attribute


def _is_cuda(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True  # a CUDA ordinal, e.g. torch.cuda.current_device()
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.record_stream:
            return args[0] if func is torch.Tensor.cuda else None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if args[0].device.type == "cpu" else name
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        kwargs.pop("pin_memory", None)
        return func(*args, **kwargs)


class _FakeStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _FakeEvent()

    def __eq__(self, other):
        return isinstance(other, _FakeStream)

    __hash__ = object.__hash__


class _FakeEvent(_FakeStream):
    def record(self, *args):
        pass

    def wait(self, *args):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
    def as_list(sizes):
        return None if sizes is None else [int(s) for s in (sizes.tolist() if hasattr(sizes, "tolist") else sizes)]

    original = _state[(dist, "all_to_all_single")]
    return original(output, input, as_list(output_split_sizes), as_list(input_split_sizes), *args, **kwargs)


def _set(owner, name, value) -> None:
    _state[(owner, name)] = getattr(owner, name, None)
    setattr(owner, name, value)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs patch(module) right after one of the named modules is first imported (Megatron-LM's modules are
    importable only once the entry point has put its checkout on sys.path)."""

    def __init__(self, patches: dict):
        self.patches = patches

    def find_spec(self, name, path=None, target=None):
        if name not in self.patches:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module, patch = spec.loader.exec_module, self.patches[name]

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


class _Proxy:
    """`target` with some attributes replaced (for one module's view of torch / torch.cuda)."""

    def __init__(self, target, **overrides):
        self._target, self._overrides = target, overrides

    def __getattr__(self, name):
        return self._overrides[name] if name in self._overrides else getattr(self._target, name)


def _patch_megatron_lm_module(module) -> None:
    if module.__name__ == "megatron.legacy.fused_kernels":
        _set(module, "load", lambda args: None)  # nvcc-built softmax kernels; unused with the unfused path
    elif module.__name__ == "megatron.training.initialize":
        # asserts torch.cuda.is_available(); sets up model parallelism and the RNG tracker only when
        # torch.cuda.device_count() > 0. Only this module sees a CUDA device (torch itself must not: dynamo).
        cuda = _Proxy(torch.cuda, is_available=lambda: True, device_count=lambda: 1)
        _set(module, "torch", _Proxy(torch, cuda=cuda))


def _skip_compile_helpers(utils) -> None:
    # the megatron-core wheel ships helpers_cpp prebuilt but no Makefile; Megatron-LM runs `make` on rank 0
    original = utils.compile_helpers

    def compile_helpers():
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            original()

    _set(utils, "compile_helpers", compile_helpers)


def _install_megatron_lm() -> None:
    """For Megatron-LM's pretrain() (megatron.training): see the module docstring."""
    from megatron.core.datasets import utils

    _skip_compile_helpers(utils)
    finder = _AfterImport({name: _patch_megatron_lm_module
                           for name in ("megatron.legacy.fused_kernels", "megatron.training.initialize")})
    sys.meta_path.insert(0, finder)
    _state["finder"] = finder


def _adapt_emerging_optimizers() -> None:
    """megatron-core 0.16's Muon on emerging-optimizers 0.3.0 (see the module docstring); a no-op without them, and
    where megatron-core passes 0.3.0's keywords itself (0.17 on)."""
    from megatron_patches.optimizer import muon_module

    muon = muon_module()  # megatron.core.optimizer.muon (0.16, 0.17), .emerging_optimizers (0.18 on), None (< 0.16)
    if muon is None or not muon.HAVE_EMERGING_OPTIMIZERS:
        return
    base = muon.OrthogonalizedOptimizer
    if "use_nesterov" in inspect.signature(base.__init__).parameters:
        return  # the release megatron-core was written for
    if "use_nesterov=" not in inspect.getsource(muon.TensorParallelMuon.__init__):
        return  # this megatron-core passes nesterov= and tp_mode= already (0.17 on)
    init, newton_schulz_tp = base.__init__, muon.newton_schulz_tp

    def __init__(self, *args, use_nesterov: bool, **kwargs):
        init(self, *args, nesterov=use_nesterov, **kwargs)

    _set(base, "__init__", __init__)
    _set(muon, "newton_schulz_tp", lambda *args, mode="duplicated", **kwargs:
         newton_schulz_tp(*args, tp_mode=mode, **kwargs))


def install() -> None:
    """Lets megatron-core run on the CPU (idempotent); raises RuntimeError outside the tested range."""
    if _state:
        return
    import megatron.core
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils

    from gradpower_ds.patching import ALLOW_UNTESTED
    from megatron_patches import MEGATRON_CORE

    if not MEGATRON_CORE.is_tested(megatron.core.__version__) and os.environ.get(ALLOW_UNTESTED) != "1":
        raise RuntimeError(f"tests/megatron_cpu_shim.py was written for megatron-core {MEGATRON_CORE.supported}, "
                           f"but {megatron.core.__version__} is installed; re-check which CUDA assumptions it "
                           "must paper over before using it with this version")
    if not hasattr(typing, "override"):  # Python 3.11: see the module docstring (emerging-optimizers)
        _set(typing, "override", typing_extensions.override)
    stream = _FakeStream()
    for name, value in [("Stream", _FakeStream), ("Event", _FakeEvent), ("current_stream", lambda *a, **k: stream),
                        ("stream", lambda *a, **k: contextlib.nullcontext()), ("synchronize", lambda *a, **k: None),
                        ("current_device", lambda: torch.device("cpu")), ("set_device", lambda *a: None),
                        ("get_rng_state", lambda *a, **k: torch.get_rng_state()),
                        ("manual_seed", lambda seed: torch.manual_seed(seed))]:
        _set(torch.cuda, name, value)
    _set(mrandom, "_set_cuda_rng_state", lambda state, device=-1, graph_safe=False: torch.set_rng_state(state))
    _set(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    if not hasattr(moe_utils, "te_general_gemm"):  # as megatron_patches.apply() does, for jobs that only use GPAS
        _set(moe_utils, "te_general_gemm", None)
    _set(dist, "all_to_all_single", _all_to_all_single)
    _adapt_emerging_optimizers()
    _install_megatron_lm()
    _state["mode"] = _CudaToCpu()
    _state["mode"].__enter__()


def uninstall() -> None:
    """Undoes install() (a no-op when not installed)."""
    finder = _state.pop("finder", None)
    if finder is not None:
        sys.meta_path.remove(finder)
    mode = _state.pop("mode", None)
    if mode is not None:
        mode.__exit__(None, None, None)
    for (owner, name), value in _state.items():
        if value is None:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
    _state.clear()
