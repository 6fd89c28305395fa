"""Launched job (2 ranks, gloo): a few DeepSpeed steps of CausalLM with GPAS gates under ZeRO-2 and ZeRO-3.

Writes one JSON line per (rank, stage) to the file named by argv[1]: losses and gate values.
"""

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from gradpower_ds import apply_gpas, param_groups_with_gpas, register_gate_grad_clip
from gradpower_ds.gpas import gate_parameters
from gradpower_ds.jobs.model import CausalLM, ModelConfig
from gradpower_ds.jobs.processes import exit_when_done


def run(stage: int, out):
    torch.manual_seed(0)
    model = apply_gpas(CausalLM(ModelConfig(n_layers=2, dim=32, n_heads=4, ffn_dim=64, num_experts=0, vocab_size=64,
                                            max_seq_len=32)))
    register_gate_grad_clip(model, 0.01)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": stage},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups_with_gpas(model, 0.1),
                                           config=config)
    gen = torch.Generator().manual_seed(100 + dist.get_rank())
    losses = []
    for _ in range(3 * 2):
        tokens = torch.randint(0, 64, (2, 16), generator=gen)
        loss = engine(tokens, tokens)[1]
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    gates = gate_parameters(engine.module)
    with deepspeed.zero.GatheredParameters(gates, enabled=stage == 3):
        values = [g.detach().clone().item() for g in gates]
    groups = [dict(n=len(g["params"]), wd=g["weight_decay"]) for g in engine.optimizer.param_groups]
    out.write(json.dumps(dict(rank=dist.get_rank(), stage=stage, losses=losses, gates=values, groups=groups)) + "\n")
    out.flush()


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    with open(f"{sys.argv[1]}.{dist.get_rank()}", "w") as out:
        for stage in (2, 3):
            run(stage, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_when_done(main)
