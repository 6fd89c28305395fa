"""Blockwise learning rates: each kind of block trains at its own multiple of the base lr.

The GradPower paper (arXiv 2505.24275, Section 3.4) composes AdamPower with Blockwise LR
(Wang et al., code: Wongboo/BlockwiseLearningRate); ``BLOCK_MULTIPLIERS`` are that
code's multipliers. A parameter's block comes from its name (``block_of``), for this
project's CausalLM, Hugging Face LLaMA / Qwen2 / Qwen2-MoE / Mixtral decoders and
megatron-core's GPTModel:

    norm        any module named *norm* (RMSNorm/LayerNorm, TE's fused ``layer_norm_weight``)   1x
    embedding   embed, embed_tokens, word_embeddings, position_embeddings                      10x
    lm_head     lm_head, output_layer                                                            1x
    qk          q_proj, k_proj                                                                   8x
    vo          v_proj, o_proj, linear_proj (megatron's attention output)                        4x
    ffn         everything under mlp: MLPs, experts, routers                                  6x
    gpas_gate   GPAS gates (found by their mark, not their name; no weight decay)                1x

Q, K and V stacked in one weight (megatron-core's ``linear_qkv``) are block ``"qkv"``:
its rows belong to qk and vo, and a param group has one lr, so ``blockwise_param_groups``
refuses it; ``megatron_patches.blockwise`` scales those rows' updates instead.
A name that matches no rule is an error naming it, never a silent 1x.
"""

from __future__ import annotations

import math
from numbers import Real

from .gpas import GATE_ATTR

BLOCK_MULTIPLIERS = {"embedding": 10.0, "qk": 8.0, "ffn": 6.0, "vo": 4.0, "norm": 1.0, "lm_head": 1.0,
                     "gpas_gate": 1.0}
FUSED_QKV = "qkv"  # the block of a weight holding Q, K and V rows
LR_MULTIPLIER_KEY = "lr_multiplier"  # each blockwise param group's multiplier (DeepSpeed's scheduler check reads it)
# name components that place a parameter in a block, in the order they are tried (the first match wins)
_RULES = (
    ("embedding", ("embed", "embed_tokens", "word_embeddings", "position_embeddings")),
    ("lm_head", ("lm_head", "output_layer")),
    (FUSED_QKV, ("linear_qkv",)),
    ("qk", ("q_proj", "k_proj")),
    ("vo", ("v_proj", "o_proj", "linear_proj")),
    ("ffn", ("mlp",)),
)


def block_of(name: str, param=None) -> str | None:
    """The block of the parameter named `name` (any prefix, e.g. ``module.``), or None when no rule matches.

    Norms are tried first (a norm's weight inside an attention or MLP module, such as TE's fused
    ``linear_qkv.layer_norm_weight``, is a norm); a GPAS gate (marked ``param``) is ``"gpas_gate"``.
    """
    if param is not None and getattr(param, GATE_ATTR, False):
        return "gpas_gate"
    parts = name.split(".")
    if any("norm" in part for part in parts[:-1]) or parts[-1].startswith("layer_norm_"):
        return "norm"
    return next((block for block, keys in _RULES if any(part in keys for part in parts)), None)


def resolve_multipliers(multipliers: dict | None = None) -> dict[str, float]:
    """BLOCK_MULTIPLIERS updated with `multipliers`; ValueError naming an unknown block or a value that is not a
    finite number > 0."""
    resolved = dict(BLOCK_MULTIPLIERS)
    for block, value in (multipliers or {}).items():
        if block not in BLOCK_MULTIPLIERS:
            raise ValueError(f"blockwise lr: unknown block {block!r} in the multipliers; the blocks are "
                             f"{sorted(BLOCK_MULTIPLIERS)}")
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"blockwise lr: the multiplier of block {block!r} is {value!r}; it must be a finite "
                             "number > 0 (1.0: the base lr)")
        resolved[block] = float(value)
    return resolved


def classify(named_parameters) -> dict[str, str]:
    """{name: block} of the trainable parameters; ValueError naming the ones no rule places."""
    blocks, unknown = {}, []
    for name, param in named_parameters:
        if param.requires_grad:
            block = block_of(name, param)
            if block is None:
                unknown.append(name)
            else:
                blocks[name] = block
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ValueError(f"blockwise lr: no block for {shown}; the rules know the names of this project's "
                         "CausalLM, Hugging Face LLaMA/Qwen2/Qwen2-MoE/Mixtral and megatron-core's GPTModel "
                         "(gradpower_ds.blockwise); build the param groups yourself for other models")
    return blocks


def blockwise_param_groups(model, base_lr: float, multipliers: dict | None = None, weight_decay: float = 0.0,
                           **group_options) -> list[dict]:
    """Optimizer param groups, one per block, each with ``lr = base_lr * multiplier`` (and LR_MULTIPLIER_KEY).

    Pass them to any torch optimizer or as ``model_parameters`` to ``deepspeed.initialize``: each group has a
    unique "name", so DeepSpeed's MoE split copies it (lr included) for the expert parameters; GPAS gates get
    no weight decay, every other block `weight_decay`. An lr scheduler must scale each group's lr (LambdaLR,
    DeepSpeed's WarmupCosineLR; ``gradpower_ds.deepspeed.register()`` makes DeepSpeed's schedulers refuse to
    set lrs that lose the ratios). group_options (e.g. betas) go to every group.
    """
    if not base_lr > 0:
        raise ValueError(f"blockwise lr: base_lr={base_lr!r} must be > 0")
    factors = resolve_multipliers(multipliers)
    blocks = classify(model.named_parameters())
    fused = [name for name, block in blocks.items() if block == FUSED_QKV]
    if fused:
        raise ValueError(f"blockwise lr: {fused[0]} holds Q, K and V rows, whose blocks differ (qk, vo), and a param "
                         "group has one lr; with megatron-core use its blockwise_lr setting (megatron_patches), "
                         "which scales those rows' updates, or split the weight into q/k/v parameters")
    members = {}
    for name, param in model.named_parameters():
        if name in blocks:
            members.setdefault(blocks[name], []).append(param)
    return [dict(name=f"blockwise_{block}", params=members[block], lr=base_lr * factor,
                 weight_decay=0.0 if block == "gpas_gate" else weight_decay, **{LR_MULTIPLIER_KEY: factor},
                 **group_options)
            for block, factor in factors.items() if block in members]


def check_scheduled_lrs(param_groups, tolerance: float = 1e-6) -> None:
    """Raises ValueError when the groups that carry LR_MULTIPLIER_KEY no longer have lrs in the ratios of their
    multipliers (an lr scheduler set one lr for all of them)."""
    tagged = [g for g in param_groups if LR_MULTIPLIER_KEY in g]
    bases = [float(g["lr"]) / g[LR_MULTIPLIER_KEY] for g in tagged]
    if bases and max(bases) - min(bases) > tolerance * max(abs(b) for b in bases):
        shown = ", ".join(f"{g.get('name', i)}: {float(g['lr']):.3g} (x{g[LR_MULTIPLIER_KEY]:g})"
                          for i, g in enumerate(tagged))
        raise ValueError(f"blockwise lr: the lr scheduler set lrs that lose the blockwise multipliers ({shown}). "
                         "DeepSpeed's WarmupLR/WarmupDecayLR with a warmup_max_lr (or a warmup_min_lr > 0) and "
                         "OneCycle/LRRangeTest give every group the same lr (and DeepSpeed 0.16's WarmupCosineLR "
                         "sets only the first group's lr before its first step; fixed by 0.19.8); use "
                         "WarmupCosineLR, WarmupLR without warmup_max_lr and with warmup_min_lr 0, or pass "
                         "lr_scheduler to deepspeed.initialize (e.g. a torch LambdaLR, which scales each group's lr)")


def base_lr(param_groups) -> float:
    """The lr that a multiplier of 1 gets now: the first group's lr over its multiplier (its lr without blockwise
    groups), e.g. for logging the schedule."""
    group = param_groups[0]
    return float(group["lr"]) / group.get(LR_MULTIPLIER_KEY, 1.0)
