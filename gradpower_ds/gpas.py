"""GPAS: Gradient-Preserving Activation Scaling (arXiv 2506.22049).

A gate with one learnable fp32 scalar alpha scales an activation down in the
forward pass through a stop-gradient, leaving the backward gradient untouched:

    y = x - act(alpha) * stopgrad(x) = (1 - act(alpha)) * x
    dy/dx = I,   dL/dalpha = -act'(alpha) * <dL/dy, x>

With act = SiLU (default) and alpha = 0 the gate is an exact identity at
initialisation. One gate per decoder layer, shared by both residual adds. Where
it goes: ``apply_gpas`` / ``remove_gpas`` here put gates into Hugging Face LLaMA,
Qwen2, Qwen2-MoE and Mixtral decoder layers (transformers 5.x, Pre-LN; a thin,
reversible patch: each layer gets a `gpas_gate` submodule and an instance
`forward` that is the library's own Pre-LN forward with the gate after each
residual add) and into any model that places them itself through methods
``apply_gpas(variant, act, learnable)`` / ``remove_gpas()`` (the jobs' demo model,
gradpower_ds.jobs.model.CausalLM, in every layer-norm placement of VARIANTS);
megatron_patches.gpas puts them into megatron-core layers.

Both training jobs (gradpower_ds.jobs.train, gradpower_ds.jobs.train_megatron) clip each
gate's gradient to +-GATE_GRAD_CLIP, the GPAS reference code's value, with
register_gate_grad_clip; plain PyTorch loops can use clip_gate_grad_norm_.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "silu": F.silu,
    "identity": lambda a: a,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": F.relu,
}
VARIANTS = ("pre_ln", "sandwich_ln", "deepnorm", "mix_ln", "lns")
GATE_ATTR = "_gpas_gate"  # marks gate parameters (optimizer grouping, clipping)
GATE_GRAD_CLIP = 0.01  # the GPAS reference code's clip for the gates' gradients


def gpas_scale(x: torch.Tensor, alpha: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """Functional GPAS: x - act(alpha) * x.detach(), the gate computed in fp32 and cast to x's dtype."""
    gate = ACTIVATIONS[act](alpha.float()).to(x.dtype)
    return x - gate * x.detach()


class GPASGate(nn.Module):
    """One GPAS gate: a scalar alpha (fp32, shape [1]) and its activation.

    learnable=False keeps alpha as a fixed buffer (a non-learnable gate, e.g.
    `GPASGate("identity", learnable=False, init=0.1)` scales by 0.9).
    """

    def __init__(self, act: str = "silu", learnable: bool = True, init: float = 0.0):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"GPAS: unknown act={act!r}; choose one of {sorted(ACTIVATIONS)}")
        self.act = act
        alpha = torch.full((1,), float(init), dtype=torch.float32)
        if learnable:
            self.alpha = nn.Parameter(alpha)
            setattr(self.alpha, GATE_ATTR, True)
        else:
            self.register_buffer("alpha", alpha)

    def forward(self, x: torch.Tensor, detach_alpha: bool = False) -> torch.Tensor:
        """Returns (1 - act(alpha)) * x with the gradient to x left unchanged.

        detach_alpha=True gives the same values with no graph to alpha: for a gate run under
        torch.enable_grad() when no gradient is wanted (megatron's bias-dropout-add).
        """
        return gpas_scale(x, self.alpha.detach() if detach_alpha else self.alpha, self.act)

    def extra_repr(self) -> str:
        return f"act={self.act}, learnable={isinstance(self.alpha, nn.Parameter)}"


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable GPAS gate parameters of a model."""
    return [p for p in model.parameters() if getattr(p, GATE_ATTR, False)]


def param_groups_with_gpas(model: nn.Module, weight_decay: float, **group_options) -> list[dict]:
    """Optimizer param groups: every other parameter with weight_decay, the gates without.

    Pass the result to any torch optimizer or as `model_parameters` to
    deepspeed.initialize; group_options (e.g. lr) apply to both groups. Each group has a
    "name", which DeepSpeed's MoE grouping needs to split expert parameters off.
    """
    gates = {id(p) for p in gate_parameters(model)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in gates]
    groups = [dict(name="params", params=rest, weight_decay=weight_decay, **group_options)]
    if gates:
        groups.append(dict(name="gpas_gates", params=gate_parameters(model), weight_decay=0.0, **group_options))
    return groups


def clip_gate_grad_norm_(model: nn.Module, max_norm: float = GATE_GRAD_CLIP) -> torch.Tensor:
    """Clips the joint gradient norm of all gates after backward (plain PyTorch loops), as the
    GPAS reference code does with max_norm = GATE_GRAD_CLIP; returns the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(gate_parameters(model), max_norm)


def register_gate_grad_clip(model: nn.Module, max_value: float = GATE_GRAD_CLIP) -> list:
    """Clips each gate's gradient to [-max_value, max_value] as autograd produces it.

    For trainers that own the gradients after backward: DeepSpeed (ZeRO keeps them
    in its own buffers, and applies its global `gradient_clipping` afterwards) and
    megatron DDP (its hook on the gradient accumulation copies the gradient into
    `main_grad` after this tensor hook ran). The clip acts on each backward's local
    gradient, per micro-batch and rank, before reduction. For a single scalar gate
    this equals norm clipping; across gates it clips each gate on its own. Returns
    the hook handles.
    """
    if max_value <= 0:
        raise ValueError(f"GPAS: invalid max_value={max_value}: must be > 0")
    return [p.register_hook(lambda g: g.clamp(-max_value, max_value)) for p in gate_parameters(model)]


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

    variant: the model's layer-norm placement (None: the model's own); Hugging Face
    models are Pre-LN ("pre_ln"). A model with its own apply_gpas method is handed
    variant, act and learnable (checked here first).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"apply_gpas: unknown act={act!r}; choose one of {sorted(ACTIVATIONS)}")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"apply_gpas: unknown variant={variant!r}; choose one of {VARIANTS}")
    if callable(getattr(model, "apply_gpas", None)):
        model.apply_gpas(variant, act, learnable)
        return model
    layers = _hf_layers(model)
    if not layers:
        raise TypeError(f"apply_gpas: unsupported model {type(model).__name__}; supported are "
                        f"Hugging Face models built from {', '.join(HF_LAYER_CLASSES)} and models with their own "
                        "apply_gpas(variant, act, learnable) and remove_gpas() methods")
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
    if callable(getattr(model, "remove_gpas", None)):
        model.remove_gpas()
        return model
    for layer in _hf_layers(model):
        if getattr(layer, _PATCHED, False):
            del layer.forward, layer.gpas_gate
            delattr(layer, _PATCHED)
    return model
