"""A small LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, optional DeepSpeed MoE layers) for
the main job (gradpower_ds.jobs.train), tests, the quickstart and GPAS experiments.

`norm` picks the layer-norm placement GPAS is defined for (arXiv 2506.22049):
pre_ln, sandwich_ln, deepnorm, mix_ln (the first `mix_ln_ratio` of the layers
DeepNorm-style, the rest Pre-LN) and lns (Pre-LN with LayerNorm scaling
1/sqrt(layer + 1)). With `gpas=True` every layer gets one GPASGate shared by
both residual adds.

With `num_experts > 0` (the default, as in the main job) each MLP is DeepSpeed's
MoE layer (``DeepSpeedMoE``), which needs torch.distributed initialised, e.g.
``deepspeed.init_distributed(dist_backend="gloo")`` in a world of one process;
`num_experts=0` builds dense SwiGLU MLPs and needs nothing of the kind.

ModelConfig is the one home of the model settings' defaults and help texts: the
main job's settings (gradpower_ds.jobs.train_config.TrainConfig) take theirs from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..gpas import ACTIVATIONS, VARIANTS, GPASGate


def _setting(default, help: str):
    """A ModelConfig field with its help text (TrainConfig's flags of the same name show it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """Model shape and architecture switches, each with its help text in the field's metadata.

    The defaults are the main job's model (configs/quickstart.json: a 4-expert top-2 MoE); its settings of the
    same names (TrainConfig.dim, ..., gpas_act) take their defaults and help from here. vocab_size and
    max_seq_len come from the job's tokenizer and seq_len; ep_size is the resolved size, where the job's own
    ep_size may be 0 (automatic placement).
    """

    vocab_size: int = _setting(256, "vocabulary size (token ids are in [0, vocab_size))")
    dim: int = _setting(128, "model width")
    n_layers: int = _setting(4, "decoder layers")
    n_heads: int = _setting(4, "attention heads (must divide dim)")
    ffn_dim: int = _setting(256, "hidden size of each MLP / expert")
    max_seq_len: int = _setting(256, "longest sequence (size of the RoPE tables)")
    norm: str = _setting("pre_ln", f"layer-norm placement: {', '.join(VARIANTS)}")
    mix_ln_ratio: float = _setting(0.25, "mix_ln: fraction of the layers (the first ones) that are DeepNorm-style")
    num_experts: int = _setting(4, "experts per MoE layer (0: dense MLP)")
    top_k: int = _setting(2, "experts per token, in [1, num_experts]")
    ep_size: int = _setting(1, "expert-parallel ranks the experts are sharded over (>= 1, a divisor of "
                               "num_experts; each run of ep_size consecutive ranks holds all the experts)")
    capacity_factor: float = _setting(0.0, "expert capacity factor (0: no token dropping, Mixtral/Qwen2-MoE "
                                           "style)")
    rope_theta: float = _setting(10000.0, "RoPE base")
    gpas: bool = _setting(False, "GPAS gates (gradient-preserving activation scaling)")
    gpas_act: str = _setting("silu", f"GPAS gate activation: {', '.join(ACTIVATIONS)}")
    gpas_learnable: bool = _setting(True, "GPAS gate alpha is a parameter (False: a fixed buffer)")

    def __post_init__(self):
        if self.norm not in VARIANTS:
            raise ValueError(f"ModelConfig: unknown norm={self.norm!r}; choose one of {VARIANTS}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig: dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"ModelConfig: top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.ep_size < 1 or (self.num_experts and self.num_experts % self.ep_size):
            raise ValueError(f"ModelConfig: num_experts={self.num_experts} must be a multiple of ep_size="
                             f"{self.ep_size} (each expert-parallel rank holds num_experts / ep_size experts)")


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learnable scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype) * self.weight


def rope_tables(cfg: ModelConfig, device=None):
    """cos/sin tables for rotary position embeddings, shape [max_seq_len, head_dim / 2]."""
    head_dim = cfg.dim // cfg.n_heads
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device).float(), inv)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotates [batch, heads, seq, head_dim] by position (pairs of channels)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE.

    Q, K, V and the output projection are separate weights, named as in Hugging Face's LLaMA, so that each is
    a parameter of its own: blockwise learning rates (gradpower_ds.blockwise) give Q/K and V/O different lrs,
    and Muon orthogonalises each.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(cfg.dim, cfg.dim, bias=False)
                                                              for _ in range(4))

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    """The LLaMA feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DeepSpeedMoE(nn.Module):
    """DeepSpeed's MoE layer (experts sharded over ``ep_size`` ranks) with SwiGLU experts and top-k gating.

    Deterministic routing (no random token selection or second-expert sampling); DeepSpeed's
    load-balancing loss of the last forward is kept in .aux_loss. Needs torch.distributed
    initialised (a world of one process will do).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from deepspeed.moe.layer import MoE

        self.moe = MoE(cfg.dim, expert=SwiGLU(cfg.dim, cfg.ffn_dim), num_experts=cfg.num_experts,
                       ep_size=cfg.ep_size, k=cfg.top_k, capacity_factor=cfg.capacity_factor or 1.0,
                       eval_capacity_factor=cfg.capacity_factor or 1.0, drop_tokens=cfg.capacity_factor > 0,
                       use_rts=False, top2_2nd_expert_sampling=False)
        self.aux_loss = torch.zeros(())
        self._init_experts()

    def _init_experts(self) -> None:
        """Gives every expert its own initialisation (DeepSpeed deep-copies one expert into all of them).

        Global expert e is drawn from seed torch.initial_seed() + 1 + e, so the full model
        does not depend on how many ranks the experts are sharded over.
        """
        local = self.moe.deepspeed_moe.experts.deepspeed_experts
        # DeepSpeed's default layout (no tensor parallelism) makes each run of ep_size consecutive ranks an
        # expert-parallel group; its groups only exist after deepspeed.initialize, so compute the rank here
        ep_rank = torch.distributed.get_rank() % self.moe.ep_size if self.moe.ep_size > 1 else 0
        base = torch.initial_seed()
        for i, expert in enumerate(local):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(base + 1 + ep_rank * len(local) + i)
                for linear in (expert.gate, expert.up, expert.down):
                    linear.reset_parameters()

    def forward(self, x):
        out, self.aux_loss, _ = self.moe(x)
        return out


class DecoderLayer(nn.Module):
    """One decoder layer in the configured norm placement, with an optional GPAS gate g:

    pre_ln / lns:  h = g(x + Attn(s*LN(x)));  out = g(h + MLP(s*LN(h)))   (s = 1/sqrt(i+1) for lns, else 1)
    sandwich_ln:   h = g(x + LN'(Attn(LN(x))));  out = g(h + LN'(MLP(LN(h))))
    deepnorm:      h = LN(a*g(x) + Attn(x));  out = LN(a*g(h) + MLP(h))   (a = (2N)^(1/4))

    MLP is a SwiGLU block, or DeepSpeedMoE when cfg.num_experts > 0.
    """

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.style = cfg.norm
        if cfg.norm == "mix_ln":
            self.style = "deepnorm" if index < int(cfg.mix_ln_ratio * cfg.n_layers) else "pre_ln"
        self.scale = 1.0 / math.sqrt(index + 1) if cfg.norm == "lns" else 1.0
        self.deepnorm_alpha = (2 * cfg.n_layers) ** 0.25
        self.attn = Attention(cfg)
        self.mlp = DeepSpeedMoE(cfg) if cfg.num_experts else SwiGLU(cfg.dim, cfg.ffn_dim)
        self.norm1, self.norm2 = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        if self.style == "sandwich_ln":
            self.post_norm1, self.post_norm2 = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.gpas_gate = GPASGate(cfg.gpas_act, cfg.gpas_learnable) if cfg.gpas else None

    def gate(self, x):
        return x if self.gpas_gate is None else self.gpas_gate(x)

    def forward(self, x, cos, sin):
        if self.style == "deepnorm":
            h = self.norm1(self.deepnorm_alpha * self.gate(x) + self.attn(x, cos, sin))
            return self.norm2(self.deepnorm_alpha * self.gate(h) + self.mlp(h))
        if self.style == "sandwich_ln":
            h = self.gate(x + self.post_norm1(self.attn(self.norm1(x), cos, sin)))
            return self.gate(h + self.post_norm2(self.mlp(self.norm2(h))))
        h = self.gate(x + self.attn(self.norm1(x) * self.scale, cos, sin))
        return self.gate(h + self.mlp(self.norm2(h) * self.scale))


class CausalLM(nn.Module):
    """Token embedding, decoder layers, final RMSNorm and LM head; forward returns (logits, loss)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        # named as in Hugging Face's LLaMA: DeepSpeed's Muon leaves parameters named embed/lm_head to its Adam
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens, targets=None, aux_loss_coef: float = 0.01):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        if self.cfg.num_experts:
            loss = loss + aux_loss_coef * self.aux_loss()
        return logits, loss

    def apply_gpas(self, variant: str | None, act: str, learnable: bool) -> None:
        """Gives every layer a GPAS gate (``gradpower_ds.apply_gpas`` calls this; idempotent): the layers' forward
        already has the gate's place in this model's norm placement, which `variant` must name (or be None)."""
        if variant is not None and variant != self.cfg.norm:
            raise ValueError(f"apply_gpas: this CausalLM is built with norm={self.cfg.norm!r}; the gate placement "
                             f"follows it, so pass variant={self.cfg.norm!r} (or None)")
        for layer in self.layers:
            if layer.gpas_gate is None:
                layer.gpas_gate = GPASGate(act, learnable).to(layer.norm1.weight.device)
        self.cfg.gpas, self.cfg.gpas_act, self.cfg.gpas_learnable = True, act, learnable

    def remove_gpas(self) -> None:
        """Removes the GPAS gates (``gradpower_ds.remove_gpas`` calls this)."""
        for layer in self.layers:
            layer.gpas_gate = None
        self.cfg.gpas = False

    def aux_loss(self) -> torch.Tensor:
        """The MoE load-balancing loss of the last forward, summed over layers (0 for a dense model)."""
        if not self.cfg.num_experts:
            return torch.zeros(())
        return sum(layer.mlp.aux_loss for layer in self.layers)
