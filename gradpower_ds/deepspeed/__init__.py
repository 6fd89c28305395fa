"""DeepSpeed integration: ``"optimizer": {"type": "AdamPower", ...}`` (and ``"MuonPower"``) in a DeepSpeed config.

``register()`` applies thin, reversible changes to DeepSpeed (``PATCHES``, a
``gradpower_ds.patching.PatchSet``; a DeepSpeed outside ``SUPPORTED_DEEPSPEED``, the
tested range, is refused with an error naming it), all listed in ``_patches()``:

1. ``"adampower"``, ``"adamwpower"`` and ``"muonpower"`` join DeepSpeed's list of named
   optimizers, so the config lower-cases them like ``"Adam"`` and the engine accepts them;
2. ``AdamPower`` and ``CPUAdamPower`` join ZeRO's supported optimizers, so no
   ``zero_allow_untested_optimizer`` or ``zero_force_ds_cpu_optimizer`` is needed;
3. ``DeepSpeedEngine._configure_basic_optimizer`` builds our optimizer for those
   names and defers to DeepSpeed for every other one;
4. the universal-checkpoint loads (ZeRO-1/2, bf16, ZeRO-3) follow, for our optimizers, the
   resume policy of every other load, and ZeRO-3's is repaired of two DeepSpeed defects
   (0.18.0 through 0.19.8) that appear with more than one sub-group
   (``gradpower_ds.deepspeed.universal``);
5. DeepSpeed's lr schedulers (``"scheduler"`` in the config) set each param group's lr
   through ``lr_schedules.update_lr``; after it, param groups built by
   ``gradpower_ds.blockwise_param_groups`` are checked to keep their multipliers' ratios
   (WarmupLR/WarmupDecayLR with a ``warmup_max_lr`` give all groups one lr), a ValueError
   saying which schedulers keep them otherwise;
6. where DeepSpeed has Muon, ``deepspeed.set_optimizer_flags`` tags the parameters for
   ``"MuonPower"`` as for ``"Muon"``. The MuonPower hooks into DeepSpeed's Muon are
   applied when one is built (``gradpower_ds.deepspeed.muon_power``);
7. ZeRO's passes around the step, for our optimizers: the unscale/clip multiply (ZeRO-1/2/3)
   and ZeRO-3's copy into the bf16/fp16 partition are done in AdamPower's own pass, bit for
   bit as DeepSpeed does them (``gradpower_ds.deepspeed.fold``; ``GRADPOWER_FOLD=0`` keeps
   DeepSpeed's passes);
8. the process groups DeepSpeed makes after ``init_distributed(timeout=...)`` (MoE's expert
   groups, ZeRO's) get that timeout too, not torch's 30-minute default
   (``gradpower_ds.deepspeed.timeouts``);
9. ``engine.save_checkpoint`` writes an integrity manifest of the checkpoint before it moves ``latest``,
   ``engine.load_checkpoint`` verifies it first, and a checkpoint file that fails to load is named with
   the rank in the error (``gradpower_ds.deepspeed.checkpointing``; ``GRADPOWER_CHECKPOINT_MANIFEST=0``
   keeps DeepSpeed's save and load as they are).

Where DeepSpeed would build its own CPU Adam (``offload_optimizer`` to the CPU, or
a CPU accelerator) the native ``CPUAdamPower`` kernel is built; elsewhere the
torch ``AdamPower``. DeepSpeed features that step only with DeepSpeed's own Adam
(partial offload, SuperOffload, ZenFlow, fp16/bf16 master weights, bf16 optimizer
states), and universal checkpoints on DeepSpeed before 0.18.0, are refused inside
``deepspeed.initialize`` with an error naming the setting and what to use instead
(``_unsupported_features``). Importing ``gradpower_ds`` patches nothing;
``unregister()`` undoes them all.
"""
from __future__ import annotations

import functools
import logging
import re

from . import checkpointing, fold, muon_power, timeouts, universal
from ..adam_power import AdamPower
from ..blockwise import check_scheduled_lrs
from ..cpu_adam_power import CPUAdamPower
from ..patching import Extend, Package, PatchSet, UnsupportedVersionError, Wrap
from ..versions import TESTED
from .params import ADAM_POWER_PARAMS, split_params

DEEPSPEED = Package("DeepSpeed", "deepspeed", "deepspeed", *TESTED["deepspeed"])
SUPPORTED_DEEPSPEED = DEEPSPEED.supported
OPTIMIZER_NAMES = ("adampower", "adamwpower")
UNIVERSAL_CHECKPOINTS_FROM = "0.18.0"  # the first DeepSpeed whose universal checkpoints hold for AdamPower
# ZeRO-3 on the CPU accelerator (gloo): before 0.19.8 its coalesced parameter all-gather waits only for the last of
# its async gathers, so params can be read half-gathered (DeepSpeed PR #8539): wrong results, NaN at times, whatever
# the optimizer. NCCL (GPUs) orders the gathers and is unaffected.
ZERO3_ON_CPU_FIXED_IN = "0.19.8"

_log = logging.getLogger(__name__)


UNREGISTERED_ERROR = re.compile(r"\b(adamw?power|muonpower) is not a supported DeepSpeed Optimizer",
                                re.IGNORECASE)
"""DeepSpeed's AssertionError (0.16.0 through 0.19.8) for a config naming our optimizer in a process where
register() did not run."""
UNREGISTERED_HINT = (
    "gradpower_ds: DeepSpeed knows \"type\": \"AdamPower\" / \"AdamWPower\" / \"MuonPower\" only in a process that "
    "called gradpower_ds.deepspeed.register() before deepspeed.initialize. Add `import gradpower_ds.deepspeed; "
    "gradpower_ds.deepspeed.register()` at the top of the training script, or start every training process "
    "through the runner, after the launcher: `deepspeed --module gradpower_ds.jobs.run train.py ...`, "
    "`torchrun ... -m gradpower_ds.jobs.run train.py ...`, "
    "`accelerate launch ... -m gradpower_ds.jobs.run train.py ...`, "
    "`python -m gradpower_ds.jobs.run train.py ...`. Processes the script starts itself (e.g. "
    "torch.multiprocessing.spawn) must call register() themselves.")


def explain_unregistered(exc: BaseException) -> bool:
    """Adds UNREGISTERED_HINT as a note to `exc` (PEP 678, shown under its traceback) when its message is
    DeepSpeed's "AdamPower is not a supported DeepSpeed Optimizer"; returns whether it did.

    Patches nothing: callers (``python -m gradpower_ds.jobs.run``) use it on an exception that reached them.
    """
    if not UNREGISTERED_ERROR.search(str(exc)) or UNREGISTERED_HINT in getattr(exc, "__notes__", ()):
        return False
    exc.add_note(UNREGISTERED_HINT)
    return True


class UnsupportedDeepSpeedError(UnsupportedVersionError):
    """The installed DeepSpeed is not the version these patches were written and tested for."""


def optimizer_kwargs(name: str, params: dict | None) -> tuple[dict, float | None]:
    """Turns a config's optimizer type and ``params`` into AdamPower keyword arguments.

    Returns (kwargs, expert_power or None when the config does not set it). Unknown keys and bad powers raise
    ValueError naming them (``params.split_params``); the other values are validated by the optimizer itself.
    """
    name = name.lower()
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"not an AdamPower optimizer type: {name!r} (expected one of {OPTIMIZER_NAMES})")
    kwargs, powers = split_params(name, params)
    if name == "adamwpower":
        if not kwargs.get("adam_w_mode", True):
            raise ValueError("DeepSpeed optimizer 'AdamWPower' always decays weights decoupled; for L2 "
                             "regularisation use \"type\": \"AdamPower\" with \"adam_w_mode\": false")
        kwargs["adam_w_mode"] = True
    kwargs["power"] = powers["power"]
    return kwargs, powers["expert_power"] if (params or {}).get("expert_power") is not None else None


def build_optimizer(name: str, params: dict | None, model_parameters, use_cpu_kernel: bool):
    """Builds AdamPower (or the native CPUAdamPower when ``use_cpu_kernel``) from a DeepSpeed config entry.

    ``"fused"`` is AdamPower's switch for the Triton kernel (default: on CUDA the kernel
    once it has passed its check on that GPU, gradpower_ds.kernel_gate; true requires it, false never uses it).

    Param groups marked ``"moe": True`` by DeepSpeed's MoE grouping get
    ``expert_power`` as their power when the config sets it.
    """
    kwargs, expert_power = optimizer_kwargs(name, params)
    groups = list(model_parameters)
    if expert_power is not None:
        def is_moe(group):
            return isinstance(group, dict) and bool(group.get("moe"))

        if not any(is_moe(g) for g in groups):
            _log.warning("AdamPower: expert_power=%s is set but the model has no DeepSpeed MoE parameter "
                         "groups; every group uses power=%s", expert_power,
                         kwargs["power"])
        groups = [dict(g, power=expert_power) if is_moe(g) else g for g in groups]
    if use_cpu_kernel:
        if kwargs.pop("fused", None):
            raise ValueError("DeepSpeed optimizer params: \"fused\": true selects the GPU (Triton) kernel, but this "
                             "config runs the optimizer on the CPU (optimizer offload or a CPU accelerator); remove it")
        return CPUAdamPower(groups, **kwargs)
    return AdamPower(groups, **kwargs)


def _configure_basic_optimizer(original):
    """DeepSpeedEngine._configure_basic_optimizer that builds our optimizer for our names (`original` for others)."""

    @functools.wraps(original)
    def configure(engine, model_parameters):
        name = engine.optimizer_name()
        if name == muon_power.NAME:
            return _build_muon_power(engine, model_parameters)
        if name not in OPTIMIZER_NAMES:
            return original(engine, model_parameters)
        return _build_for_engine(engine, name, model_parameters)

    return configure


def _build_for_engine(engine, name: str, model_parameters):
    """Our optimizer for a DeepSpeed engine whose config names it: the native CPU kernel where DeepSpeed would
    build its CPU Adam (optimizer offload, a CPU accelerator), else AdamPower.

    First refuses (ValueError) the DeepSpeed features that step only with DeepSpeed's own Adam
    (``_unsupported_features``), before DeepSpeed fails on them deeper in deepspeed.initialize or runs them
    with its Adam's maths.
    """
    problems = _unsupported_features(engine)
    if len(problems) == 1:
        raise ValueError(f"DeepSpeed optimizer {name!r}: {problems[0]}")
    if problems:
        raise ValueError(f"DeepSpeed optimizer {name!r} cannot run with {len(problems)} settings of this config:\n"
                         + "\n".join(f"- {problem}" for problem in problems))
    on_cpu = _on_cpu_accelerator()
    if on_cpu and engine.zero_optimization_stage() == 3 and engine.global_rank == 0 and \
            not DEEPSPEED.installed_at_least(ZERO3_ON_CPU_FIXED_IN):
        _log.warning("gradpower_ds: ZeRO-3 on DeepSpeed's CPU accelerator with DeepSpeed %s: before %s its parameter "
                     "all-gather can read parameters gloo has not finished gathering (DeepSpeed PR #8539), which "
                     "makes runs nondeterministically wrong (NaN at times) with any optimizer; install "
                     "deepspeed>=%s for ZeRO-3 without GPUs", DEEPSPEED.installed(), ZERO3_ON_CPU_FIXED_IN,
                     ZERO3_ON_CPU_FIXED_IN)
    use_cpu_kernel = engine.zero_use_cpu_optimizer() or on_cpu
    optimizer = build_optimizer(name, engine.optimizer_params(), model_parameters, use_cpu_kernel)
    if engine.global_rank == 0:
        powers = sorted({g["power"] for g in optimizer.param_groups})
        _log.info("gradpower_ds: %s built %s (power %s)", name, type(optimizer).__name__,
                  ", ".join(f"{p:g}" for p in powers))
    return optimizer


def _on_cpu_accelerator() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def _build_muon_power(engine, model_parameters):
    """MuonPower for an engine whose config names it (``muon_power.build_for_engine``; the native CPU kernel for the
    auxiliary Adam where AdamPower would use it); on a DeepSpeed without the Muon it hooks, a ValueError naming the
    setting and the version to install."""
    try:
        return muon_power.build_for_engine(engine, model_parameters,
                                           use_cpu_kernel=engine.zero_use_cpu_optimizer() or _on_cpu_accelerator())
    except UnsupportedVersionError as error:
        raise ValueError(f"DeepSpeed optimizer 'MuonPower' needs DeepSpeed's Muon as of {muon_power.MUON_POWER_FROM}: "
                         f"{error}") from None


def _engine_setting(engine, method: str, default=None):
    """``engine.<method>()``, or `default` where this DeepSpeed's engine has no such method."""
    getter = getattr(engine, method, None)
    return getter() if callable(getter) else default


def _unsupported_features(engine) -> list[str]:
    """The DeepSpeed features this engine's config enables that step only with DeepSpeed's own Adam, one sentence
    each naming the config key and what to use instead ([] when none).

    DeepSpeed 0.19.8 asserts ``type(optimizer) == DeepSpeedCPUAdam`` for partial offload and for fp16/bf16 master
    weights, runs SuperOffload's steps in worker processes that build their own DeepSpeedCPUAdam, and ZenFlow's
    with its AdamW (ZenFlowSelectiveAdamW) and ZenFlow CPU Adam (``step(step_id=...)``, or a native Adam in a
    separate process with ``overlap_step``, which runs without an error and ignores AdamPower's power).
    """
    problems = []
    # engine.bf16_optimizer_states() exists from DeepSpeed 0.18.3 on.
    if _engine_setting(engine, "bf16_optimizer_states", False):
        problems.append("\"bf16\": {\"bf16_optimizer_states\": true} keeps the optimizer moments in bf16, AdamPower "
                        "keeps fp32 moments: remove \"bf16_optimizer_states\" from the config")
    for dtype in ("fp16", "bf16"):
        if _engine_setting(engine, f"{dtype}_master_weights_and_gradients", False):
            problems.append(
                f"\"{dtype}\": {{\"{dtype}_master_weights_and_grads\": true}} ({dtype} master weights and gradients) "
                "works in DeepSpeed only with its own DeepSpeedCPUAdam: remove it (AdamPower keeps fp32 master "
                "weights; \"offload_optimizer\": {\"device\": \"cpu\"} keeps them on the CPU, stepped by "
                f"CPUAdamPower), or use DeepSpeed's \"type\": \"AdamW\" for {dtype} master weights")
    if _engine_setting(engine, "zenflow_config") is not None:
        problems.append(
            "ZenFlow (\"zero_optimization\": {\"zenflow\": ...}) steps the important gradient columns with "
            "DeepSpeed's AdamW (ZenFlowSelectiveAdamW) and the others with its own ZenFlow CPU Adam, not with "
            "AdamPower: remove \"zenflow\" (\"offload_optimizer\": {\"device\": \"cpu\"} alone steps CPUAdamPower on "
            "the CPU), or use DeepSpeed's \"type\": \"AdamW\" for ZenFlow")
    if engine.zero_optimization_stage() == 3 and _engine_setting(engine, "super_offload", False):
        problems.append(
            "SuperOffload (\"zero_optimization\": {\"offload_optimizer\": {\"super_offload\": true}}) steps in worker "
            "processes that build DeepSpeed's own DeepSpeedCPUAdam (and needs a CUDA GPU): remove \"super_offload\" "
            "(ZeRO-3 \"offload_optimizer\": {\"device\": \"cpu\"} steps CPUAdamPower on the CPU), or use DeepSpeed's "
            "\"type\": \"AdamW\" for SuperOffload")
    if _engine_setting(engine, "load_universal_checkpoint", False) and not DEEPSPEED.installed_at_least(
            UNIVERSAL_CHECKPOINTS_FROM):
        problems.append(
            f"loading a universal checkpoint (\"checkpoint\": {{\"load_universal\": true}}) with AdamPower needs "
            f"DeepSpeed {UNIVERSAL_CHECKPOINTS_FROM} or newer (this is {DEEPSPEED.installed()}: its ds_to_universal "
            "fails for ZeRO-3 with several sub-groups, fixed in 0.18.0 by DeepSpeed PR #7585, and 0.16.0's ZeRO-1/2 "
            "universal load loses the fp32 master weights): install deepspeed>=0.18.0, or resume from the regular "
            "checkpoint on the same number of ranks")
    ratio = _engine_setting(engine, "zero_partial_offload", 1.0)
    if engine.zero_use_cpu_optimizer() and ratio < 1.0:
        problems.append(
            f"partial optimizer offload (\"zero_optimization\": {{\"offload_optimizer\": {{\"ratio\": {ratio:g}}}}}) "
            "works in DeepSpeed only with its own DeepSpeedCPUAdam for the offloaded part and torch.optim.AdamW for "
            "the rest: offload all of the optimizer (\"ratio\": 1.0, CPUAdamPower on the CPU) or none of it (remove "
            "\"offload_optimizer\": AdamPower on the accelerator), or use DeepSpeed's \"type\": \"AdamW\" for partial "
            "offload")
    return problems


def _checking_blockwise_lrs(update_lr):
    """DeepSpeed's ``lr_schedules.update_lr``, then ``check_scheduled_lrs`` on the groups it set."""
    @functools.wraps(update_lr)
    def update_and_check(param_groups, lrs):
        result = update_lr(param_groups, lrs)
        check_scheduled_lrs(param_groups)
        return result
    return update_and_check


def _patches() -> list:
    """What register() changes in DeepSpeed, in order (see the module docstring)."""
    import deepspeed
    from deepspeed.comm.torch import TorchBackend
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime import config as ds_config
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import utils as zero_utils
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    # DeepSpeed before 0.17.6 has no Muon and no set_optimizer_flags: there "MuonPower" is refused when built
    muon = [Wrap(deepspeed, "set_optimizer_flags", muon_power.tag_muon_parameters)] \
        if hasattr(deepspeed, "set_optimizer_flags") else []
    return [
        Extend(ds_config.DEEPSPEED_OPTIMIZERS, (*OPTIMIZER_NAMES, muon_power.NAME),
               "deepspeed.runtime.config.DEEPSPEED_OPTIMIZERS"),
        Extend(zero_utils.ZERO_SUPPORTED_OPTIMIZERS, (AdamPower, CPUAdamPower),
               "deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS"),
        Wrap(DeepSpeedEngine, "_configure_basic_optimizer", _configure_basic_optimizer),
        Wrap(ZeROOptimizer, "load_hp_checkpoint_state_from_checkpoint_dir", universal.loading_under_policy),
        Wrap(DeepSpeedZeroOptimizer_Stage3, "load_hp_checkpoint_state_from_checkpoint_dir_stage3",
             universal.loading_zero3_under_policy),
        Wrap(lr_schedules, "update_lr", _checking_blockwise_lrs),
        *muon,
        Wrap(DeepSpeedZeroOptimizer, "unscale_and_clip_grads", fold.unscale_and_clip_1_2),
        Wrap(DeepSpeedZeroOptimizer_Stage3, "unscale_and_clip_grads", fold.unscale_and_clip_3),
        Wrap(DeepSpeedZeroOptimizer_Stage3, "_optimizer_step", fold.optimizer_step_3),
        Wrap(DeepSpeedZeroOptimizer_Stage3, "_reassign_or_swap_out_partitioned_parameters", fold.reassign_3),
        Wrap(TorchBackend, "__init__", timeouts.keeping_timeout),
        Wrap(TorchBackend, "new_group", timeouts.new_group_with_timeout),
        Wrap(DeepSpeedEngine, "save_checkpoint", checkpointing.saving_with_manifest),
        Wrap(DeepSpeedEngine, "load_checkpoint", checkpointing.loading_verified),
        Wrap(TorchCheckpointEngine, "load", checkpointing.loading_naming_file),
    ]


PATCHES = PatchSet("gradpower_ds.deepspeed", DEEPSPEED, "it patches its engine internals", _patches,
                   UnsupportedDeepSpeedError)


def register() -> None:
    """Lets DeepSpeed configs use ``"type": "AdamPower"`` / ``"AdamWPower"`` (idempotent)."""
    PATCHES.apply()


def unregister() -> None:
    """Undoes register() and the MuonPower hooks; a no-op when not registered."""
    muon_power.MUON_PATCHES.remove()
    PATCHES.remove()


def is_registered() -> bool:
    """Whether register() is in effect."""
    return PATCHES.is_applied()


__all__ = [
    "ADAM_POWER_PARAMS", "DEEPSPEED", "OPTIMIZER_NAMES", "PATCHES", "SUPPORTED_DEEPSPEED", "UNREGISTERED_HINT",
    "UnsupportedDeepSpeedError", "build_optimizer", "explain_unregistered", "is_registered", "optimizer_kwargs",
    "register", "unregister",
]
