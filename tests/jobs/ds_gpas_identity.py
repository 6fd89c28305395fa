"""GPAS gates are an exact identity at initialisation: a CausalLM with gates gives the same logits and gradients,
bit for bit, as the same model without them.

``identity_at_init(norm, experts)`` is the check; tests/test_gpas.py runs it in the test process for dense
models (experts=0). Run as a job, ``python ds_gpas_identity.py NORM...``, it checks each NORM with 4 experts, i.e. with
DeepSpeed's MoE layer, which needs torch.distributed: one process, a world of one (gloo; RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT from the environment), all norms in this one launch. Prints ``ok NORM`` for each.
"""

from __future__ import annotations

import os
import sys

import torch

from gradpower_ds import apply_gpas
from gradpower_ds.jobs.model import CausalLM, DeepSpeedMoE, ModelConfig, SwiGLU
from gradpower_ds.jobs.processes import exit_when_done

MOE_EXPERTS = 4


def identity_at_init(norm: str, experts: int) -> None:
    """Asserts bitwise-equal logits and parameter gradients of a plain and a gated model with equal weights."""
    cfg = ModelConfig(norm=norm, num_experts=experts, n_layers=4, dim=32, n_heads=4, ffn_dim=64, vocab_size=50)
    plain = CausalLM(cfg)
    assert all(isinstance(layer.mlp, DeepSpeedMoE if experts else SwiGLU) for layer in plain.layers)
    gated = apply_gpas(CausalLM(ModelConfig(**{**cfg.__dict__})))
    gated.load_state_dict(plain.state_dict(), strict=False)
    tokens = torch.randint(0, 50, (2, 12))
    (lp, loss_p), (lg, loss_g) = plain(tokens, tokens), gated(tokens, tokens)
    assert torch.equal(lp, lg)
    loss_p.backward()
    loss_g.backward()
    gated_params = dict(gated.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(p.grad, gated_params[name].grad), name


def main(norms: list[str]) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    for norm in norms:
        torch.manual_seed(0)
        identity_at_init(norm, MOE_EXPERTS)
        print(f"ok {norm}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_when_done(lambda: main(sys.argv[1:]))
