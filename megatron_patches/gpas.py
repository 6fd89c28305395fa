"""GPAS in megatron-core transformer layers: ``apply_gpas(model)`` / ``remove_gpas(model)``.

Nothing here runs on ``megatron_patches.apply()``: GPAS changes the model, so it
is asked for explicitly, per model, after the model is built and *before* it is
wrapped in Megatron's ``DistributedDataParallel`` / ``Float16Module`` and before
the optimizer is built (DDP allocates grad buffers for the parameters it sees).

Design (megatron-core in ``megatron_patches.SUPPORTED_MEGATRON_CORE``): every
``TransformerLayer`` (dense) and ``MoETransformerLayer`` gets

- a submodule ``gpas_gate`` = ``gradpower_ds.gpas.GPASGate`` (alpha of shape [1],
  init 0, so the gate is an exact identity at init with act="silu"), one per
  layer, shared by both residual adds (as ``gradpower_ds.jobs.model`` and
  ``gradpower_ds.gpas`` place it for Pre-LN);
- instance attributes ``self_attn_bda`` / ``mlp_bda`` that wrap the layer's own
  bias-dropout-add functions and apply the gate to their result. These two calls
  are exactly the residual adds in ``TransformerLayer._forward_attention`` and
  ``_forward_post_mlp`` (which ``MoETransformerLayer._forward_mlp_postprocess``
  also reaches). Megatron's classes are not modified;
- a forward pre-hook that records whether gradients are enabled when the layer's
  forward starts. Megatron runs every bias-dropout-add under ``torch.enable_grad()``,
  so a learnable alpha would make each layer output of a ``torch.no_grad()``
  evaluation carry an autograd graph (and keep a hidden state alive). Where the
  layer's forward ran without grad, the gate uses a detached alpha (same values,
  no graph). Neither ``x.requires_grad`` (false after frozen parameters) nor
  ``self.training`` (eval with grad) decides this. Megatron's reentrant activation
  recomputation calls the layer again under ``enable_grad`` in backward, so the
  hook sees that call too and alpha gets its gradient. (A caller that runs the
  layer's forward without ``__call__`` skips the hook; the refused MoE/EP overlap
  schedule is one.)

The gate parameter: 1-D, so megatron's standard weight-decay rule
(``get_standard_config_overrides``: ``len(param.shape) == 1`` or ``*.bias`` -> ``wd_mult=0``)
puts it in the no-weight-decay group; ``sequence_parallel`` is set to the
layer's ``config.sequence_parallel``, as megatron does for LayerNorm weights, so
``finalize_model_grads`` all-reduces its gradient across tensor-parallel ranks
under sequence parallelism (without it every TP rank sees the same full hidden
states and computes the same gradient). It is a dense (non-expert) parameter:
DDP averages it over the whole data-parallel group. It is created in the dtype
and on the device of the layer's other parameters, like a LayerNorm weight
(Megatron's mixed-precision optimizer keeps its fp32 master copy); the gate
value act(alpha) is always computed in fp32 (``gradpower_ds.gpas.gpas_scale``).

Refused with ``GPASUnsupportedError`` naming the config flag (never silently
skipped): CUDA graphs (``cuda_graph_impl`` != "none", ``enable_cuda_graph``,
``external_cuda_graph``: a replay skips Python-level wrappers), the fine-grained
MoE/EP overlap (``overlap_moe_expert_parallel_comm``: its own schedule of the
layer's pieces, not verified), the fused TP inference kernel
(``inference_fuse_tp_communication``: the residual add moves into attention/MLP
and the bda is skipped), layers with real cross-attention (a third residual
add), bda functions that are modules (e.g. ``IdentityFuncOp`` no-op blocks),
layers already wrapped by megatron DDP (their parameters have ``main_grad``),
and models with no TransformerLayer or with other layer kinds in
``decoder.layers`` (e.g. Mamba).
"""

from __future__ import annotations

import torch
from torch import nn

from gradpower_ds.gpas import ACTIVATIONS, GPASGate

from .patches import PATCHES

GATE = "gpas_gate"
_ORIGINALS = "_gpas_original_bda"  # on a layer: {"self_attn_bda": fn, "mlp_bda": fn}
_HOOK = "_gpas_grad_mode_hook"  # on a layer: the RemovableHandle of its _GradMode pre-hook
_BDAS = ("self_attn_bda", "mlp_bda")
REFUSED_FLAGS = {  # TransformerConfig field (= Megatron-LM arg dest) -> (the only value GPAS allows, why)
    "cuda_graph_impl": ("none", "CUDA graph replay skips the Python-level GPAS gate"),
    "enable_cuda_graph": (False, "CUDA graph replay skips the Python-level GPAS gate"),
    "external_cuda_graph": (False, "CUDA graph replay skips the Python-level GPAS gate"),
    "overlap_moe_expert_parallel_comm": (False, "the fine-grained MoE/EP overlap schedule is not verified with GPAS"),
    "inference_fuse_tp_communication": (False, "the fused TP inference kernel does the residual add inside "
                                               "attention/MLP, so the gate would be skipped"),
}


class GPASUnsupportedError(RuntimeError):
    """GPAS cannot be placed reliably in this megatron-core model/configuration."""


def _transformer_layers(model_or_layers) -> list:
    from megatron.core.transformer.transformer_layer import TransformerLayer

    PATCHES.check_version()
    items = list(model_or_layers) if isinstance(model_or_layers, (list, tuple, nn.ModuleList)) else [model_or_layers]
    layers = []
    for item in items:
        if type(item).__name__ == "DistributedDataParallel" or hasattr(item, "ddp_config"):
            raise GPASUnsupportedError("apply_gpas/remove_gpas: got a megatron DistributedDataParallel; call it on "
                                       "the model before wrapping it (DDP allocates grad buffers at construction)")
        decoder_layers = getattr(getattr(item, "decoder", None), "layers", None)
        if decoder_layers is not None:
            other = {type(m).__name__ for m in decoder_layers if not isinstance(m, TransformerLayer)}
            if other:
                raise GPASUnsupportedError(f"GPAS: decoder.layers holds {sorted(other)}, which are not megatron "
                                           "TransformerLayers; GPAS placement is defined for TransformerLayer only")
        layers += [m for m in item.modules() if isinstance(m, TransformerLayer)]
    if not layers:
        raise GPASUnsupportedError("GPAS: no megatron-core TransformerLayer found in "
                                   f"{[type(i).__name__ for i in items]}")
    return layers


def refused_settings(settings) -> list:
    """(name, value, allowed value, why) for each REFUSED_FLAGS setting of `settings` that GPAS cannot run with.

    `settings` is a TransformerConfig or Megatron-LM's parsed args (same names), so a command line can be
    refused at parse time, before any model is built.
    """
    return [(name, getattr(settings, name), allowed, why) for name, (allowed, why) in REFUSED_FLAGS.items()
            if getattr(settings, name, allowed) != allowed]


def _check_layer(layer) -> None:
    from megatron.core.transformer.identity_op import IdentityOp

    for flag, value, allowed, why in refused_settings(layer.config):
        raise GPASUnsupportedError(f"GPAS is not supported with TransformerConfig.{flag}={value!r} ({why}); "
                                   f"set {flag}={allowed!r}")
    if not isinstance(layer.cross_attention, IdentityOp):
        raise GPASUnsupportedError(f"GPAS: {type(layer).__name__} {layer.layer_number} has cross-attention "
                                   f"({type(layer.cross_attention).__name__}); only decoder-only layers are supported")
    for name in _BDAS:
        fn = layer.__dict__.get(name)
        if fn is None or isinstance(fn, nn.Module) or not callable(fn):
            raise GPASUnsupportedError(f"GPAS: {type(layer).__name__}.{name} is {type(fn).__name__}, not a "
                                       "bias-dropout-add function (e.g. an IdentityFuncOp no-op block)")
    for param in layer.parameters():
        if hasattr(param, "main_grad"):
            raise GPASUnsupportedError("GPAS: the layer's parameters already have main_grad (megatron DDP wraps "
                                       "this model); call apply_gpas before DistributedDataParallel")


class _GradMode:
    """Forward pre-hook: whether grad was enabled when the layer's forward started, i.e. outside
    Megatron's torch.enable_grad() around the bias-dropout-add."""

    enabled = True

    def __call__(self, layer, args):
        self.enabled = torch.is_grad_enabled()


def _gated_bda(original, gate, grad_mode):
    def bda(training, fused):
        inner = original(training, fused)

        def bias_dropout_add_gpas(x_with_bias, residual, prob):
            return gate(inner(x_with_bias, residual, prob), detach_alpha=not grad_mode.enabled)

        return bias_dropout_add_gpas

    return bda


def apply_gpas(model_or_layers, act: str = "silu", learnable: bool = True) -> list:
    """Adds one GPAS gate to every megatron TransformerLayer (dense or MoE) of a model, or of a list of
    layers/models; idempotent (a layer that has a gate keeps it). Returns the gates' layers."""
    if act not in ACTIVATIONS:
        raise ValueError(f"apply_gpas: unknown act={act!r}; choose one of {sorted(ACTIVATIONS)}")
    layers = _transformer_layers(model_or_layers)
    for layer in layers:
        if _ORIGINALS not in layer.__dict__:
            _check_layer(layer)
    for layer in layers:
        if _ORIGINALS in layer.__dict__:
            continue
        like = next(layer.parameters(), None)
        gate = GPASGate(act, learnable)
        if like is not None:
            gate = gate.to(device=like.device, dtype=like.dtype)
        if learnable:
            gate.alpha.sequence_parallel = bool(layer.config.sequence_parallel)
        layer.add_module(GATE, gate)
        grad_mode = _GradMode()
        layer.__dict__[_HOOK] = layer.register_forward_pre_hook(grad_mode)
        layer.__dict__[_ORIGINALS] = {name: layer.__dict__[name] for name in _BDAS}
        for name in _BDAS:
            layer.__dict__[name] = _gated_bda(layer.__dict__[name], gate, grad_mode)
    return layers


def remove_gpas(model_or_layers) -> list:
    """Undoes apply_gpas: removes the gates and their pre-hooks and restores the layers' own bias-dropout-add
    (no-op where absent)."""
    layers = _transformer_layers(model_or_layers)
    for layer in layers:
        originals = layer.__dict__.pop(_ORIGINALS, None)
        if originals is None:
            continue
        layer.__dict__.update(originals)
        layer.__dict__.pop(_HOOK).remove()
        del layer._modules[GATE]
    return layers
