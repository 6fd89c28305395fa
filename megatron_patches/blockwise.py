"""Blockwise learning rates in megatron-core: ``OptimizerConfig(gradpower_blockwise_lr=True)`` (or a dict of
multipliers over the paper's), with ``optimizer`` 'adam' or 'adampower'.

The blocks and multipliers are ``gradpower_ds.blockwise``'s. ``megatron_patches.apply()`` wraps two functions:

1. ``megatron.core.optimizer._get_param_groups`` (which every ``get_megatron_optimizer`` call, Megatron-LM's
   included, goes through) adds to the config overrides, megatron-core's own per-parameter mechanism, one
   ``ParamKey`` per block giving ``max_lr = lr x m`` and ``min_lr = min_lr x m``. Its
   ``OptimizerParamScheduler`` sets each group's lr from those, so warmup (from ``lr_warmup_init`` 0, the
   default), decay and WSD keep the ratios; the caller's overrides (None: Megatron's standard ones, no weight
   decay for biases and 1-D parameters) are kept. The override also sets ``lr_mult = m``, which megatron-core
   0.16 does not multiply by but uses (with ``wd_mult`` and the expert flag) to match a checkpoint's param
   groups to the model's on a resume: without it the blocks' groups would be confused and get each other's
   max_lr.
2. ``_get_megatron_optimizer_based_on_param_groups`` then handles the weight that holds Q, K and V together,
   ``linear_qkv``: per query group its rows are (heads per group x head dim) Q rows, then head dim K rows and
   head dim V rows, so one param group cannot give them their blocks' lrs. It stays in a base-lr group, and its
   inner torch optimizer moves to a subclass of its own class (as AdamPower's step does) whose step scales the
   change it made to those rows of the fp32 main parameters by the rows' multipliers (qk for Q and K, vo for V):
   ``main = old + m_row x (new - old)`` (one ``torch.lerp``). For Adam(W) (and AdamPower), whose update
   including the decoupled weight decay is proportional to the lr with the moments independent of it, that is
   exactly a per-row lr.
   It works on the main parameters of the FP32, Float16 and distributed optimizers (there on this rank's
   shard of the rows); it costs one copy of those main parameters during the step.

Refused, with an error naming the setting: Muon/MuonPower and SGD, ``decoupled_lr`` (it sets the embedding's
and output layer's max_lr too), ``optimizer_cpu_offload`` and the precision-aware optimizer (their main
parameters live elsewhere), megatron-core before 0.16 (no config overrides), and a model with a parameter no
rule places (``gradpower_ds.blockwise.classify``).
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

from gradpower_ds.blockwise import FUSED_QKV, block_of, classify, resolve_multipliers

FIELD = "gradpower_blockwise_lr"  # OptimizerConfig's field: None/False off, True the paper's, {block: m} overrides
BLOCKWISE_OPTIMIZERS = ("adam", "adampower")
ROWS_ATTR = "_gradpower_row_multipliers"  # on a linear_qkv parameter: the multiplier of each of its rows

_log = logging.getLogger(__name__)


def multipliers(config) -> dict[str, float] | None:
    """The blockwise multipliers of an OptimizerConfig (None: off), validated: ValueError naming the field."""
    value = getattr(config, FIELD, None)
    if value is None or value is False:
        return None
    where = f"OptimizerConfig.{FIELD}"
    if value is not True and not isinstance(value, dict):
        raise ValueError(f"{where}={value!r} must be true, false or a JSON object of multipliers per block")
    if config.optimizer not in BLOCKWISE_OPTIMIZERS:
        raise ValueError(f"{where} works with optimizer {' or '.join(BLOCKWISE_OPTIMIZERS)}, not "
                         f"{config.optimizer!r} (Muon builds its own param groups)")
    for name, why in (("decoupled_lr", "it sets the embedding's and output layer's lr too"),
                      ("optimizer_cpu_offload", "the offloaded main parameters are not reachable"),
                      ("use_precision_aware_optimizer", "its main parameters live inside the fused optimizer")):
        if getattr(config, name, None) not in (None, False):
            raise ValueError(f"{where} cannot be combined with {name}={getattr(config, name)!r}: {why}")
    try:
        importlib.import_module("megatron.core.optimizer.optimizer_config").ParamKey
    except AttributeError:
        raise ValueError(f"{where} needs megatron-core 0.16 or newer (config overrides per parameter)") from None
    try:
        return resolve_multipliers(None if value is True else value)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def row_multipliers(attention, factors: dict[str, float]) -> torch.Tensor:
    """The multiplier of each row of ``attention.linear_qkv`` (this tensor-parallel rank's rows)."""
    groups = attention.num_query_groups_per_partition
    head_dim = attention.hidden_size_per_attention_head
    q_heads = attention.num_attention_heads_per_partition // groups
    rows = attention.linear_qkv.weight.shape[0]
    if rows != groups * (q_heads + 2) * head_dim:
        raise ValueError(f"blockwise lr: linear_qkv has {rows} rows, not {groups} query groups x ({q_heads} Q + K + "
                         f"V heads) x {head_dim}: a Q/K/V layout it does not know (e.g. fewer query groups than "
                         "tensor-parallel ranks)")
    per_group = torch.tensor([factors["qk"]] * ((q_heads + 1) * head_dim) + [factors["vo"]] * head_dim)
    return per_group.repeat(groups)


def param_groups_with_blockwise(original):
    """_get_param_groups with each block's max_lr/min_lr added to the config overrides, and the linear_qkv
    parameters tagged with their rows' multipliers (ROWS_ATTR)."""

    @functools.wraps(original)
    def get_param_groups(model_chunks, config, config_overrides, *args, **kwargs):
        factors = multipliers(config)
        if factors is None:
            return original(model_chunks, config, config_overrides, *args, **kwargs)
        from megatron.core.optimizer import get_standard_config_overrides
        from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

        for chunk in model_chunks:
            classify(chunk.named_parameters())  # ValueError naming any parameter no rule places
            for module in chunk.modules():
                if hasattr(module, "linear_qkv") and hasattr(module, "num_query_groups_per_partition"):
                    rows = row_multipliers(module, factors)
                    for param in (module.linear_qkv.weight, getattr(module.linear_qkv, "bias", None)):
                        if isinstance(param, torch.nn.Parameter) and param.requires_grad:
                            setattr(param, ROWS_ATTR, rows)
        overrides = dict(get_standard_config_overrides(config) if config_overrides is None else config_overrides)
        for block, factor in factors.items():
            predicate = ParamWithNamePredicate(name=f"gradpower_blockwise_{block}",
                                               fn=lambda param, name, block=block: block_of(name, param) == block)
            overrides[ParamKey(with_name_predicate=predicate)] = {
                "max_lr": config.lr * factor, "min_lr": None if config.min_lr is None else config.min_lr * factor,
                "lr_mult": factor}
        _log.info("megatron_patches: blockwise lr, multipliers %s (%s: per row)", factors, FUSED_QKV)
        return original(model_chunks, config, overrides, *args, **kwargs)

    return get_param_groups


def _main_params(megatron_optimizer):
    """(model parameter, its fp32 main parameter, the model parameter's flat range that main holds or None) of a
    Megatron optimizer (distributed, Float16 or FP32); TypeError for another kind."""
    opt = megatron_optimizer
    if hasattr(opt, "shard_fp32_from_float16_groups"):  # DistributedOptimizer: this rank's shards
        for models, mains in zip(opt.model_float16_groups + opt.model_fp32_groups,
                                 opt.shard_fp32_from_float16_groups + opt.shard_fp32_groups):
            for model, main in zip(models, mains):
                span = opt._get_model_param_range_map(model)["param"]
                yield model, main, (span.start, span.end)
    elif hasattr(opt, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params
        for models, mains in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            yield from ((model, main, None) for model, main in zip(models, mains))
        yield from ((p, p, None) for group in opt.fp32_from_fp32_groups for p in group)
    elif type(opt).__name__ == "FP32Optimizer":
        yield from ((p, p, None) for group in opt.optimizer.param_groups for p in group["params"])
    else:
        raise TypeError(f"blockwise lr: {type(opt).__name__} is not a Megatron optimizer whose main parameters it "
                        "knows (distributed, Float16 or FP32)")


class _RowLRStep:
    """Marks an inner optimizer whose step scales the change of its ``_row_scales`` main parameters per row."""

    _row_scales: list  # (main parameter, per-element multiplier of the same shape)

    def step(self, *args, **kwargs):
        with torch.no_grad():
            before = [main.detach().clone() for main, _ in self._row_scales]
        result = super().step(*args, **kwargs)
        with torch.no_grad():
            for (main, scale), old in zip(self._row_scales, before):
                torch.lerp(old, main, scale, out=main)  # old + scale * (new - old), one pass
        return result


@functools.cache
def row_lr_class(base: type) -> type:
    """`base` (an inner torch optimizer class) with _RowLRStep's step around its own."""
    return type(f"RowLR{base.__name__}", (_RowLRStep, base), {})


def build_with_row_lrs(original):
    """_get_megatron_optimizer_based_on_param_groups, then the per-row lrs of the linear_qkv parameters among its
    param groups (moving its inner optimizer to row_lr_class)."""

    @functools.wraps(original)
    def build(config, *args, **kwargs):
        megatron_optimizer = original(config, *args, **kwargs)
        if multipliers(config) is None:
            return megatron_optimizer
        scales = []
        for model, main, span in _main_params(megatron_optimizer):
            rows = getattr(model, ROWS_ATTR, None)
            if rows is not None:
                flat = rows.repeat_interleave(model[0].numel() if model.dim() > 1 else 1)
                flat = flat if span is None else flat[span[0]:span[1]]
                scales.append((main, flat.to(main.device, main.dtype).view(main.shape)))
        if scales:
            inner = megatron_optimizer.optimizer
            if not isinstance(inner, _RowLRStep):
                inner.__class__ = row_lr_class(type(inner))
            inner._row_scales = scales
            _log.info("megatron_patches: blockwise lr: per-row lrs for %d linear_qkv parameters on %s (%s)",
                      len(scales), type(megatron_optimizer).__name__, type(inner).__name__)
        return megatron_optimizer

    return build
