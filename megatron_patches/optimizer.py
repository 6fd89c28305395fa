"""AdamPower and MuonPower in megatron-core: ``OptimizerConfig(optimizer="adampower" | "muonpower" | "dist_muonpower",
gradpower_p=...)``.

megatron-core (the versions in ``megatron_patches.SUPPORTED_MEGATRON_CORE``) knows ``'adam'``, ``'sgd'`` and,
0.16 on, Muon (``get_megatron_muon_optimizer`` in 0.16 and 0.17; from 0.18 ``get_megatron_optimizer`` sends every
other name to its emerging-optimizer path). Ours each step as one of Megatron's (``KNOWN_AS``).
``megatron_patches.apply()`` makes thin, reversible changes with the wrappers here
(listed in ``megatron_patches.patches``):

1. ``OptimizerConfig.__init__`` (and its subclass ``AdamOptimizerConfig``'s) accept
   the ``FIELDS``, the names of p of ``gradpower_ds.hyperparams.POWER_NAMES`` as
   Megatron spells them (None: not set); every config has them as attributes:

   - ``gradpower_p`` (power): adampower: p for dense parameters (None: AdamPower's
     default, 1.2); muonpower: p before Muon's momentum on the matrices Muon updates
     (required: no default, ``hyperparams.MUON_POWER_GUIDANCE`` says why);
   - ``gradpower_p_expert`` (expert_power): the same for MoE expert parameters (None:
     ``gradpower_p``);
   - ``gradpower_p_adam`` (adam_power): muonpower only: p of the AdamPower that
     Megatron's Muon chains for what it leaves to Adam (embeddings, output layer,
     norms, biases; None: 1.2);
   - ``gradpower_blockwise_lr``: blockwise learning rates, for 'adam' and 'adampower' too
     (``megatron_patches.blockwise``, which validates it here);
2. ``OptimizerConfig.__post_init__`` validates them (``checked_powers``, ValueError naming
   the field) for ``"adampower"`` / ``"muonpower"`` and runs Megatron's own checks as for
   ``'adam'`` / Muon (e.g. the precision-aware optimizer is allowed with AdamPower);
   ``"muonpower"`` on a megatron-core whose Muon does not import is refused there,
   saying what to install;
3. ``megatron.core.optimizer.get_megatron_optimizer`` (and Megatron-LM's imported name for it;
   ``build_optimizer_with_power``) builds an adampower config as ``'adam'`` with its powers in effect
   (so 0.18 on builds the standard path, the DistributedOptimizer's sharding included), and a muon one
   as ``'muon'`` / ``'dist_muon'`` (item 4). ``_get_megatron_optimizer_based_on_param_groups``,
   called once per chained optimizer (dense, then expert), then builds the optimizer exactly
   as for ``'adam'`` and gives each inner torch optimizer AdamPower's step by
   moving it to a subclass of its own class (``power_optimizer_class``), so
   Megatron's wrappers, state layout (``exp_avg``, ``exp_avg_sq``, ``step``) and
   checkpoint format stay as they are:

   - torch's Adam/AdamW (Megatron without TE/apex, and the CPU side of
     ``optimizer_cpu_offload``): the step runs phi + Adam(W) in one pass through
     ``gradpower_ds.functional.adam_power`` (the native kernel on the CPU; on CUDA
     the Triton kernel once it has passed its check on that GPU, gradpower_ds.kernel_gate,
     else the bounded multi-tensor path);
   - any other Adam (TE/apex FusedAdam, incl. the precision-aware optimizer's
     ``decoupled_grad``): phi is applied in place to the grads
     (``gradpower_ds.power.grad_power_``: one pass, bounded scratch) and then the
     class's own step runs.

   With ``optimizer_cpu_offload`` Megatron's HybridDeviceOptimizer is built with
   these classes as its CPU and GPU optimizer classes, so it keeps them when it
   rebuilds its sub-optimizers (e.g. on a checkpoint load);
4. Megatron's Muon for ``"muonpower"`` / ``"dist_muonpower"`` (built by ``get_megatron_optimizer``
   from 0.18, by ``megatron.core.optimizer.muon.get_megatron_muon_optimizer`` and Megatron-LM's
   imported name for it in 0.16 and 0.17) has its inner optimizers moved the same way (``power_muon``):
   each ``TensorParallelMuon`` to a subclass that
   applies phi in place to the grads before Muon's own step (so phi comes before
   the momentum buffer and Newton-Schulz), each chained Adam to AdamPower with
   ``gradpower_p_adam``. Megatron's own Muon checks (no distributed optimizer, no
   fp16) and its errors stay.

Megatron's step is prepare_grads (copy to fp32 main grads, unscale, inf check)
-> grad norm -> clip -> inner ``optimizer.step()``, so phi sees the clipped fp32
main grads, on this rank's shards under the distributed optimizer; a step skipped
for an inf/NaN gradient never reaches it. Param groups that Megatron marks
``is_expert_parallel`` use the expert p. An optimizer whose groups all
have p = 1 runs its class's own step unchanged (Megatron's Adam or Muon, bit for bit), and
``optimizer.config.optimizer`` stays ours. Look ``get_megatron_optimizer`` up after ``apply()``: a name bound
before it is megatron-core's own (0.18 on refuses ours on its emerging path, saying this:
``refuse_ours_on_the_emerging_path``).

Optimizers built while applied keep their class after ``remove()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import sys
import weakref
from collections.abc import Callable, Mapping

import torch

from gradpower_ds import folding
from gradpower_ds.folding import FoldsIntoStep
from gradpower_ds.functional import adam_power
from gradpower_ds.hyperparams import POWER_NAMES, check_settings, power_names, resume_changes_between
from gradpower_ds.power import grad_power_

from . import blockwise

OPTIMIZER_NAME = "adampower"  # the names Megatron's OptimizerConfig.optimizer and --optimizer take
MUON_NAME = "muonpower"  # Megatron-LM routes any name holding "muon" to its Muon, as wanted
DIST_MUON_NAME = "dist_muonpower"  # Megatron's dist_muon (Muon with the layer-wise distributed optimizer), powered
KNOWN_AS = {OPTIMIZER_NAME: "adam", MUON_NAME: "muon", DIST_MUON_NAME: "dist_muon"}  # ours -> what Megatron builds
OPTIMIZER_NAMES = tuple(KNOWN_AS)
MUON_NAMES = (MUON_NAME, DIST_MUON_NAME)
FIELDS = {entry.megatron_field: None for entry in POWER_NAMES.values()}  # the names of p, as OptimizerConfig fields
NAME_OF_FIELD = {entry.megatron_field: name for name, entry in POWER_NAMES.items()}  # 'gradpower_p' -> 'power'
CONFIG_FIELDS = {**FIELDS, blockwise.FIELD: None}  # every field OptimizerConfig gets (megatron_patches.blockwise)
# where megatron-core's TensorParallelMuon lives (it needs NVIDIA's emerging-optimizers): 0.18 on; 0.16-0.17
MUON_MODULES = ("megatron.core.optimizer.emerging_optimizers", "megatron.core.optimizer.muon")
_UNSUPPORTED_TORCH_OPTIONS = ("amsgrad", "maximize", "capturable", "differentiable")
FUSED_ADAM_MODULES = ("transformer_engine.pytorch.optimizers", "apex.optimizers")  # each with a FusedAdam

_log = logging.getLogger(__name__)


@contextlib.contextmanager
def named(holder, known: str):
    """While Megatron checks or builds what it knows: ``holder.optimizer`` (a config or Megatron-LM's args) is
    `known` (``'adam'``: AdamPower is Adam plus phi_p, and Megatron builds its Muon from an Adam config), and its
    own name again afterwards, also on an error."""
    name, holder.optimizer = holder.optimizer, known
    try:
        yield holder
    finally:
        holder.optimizer = name


def as_adam(holder):
    """``named(holder, 'adam')``."""
    return named(holder, "adam")


def family(optimizer: str) -> str:
    """The optimizer whose names of p `optimizer` takes (hyperparams.POWER_NAMES): dist_muonpower's are muonpower's."""
    return MUON_NAME if optimizer in MUON_NAMES else optimizer


def checked_powers(fields: Mapping[str, object], optimizer: str, owner: str = "",
                   label: Callable[[str], str] = str) -> dict[str, float]:
    """{name of p: value} for every name `optimizer` takes in Megatron (hyperparams.POWER_NAMES), from `fields`
    (OptimizerConfig field -> value, None meaning not set), validated with the defaults filled in: the one check
    of p for OptimizerConfig, Megatron-LM's flags and --gradpower-config (``label`` spells a field, and
    "optimizer", as the user wrote it). ValueError/TypeError naming it: a bad or missing required value, or a field
    set that `optimizer` does not take (saying which optimizers take it)."""
    prefix = f"{owner}: " if owner else ""
    taken = power_names(family(optimizer), "megatron")
    for field, value in fields.items():
        name = NAME_OF_FIELD[field]
        if value is not None and name not in taken:
            takers = [o for o, use in POWER_NAMES[name].uses.items() if "megatron" in use.stacks]
            raise ValueError(f"{prefix}{label(field)} has no effect unless {label('optimizer')} "
                             f"{' or '.join(takers)} (optimizer is {optimizer!r})")
    checked = check_settings({NAME_OF_FIELD[f]: v for f, v in fields.items()}, family(optimizer), "megatron",
                             owner=owner, label=lambda name: label(POWER_NAMES[name].megatron_field))
    return {name: checked[name] for name in taken}


def config_powers(config) -> dict[str, float]:
    """``checked_powers`` of an OptimizerConfig ("adampower": power, expert_power; "muonpower", "dist_muonpower":
    power, adam_power, expert_power), naming its fields."""
    return checked_powers({field: getattr(config, field, None) for field in FIELDS}, config.optimizer,
                          owner=f"OptimizerConfig(optimizer={config.optimizer!r})")


def muon_module():
    """The megatron-core module holding TensorParallelMuon and HAVE_EMERGING_OPTIMIZERS (MUON_MODULES), or None
    where this megatron-core has no Muon (before 0.16)."""
    for name in MUON_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "TensorParallelMuon"):
            return module
    return None


def muon_builds_muon() -> bool:
    """Whether megatron-core's get_megatron_muon_optimizer builds Muon itself (0.16, 0.17), rather than forwarding to
    get_megatron_optimizer (0.18 on) or not existing (before 0.16)."""
    module = muon_module()
    return module is not None and module.__name__ == "megatron.core.optimizer.muon"


def check_muon_available(optimizer: str = MUON_NAME) -> None:
    """RuntimeError, saying what to install, unless megatron-core's Muon is importable and usable here."""
    module = muon_module()
    if module is None:
        raise RuntimeError(f"OptimizerConfig(optimizer='{optimizer}') needs megatron-core's Muon (megatron-core 0.16 "
                           f"on), which this megatron-core lacks: pip install 'megatron-core>=0.16'")
    if not getattr(module, "HAVE_EMERGING_OPTIMIZERS", False):
        raise RuntimeError(f"OptimizerConfig(optimizer='{optimizer}') needs megatron-core's Muon, which needs NVIDIA's "
                           "emerging-optimizers package (Python >= 3.12): pip install emerging-optimizers")


def fused_adam_classes() -> tuple[type, ...]:
    """TE's and apex's FusedAdam, those imported (Megatron imports the one it builds with): the Adams besides
    torch's whose state ``_FusedPowerStep`` steps."""
    modules = (sys.modules.get(name) for name in FUSED_ADAM_MODULES)
    return tuple(module.FusedAdam for module in modules if module is not None and hasattr(module, "FusedAdam"))


class _PowerStep:
    """Mixin for an Adam class: step() applies phi_p to its grads (expert groups: the expert p) before Adam.

    ``gradpower`` = (dense p, expert p) is set by ``power_optimizer_class``.
    """

    gradpower: tuple[float, float] = (1.0, 1.0)

    def _group_powers(self) -> list[tuple[dict, float]]:
        dense_p, expert_p = self.gradpower
        return [(group, expert_p if group.get("is_expert_parallel", False) else dense_p)
                for group in self.param_groups]

    def _power_grads_in_place(self) -> None:
        """phi_p in place on every grad (``decoupled_grad`` for TE's FusedAdam and the precision-aware optimizer
        where it uses them): one pass, bounded scratch."""
        decoupled = getattr(self, "use_decoupled_grad", False)
        powered = 0
        for group, power in self._group_powers():
            grads = [getattr(p, "decoupled_grad", None) if decoupled else p.grad for p in group["params"]]
            grads = [g for g in grads if g is not None]
            grad_power_(grads, power)
            powered += len(grads) if power != 1.0 else 0
        self._log_first_step(powered)

    def _log_first_step(self, powered: int) -> None:
        if not getattr(self, "_gradpower_logged", False):  # shows in a job's log that the optimizer that steps is ours
            self._gradpower_logged = True
            _log.info("megatron_patches: GradPower step on %s: phi_p (p=%g, expert p=%g) on %d gradient(s)",
                      type(self).__name__, *self.gradpower, powered)


class _FusedPowerStep(FoldsIntoStep, _PowerStep):
    """For the Adams whose state we step in one pass through gradpower_ds.functional.adam_power (the Triton kernel
    on CUDA once it passed its check there, the native one on the CPU): torch.optim.Adam/AdamW, whose state holds a
    step per param, and TE's and apex's FusedAdam, which keep one ``group["step"]``. Their state
    and checkpoints stay theirs (``fused_adam_classes``). A FusedAdam setting whose state we do not step (``_unfused_reason``: master
    weights, capturable, non-fp32 moments or params) gets phi in place and its own step instead, as
    ``_PrePowerStep``, with one log line saying why. Megatron's clip coefficient may be folded into the step
    (``clip_grads_folded``)."""

    @torch.no_grad()
    def step(self, closure=None, *args, **kwargs):
        """AdamPower over every param with a grad; the class's own step when every group has p = 1."""
        groups = self._group_powers()
        if all(p == 1.0 for _, p in groups):
            return super().step(closure, *args, **kwargs)
        reason = self._unfused_reason()
        if reason is not None:
            if not getattr(self, "_gradpower_unfused_logged", False):
                self._gradpower_unfused_logged = True
                _log.info("megatron_patches: %s steps with phi_p in place, then its own step: %s", type(self).__name__,
                          reason)
            self._power_grads_in_place()
            return super().step(closure, *args, **kwargs)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, _ = self._take_folded()
        powered = 0
        for index, (group, power) in enumerate(groups):
            for option in _UNSUPPORTED_TORCH_OPTIONS:
                if group.get(option):
                    raise ValueError(f"Megatron AdamPower: the torch Adam option {option}=True is not supported")
            params = [p for p in group["params"] if self._grad(p) is not None]
            states = [self._init_moments(p) for p in params]
            beta1, beta2 = group["betas"]
            adam_power(params, [self._grad(p) for p in params], [s["exp_avg"] for s in states],
                       [s["exp_avg_sq"] for s in states], self._steps(index, group, params), lr=float(group["lr"]),
                       beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], power=power,
                       adam_w_mode=self._adam_w_mode(group), bias_correction=bool(group.get("bias_correction", True)),
                       grad_scale=grad_scale)
            powered += len(params)
        self._log_first_step(powered)
        return loss

    def can_fold(self) -> bool:
        """Whether the next step runs here (so it takes a folded grad scale): some group with p != 1, a layout we
        step."""
        return any(p != 1.0 for _, p in self._group_powers()) and self._unfused_reason() is None

    def _fused_adam(self) -> bool:
        return isinstance(self, fused_adam_classes())

    def _unfused_reason(self) -> str | None:
        """Why a FusedAdam's state is not ours to step (None: it is): settings with other state layouts."""
        if not self._fused_adam():
            return None
        for option in ("master_weights", "capturable", "store_param_remainders"):
            if getattr(self, option, False):
                return f"{option}=True keeps state AdamPower's kernel does not step"
        for option in ("exp_avg_dtype", "exp_avg_sq_dtype"):
            if getattr(self, option, torch.float32) != torch.float32:
                return f"{option}={getattr(self, option)} (AdamPower steps fp32 moments)"
        dtypes = {p.dtype for group in self.param_groups for p in group["params"]}
        if dtypes - {torch.float32}:
            return f"params of dtype {', '.join(sorted(map(str, dtypes - {torch.float32})))} (fp32 main params needed)"
        return None

    def _grad(self, param):
        return getattr(param, "decoupled_grad", None) if getattr(self, "use_decoupled_grad", False) else param.grad

    def _adam_w_mode(self, group) -> bool:
        if self._fused_adam():
            return bool(self.adam_w_mode)
        return bool(group.get("decoupled_weight_decay", isinstance(self, torch.optim.AdamW)))

    def _init_moments(self, param) -> dict:
        # the class's layout: torch's (Megatron's init_state_fn may have created the moments) or a FusedAdam's
        state = self.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _steps(self, index: int, group: dict, params: list) -> list[torch.Tensor]:
        """The step counters adam_power advances for `params`: torch's per-param state steps; for a FusedAdam, views
        of one counter tensor per group kept across steps (the Triton plan keys on them), set from its
        ``group["step"]`` before the step, which is advanced with them."""
        if not self._fused_adam():
            for param in params:
                if "step" not in self.state[param]:
                    fused = bool(group.get("fused"))
                    self.state[param]["step"] = torch.zeros((), dtype=torch.float32,
                                                            device=param.device if fused else None)
            return [self.state[p]["step"] for p in params]
        counters = self.__dict__.setdefault("_gradpower_steps", {})
        key = (index, *map(id, group["params"]))
        if key not in counters:
            base = torch.zeros(len(group["params"]), dtype=torch.float32)
            counters[key] = base, dict(zip(map(id, group["params"]), base.unbind()))
        (base, views), before = counters[key], group.get("step", 0)
        if not bool((base == before).all()):  # a first step, a checkpoint load, a param that had no grad
            base.fill_(before)
        group["step"] = before + 1
        return [views[id(p)] for p in params]


class _PrePowerStep(_PowerStep):
    """For optimizers we do not fuse into (TE/apex FusedAdam, Megatron's Muon): phi_p in place on the grads, then
    the class's own step."""

    def step(self, *args, **kwargs):
        """Powers every grad in place (one pass, bounded scratch), then steps."""
        self._power_grads_in_place()
        return super().step(*args, **kwargs)


@functools.cache
def power_optimizer_class(base: type, dense_p: float, expert_p: float) -> type:
    """The subclass of optimizer class `base` that applies phi with (dense p, expert p) before its step (AdamPower for
    an Adam); one class per triple."""
    fused = issubclass(base, (torch.optim.Adam, *fused_adam_classes()))  # torch's AdamW is an Adam
    mixin = _FusedPowerStep if fused else _PrePowerStep
    cls = type(f"{base.__name__}Power", (mixin, base), {"gradpower": (dense_p, expert_p), "__module__": __name__})
    # torch wraps a class's step (step pre/post hooks, profiling) when it builds the first instance; an
    # optimizer moved to this class after it was built must find the step wrapped already.
    cls.step = torch.optim.Optimizer.profile_hook_step(cls.step)
    cls.step.hooked = True
    return cls


_FOLDING: weakref.WeakSet = weakref.WeakSet()  # the inner optimizers given a fused step: clip_grads_folded's


def _give_power(inner, dense_p: float, expert_p: float) -> None:
    """Moves a built inner optimizer to its power class (power_optimizer_class); one with a fused step is
    registered for clip_grads_folded."""
    inner.__class__ = power_optimizer_class(type(inner), dense_p, expert_p)
    if isinstance(inner, _FusedPowerStep):
        _FOLDING.add(inner)


def clip_grads_folded(original):
    """megatron-core's clip_grad_by_total_norm_fp32 as its optimizers call it (``megatron.core.optimizer.optimizer``'s
    name for it, every version): where the params it clips are exactly the params with grads of one of our fused
    inner optimizers (``_FusedPowerStep.can_fold``), Megatron's coefficient is folded into that optimizer's next
    step (the kernel multiplies the grads it reads: no multi_tensor_scale pass over them), bit for bit as the
    scale. Megatron's own code computes the coefficient, on a one-element stand-in of the grads, so its formula
    (the 1e-6, the clamp, 0.19's tensor coefficient) holds. Any other call, or GRADPOWER_FOLD=0, is Megatron's."""

    @functools.wraps(original)
    def clip(parameters, max_norm, total_norm, use_decoupled_grad=False, *args, **kwargs):
        params = [parameters] if torch.is_tensor(parameters) else list(parameters)
        attribute = "decoupled_grad" if use_decoupled_grad else "grad"
        with_grads = [p for p in params if getattr(p, attribute, None) is not None]
        owner = _folding_owner(with_grads) if with_grads and folding.enabled() else None
        if owner is None:
            return original(params, max_norm, total_norm, use_decoupled_grad, *args, **kwargs)
        grad = getattr(with_grads[0], attribute)
        stand_in = torch.zeros(1, dtype=torch.float32, device=grad.device)
        setattr(stand_in, attribute, torch.ones(1, dtype=grad.dtype, device=grad.device))
        original([stand_in], max_norm, total_norm, use_decoupled_grad, *args, **kwargs)
        owner.fold_into_next_step(grad_scale=getattr(stand_in, attribute).float())
        return None

    return clip


def _folding_owner(params: list):
    """Our fused inner optimizer whose params with grads are exactly `params` and whose next step runs fused, or
    None."""
    wanted = {id(p) for p in params}
    for optimizer in list(_FOLDING):
        mine = {id(p) for group in optimizer.param_groups for p in group["params"] if optimizer._grad(p) is not None}
        if mine == wanted and optimizer.can_fold():
            return optimizer
    return None


def inner_optimizers(megatron_optimizer) -> list:
    """The torch optimizers inside a MegatronOptimizer (ChainedOptimizer, LayerWiseDistributedOptimizer: each
    chained one's); None-free."""
    if isinstance(megatron_optimizer, torch.optim.Optimizer):  # the layer-wise optimizer chains torch's directly
        return [megatron_optimizer]
    chained = getattr(megatron_optimizer, "chained_optimizers", None)
    if chained is not None:
        return [o for c in chained for o in inner_optimizers(c)]
    inner = getattr(megatron_optimizer, "optimizer", None)
    return [] if inner is None else [inner]


@contextlib.contextmanager
def _offload_classes(dense_p: float, expert_p: float):
    """While building with optimizer_cpu_offload: Megatron's CPU and GPU Adam classes replaced by AdamPower's."""
    import megatron.core.optimizer as mcore_optimizer

    saved = {name: getattr(mcore_optimizer, name) for name in ("Adam", "CPUAdam")}
    try:
        for name, cls in saved.items():
            setattr(mcore_optimizer, name, power_optimizer_class(cls, dense_p, expert_p))
        yield
    finally:
        for name, cls in saved.items():
            setattr(mcore_optimizer, name, cls)


def config_init(original):
    """OptimizerConfig.__init__ (and AdamOptimizerConfig's) taking the CONFIG_FIELDS (gradpower_p, ...) as
    keywords."""

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        # set before the dataclass __init__, whose __post_init__ validates them
        for name, default in CONFIG_FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        original(self, *args, **kwargs)

    return __init__


def config_post_init(original):
    """OptimizerConfig.__post_init__ validating the powers and the blockwise lr setting, and running Megatron's
    checks as for the optimizer ours steps as (KNOWN_AS: 'adam' for adampower, Muon for muonpower, whose Muon must
    be importable)."""

    @functools.wraps(original)
    def __post_init__(self):
        blockwise.multipliers(self)
        if self.optimizer not in OPTIMIZER_NAMES:
            return original(self)
        config_powers(self)
        if self.optimizer in MUON_NAMES:
            check_muon_available(self.optimizer)
        with named(self, KNOWN_AS[self.optimizer]):
            original(self)

    return __post_init__


_ADAM_POWER_BUILD: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "megatron_patches_adam_power_build", default=None)  # (dense p, expert p) while get_megatron_optimizer builds it


def build_optimizer_with_power(original):
    """get_megatron_optimizer (megatron-core's, and the name Megatron-LM imported) for our names, on every version.

    adampower: Megatron's build for 'adam' (megatron-core 0.18 on routes any other name to its emerging optimizers,
    which lose the DistributedOptimizer's sharding), with AdamPower's powers in effect for build_with_power, which
    gives each inner optimizer AdamPower's step. muonpower / dist_muonpower: Megatron's build for muon / dist_muon
    (megatron-core 0.18 on; before, Megatron refuses Muon here and builds it in get_megatron_muon_optimizer, wrapped by
    build_muon_with_power), then phi before each TensorParallelMuon's step and AdamPower for its chained Adams
    (power_muon)."""
    if getattr(original, "_gradpower_build", False):  # Megatron-LM imported the wrapped one: wrap once
        return original

    @functools.wraps(original)
    def build(config, model_chunks, config_overrides=None, *args, **kwargs):
        if config.optimizer == OPTIMIZER_NAME:
            with _building_adam_power(config):
                return original(config, model_chunks, config_overrides, *args, **kwargs)
        if config.optimizer in MUON_NAMES:  # before 0.18 Megatron refuses 'muon' here, as for its own Muon
            powers = config_powers(config)
            with named(config, KNOWN_AS[config.optimizer]):
                megatron_optimizer = original(config, model_chunks, config_overrides, *args, **kwargs)
            return power_muon(megatron_optimizer, powers)
        return original(config, model_chunks, config_overrides, *args, **kwargs)

    build._gradpower_build = True
    return build


@contextlib.contextmanager
def _building_adam_power(config):
    """While Megatron builds an adampower config: it is 'adam', its powers in effect for build_with_power; then its
    own name again."""
    powers = config_powers(config)
    token = _ADAM_POWER_BUILD.set((powers["power"], powers["expert_power"]))
    try:
        with named(config, KNOWN_AS[OPTIMIZER_NAME]):
            yield
    finally:
        _ADAM_POWER_BUILD.reset(token)


def build_with_power(original):
    """_get_megatron_optimizer_based_on_param_groups, while get_megatron_optimizer builds AdamPower (as 'adam'): the
    optimizer Megatron builds for 'adam', each inner torch optimizer then given AdamPower's step. An adampower config
    that reaches it directly (a get_megatron_optimizer bound before apply(), megatron-core before 0.18) is built
    the same way."""

    @functools.wraps(original)
    def build(config, *args, **kwargs):
        if config.optimizer == OPTIMIZER_NAME:
            with _building_adam_power(config):
                return build(config, *args, **kwargs)
        powers = _ADAM_POWER_BUILD.get()
        if powers is None or config.optimizer != KNOWN_AS[OPTIMIZER_NAME]:
            return original(config, *args, **kwargs)
        offload = _offload_classes(*powers) if config.optimizer_cpu_offload else contextlib.nullcontext()
        with offload:
            megatron_optimizer = original(config, *args, **kwargs)
        for inner in inner_optimizers(megatron_optimizer):
            if not isinstance(inner, _PowerStep) and not config.optimizer_cpu_offload:
                _give_power(inner, *powers)
        _log.info("megatron_patches: AdamPower (gradpower_p=%g, gradpower_p_expert=%g) on %s (%s)", *powers,
                  type(megatron_optimizer).__name__,
                  ", ".join(type(inner).__name__ for inner in inner_optimizers(megatron_optimizer)))
        return megatron_optimizer

    return build


def refuse_ours_on_the_emerging_path(original):
    """megatron-core's _get_megatron_emerging_optimizer (0.18 on), refusing our names with what to do: they reach it
    only through a get_megatron_optimizer bound before megatron_patches.apply() (there Megatron would say
    "Unsupported emerging optimizer")."""

    @functools.wraps(original)
    def build(config, *args, **kwargs):
        if config.optimizer in OPTIMIZER_NAMES:
            raise RuntimeError(
                f"megatron_patches: optimizer={config.optimizer!r} reached megatron-core's emerging-optimizer path, so "
                "the get_megatron_optimizer that built it was imported before megatron_patches.apply() (e.g. `from "
                "megatron.core.optimizer import get_megatron_optimizer` above the apply() call): call "
                "megatron_patches.apply() first, or call megatron.core.optimizer.get_megatron_optimizer(...)")
        return original(config, *args, **kwargs)

    return build


def power_muon(megatron_optimizer, powers: dict):
    """A Megatron Muon optimizer made MuonPower: each TensorParallelMuon moved to a subclass applying phi (power; the
    expert groups expert_power) before its own step, so phi comes before the momentum; each chained Adam to AdamPower
    (adam_power). Returns it."""
    muon_class = muon_module().TensorParallelMuon
    for inner in inner_optimizers(megatron_optimizer):
        if isinstance(inner, _PowerStep):
            continue
        dense, expert = (powers["power"], powers["expert_power"]) if isinstance(inner, muon_class) else \
            (powers["adam_power"], powers["adam_power"])
        _give_power(inner, dense, expert)
    _log.info("megatron_patches: MuonPower (gradpower_p=%g, gradpower_p_expert=%g, gradpower_p_adam=%g) on %s (%s)",
              powers["power"], powers["expert_power"], powers["adam_power"], type(megatron_optimizer).__name__,
              ", ".join(type(inner).__name__ for inner in inner_optimizers(megatron_optimizer)))
    return megatron_optimizer


def build_muon_with_power(original):
    """get_megatron_muon_optimizer (megatron-core 0.16 and 0.17, and the name Megatron-LM imported) building Megatron's
    Muon for muonpower / dist_muonpower (power_muon)."""
    if getattr(original, "_gradpower_muon", False):  # Megatron-LM imported the wrapped one: wrap once
        return original

    @functools.wraps(original)
    def build(config, *args, **kwargs):
        if config.optimizer not in MUON_NAMES:
            return original(config, *args, **kwargs)
        powers = config_powers(config)
        with as_adam(config):  # it sets config.optimizer = 'adam' itself; the name is ours again afterwards
            megatron_optimizer = original(config, *args, **kwargs)
        return power_muon(megatron_optimizer, powers)

    build._gradpower_muon = True
    return build


RESUME_FLAG = "--gradpower-resume-changes"  # its dest: gradpower_resume_changes (megatron_patches.arguments)
RESUME_FLAGS = {**{name: entry.megatron_flag for name, entry in POWER_NAMES.items()}, "betas":
                "--adam-beta1/--adam-beta2", "eps": "--adam-eps", "weight_decay": "--weight-decay", "lr": "--lr"}
"""The optimizer settings a Megatron checkpoint records (resume_settings) and a resume compares: setting -> its flag."""


def resume_settings(args) -> dict:
    """The run's optimizer settings a checkpoint keeps in its plain state, to compare at a resume (check_resume):
    the names of p of --optimizer (resolved, as config_powers), betas, eps, weight_decay and lr, JSON-ready.

    Megatron's own state does not hold them faithfully: p lives in the optimizer class, not its param groups, and
    the lr scheduler keeps the checkpoint's lr and weight decay, so a changed flag would otherwise pass unseen."""
    powers = config_powers(args) if args.optimizer in OPTIMIZER_NAMES else {}
    return {**powers, "betas": [float(args.adam_beta1), float(args.adam_beta2)], "eps": float(args.adam_eps),
            "weight_decay": float(args.weight_decay), "lr": float(args.lr)}


def check_resume(saved: Mapping[str, object], args) -> dict[str, tuple]:
    """{setting: (checkpoint value, this run's)} for each setting of resume_settings(args) that differs from a
    checkpoint's `saved` ones (a setting it lacks is no change), under the resume policy
    (``gradpower_ds.hyperparams.RESUME_POLICY``): ValueError naming each flag and both values unless
    ``--gradpower-resume-changes apply``; with it the changes are returned, for the caller to apply, and a warning
    names each old -> new."""
    now = resume_settings(args)
    changes = resume_changes_between(saved, now, tuple(now))
    listed = "; ".join(f"{RESUME_FLAGS.get(key, key)} {old} (checkpoint) -> {new} (this run)"
                       for key, (old, new) in changes.items())
    if changes and args.gradpower_resume_changes != "apply":
        raise ValueError(f"--load: the checkpoint was saved with other optimizer settings: {listed}. Pass "
                         f"{RESUME_FLAG} apply to train on with this run's values, or resume with the checkpoint's")
    if changes:
        _log.warning("megatron_patches: %s apply: this run's optimizer settings replace the checkpoint's: %s",
                     RESUME_FLAG, listed)
    return changes


def apply_resume_changes(changes: Mapping[str, tuple], args, optimizer, scheduler) -> None:
    """Puts the changes check_resume allowed into effect after a load: lr and weight decay into Megatron's lr
    scheduler (which had restored the checkpoint's) and each param group's max_lr (--lr times the group's lr_mult,
    so blockwise multiples hold), betas and eps into every param group of the inner torch optimizers. The names of
    p need nothing: the optimizer was built with this run's."""
    if "lr" in changes:
        scheduler.max_lr = float(args.lr)
        for group in scheduler.optimizer.param_groups:
            if "max_lr" in group:
                group["max_lr"] = float(args.lr) * group.get("lr_mult", 1.0)
    if "weight_decay" in changes:
        scheduler.start_wd = scheduler.end_wd = float(args.weight_decay)
    for inner in inner_optimizers(optimizer):
        for group in inner.param_groups:
            if "betas" in changes and "betas" in group:
                group["betas"] = (float(args.adam_beta1), float(args.adam_beta2))
            if "eps" in changes and "eps" in group:
                group["eps"] = float(args.adam_eps)
    if "lr" in changes or "weight_decay" in changes:
        scheduler.step(0)  # each group's lr and weight decay for the current iteration, from the new values
