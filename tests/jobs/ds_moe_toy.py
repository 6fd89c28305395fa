"""A tiny DeepSpeed-MoE language model for the launch tests: embedding -> MoE (top-1) -> head.

Same interface as ds_toy.make_model(): ``model(tokens, targets)`` returns
(logits, loss), the loss including the MoE load-balancing loss, so ds_toy.train
drives it. Every expert is initialised from its global index, so ep_size=1 and
ep_size=2 build the same model, only sharded differently.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import nn

import ds_toy

DIM, NUM_EXPERTS, AUX_LOSS_COEF = 16, 4, 0.01


def make_expert(dim: int = DIM) -> nn.Module:
    """The per-expert MLP (dim -> 2*dim -> dim)."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class MoEToy(nn.Module):
    """Embedding, a DeepSpeed MoE layer with NUM_EXPERTS experts (plus a residual connection), LM head."""

    def __init__(self, ep_size: int):
        super().__init__()
        self.embed = nn.Embedding(ds_toy.VOCAB, DIM)
        self.moe = MoE(DIM, expert=make_expert(), num_experts=NUM_EXPERTS, ep_size=ep_size, k=1, use_rts=False)
        self.head = nn.Linear(DIM, ds_toy.VOCAB)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits and the loss: cross entropy + AUX_LOSS_COEF * the MoE balancing loss."""
        hidden = self.embed(tokens)
        moe_out, aux_loss, _ = self.moe(hidden)
        logits = self.head(hidden + moe_out)
        loss = F.cross_entropy(logits.float().view(-1, ds_toy.VOCAB), targets.view(-1))
        return logits, loss + AUX_LOSS_COEF * aux_loss


def make_moe_model(ep_size: int, seed: int = 0) -> MoEToy:
    """The MoE toy with experts sharded over `ep_size` ranks (torch.distributed must be up when ep_size > 1).

    Shared weights come from `seed`; global expert e from `seed + 1 + e` (DeepSpeed
    places experts ep_rank * local + i on expert-parallel rank ep_rank = rank % ep_size),
    so the full model does not depend on ep_size.
    """
    torch.manual_seed(seed)
    model = MoEToy(ep_size)
    ep_rank = dist.get_rank() % ep_size if ep_size > 1 else 0
    local_experts = model.moe.deepspeed_moe.experts.deepspeed_experts
    for i, expert in enumerate(local_experts):
        torch.manual_seed(seed + 1 + ep_rank * len(local_experts) + i)
        expert.load_state_dict(make_expert().state_dict())
    return model


def global_expert_name(name: str, rank: int, ep_size: int) -> str:
    """Renames a local expert parameter (``...deepspeed_experts.<i>...``) to its global expert index."""
    marker = "deepspeed_experts."
    if marker not in name:
        return name
    head, tail = name.split(marker)
    local, rest = tail.split(".", 1)
    global_index = (rank % ep_size) * (NUM_EXPERTS // ep_size) + int(local)
    return f"{head}{marker}{global_index}.{rest}"
