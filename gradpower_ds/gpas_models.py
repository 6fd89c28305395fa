"""apply_gpas / remove_gpas: GPAS gates on models users train.

Supported: this project's gradpower_ds.model.CausalLM (every norm placement,
dense or with DeepSpeed MoE layers), and Hugging Face LLaMA, Qwen2, Qwen2-MoE
and Mixtral decoder layers (transformers 5.x, Pre-LN). A CausalLM layer already
has the gate's place in its forward (as built with ModelConfig(gpas=True)):
apply_gpas sets its `gpas_gate` (and cfg.gpas), remove_gpas clears it. For
Hugging Face layers the patch is thin and reversible: each decoder layer gets a
`gpas_gate` submodule and an instance `forward` that is the library's own
Pre-LN forward with the gate after each residual add; remove_gpas deletes both.
"""

from __future__ import annotations

import types

from torch import nn

from .gpas import ACTIVATIONS, VARIANTS, GPASGate
from .model import CausalLM

HF_LAYER_CLASSES = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen2MoeDecoderLayer", "MixtralDecoderLayer")
HF_MAJOR = 5  # the decoder-layer structure below was checked against transformers 5.23
_PATCHED = "_gpas_patched"


def _hf_pre_ln_gpas_forward(self, hidden_states, **kwargs):
    """The Hugging Face Pre-LN decoder layer with a GPAS gate after each residual add."""
    residual = hidden_states
    attn_out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    hidden_states = self.gpas_gate(residual + attn_out)
    residual = hidden_states
    hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
    return self.gpas_gate(residual + hidden_states)


def _hf_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in HF_LAYER_CLASSES]


def _check_transformers() -> None:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major != HF_MAJOR:
        raise RuntimeError(f"apply_gpas: Hugging Face models are supported with transformers {HF_MAJOR}.x "
                           f"(checked on 5.23); found {transformers.__version__}")


def apply_gpas(model: nn.Module, variant: str | None = None, act: str = "silu", learnable: bool = True) -> nn.Module:
    """Adds one GPAS gate per decoder layer (in place; idempotent) and returns the model.

    variant: the model's layer-norm placement. For CausalLM it must match its
    `norm` (None = use it); Hugging Face models are Pre-LN ("pre_ln").
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"apply_gpas: unknown act={act!r}; choose one of {sorted(ACTIVATIONS)}")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"apply_gpas: unknown variant={variant!r}; choose one of {VARIANTS}")
    if isinstance(model, CausalLM):
        if variant is not None and variant != model.cfg.norm:
            raise ValueError(f"apply_gpas: this CausalLM is built with norm={model.cfg.norm!r}; the gate placement "
                             f"follows it, so pass variant={model.cfg.norm!r} (or None)")
        for layer in model.layers:
            if layer.gpas_gate is None:
                layer.gpas_gate = GPASGate(act, learnable).to(layer.norm1.weight.device)
        model.cfg.gpas, model.cfg.gpas_act, model.cfg.gpas_learnable = True, act, learnable
        return model
    layers = _hf_layers(model)
    if not layers:
        raise TypeError(f"apply_gpas: unsupported model {type(model).__name__}; supported are "
                        f"gradpower_ds.model.CausalLM and Hugging Face models built from {', '.join(HF_LAYER_CLASSES)}")
    _check_transformers()
    if variant not in (None, "pre_ln"):
        raise ValueError(f"apply_gpas: Hugging Face {type(layers[0]).__name__} is Pre-LN; variant={variant!r} "
                         "does not apply (use 'pre_ln' or None)")
    for layer in layers:
        if getattr(layer, _PATCHED, False):
            continue
        missing = [a for a in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
                   if not hasattr(layer, a)]
        if missing:
            raise RuntimeError(f"apply_gpas: {type(layer).__name__} lacks {missing}; this transformers version "
                               "changed the decoder layer")
        layer.gpas_gate = GPASGate(act, learnable).to(layer.input_layernorm.weight.device)
        layer.forward = types.MethodType(_hf_pre_ln_gpas_forward, layer)
        setattr(layer, _PATCHED, True)
    return model


def remove_gpas(model: nn.Module) -> nn.Module:
    """Undoes apply_gpas: removes the gates (and, for Hugging Face layers, the patched forward)."""
    if isinstance(model, CausalLM):
        for layer in model.layers:
            layer.gpas_gate = None
        model.cfg.gpas = False
        return model
    for layer in _hf_layers(model):
        if getattr(layer, _PATCHED, False):
            del layer.forward, layer.gpas_gate
            delattr(layer, _PATCHED)
    return model
