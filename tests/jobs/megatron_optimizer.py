"""2-rank job: megatron-core's optimizer with ``OptimizerConfig(optimizer="adampower")`` vs a plain-PyTorch reference.

Launched by tests/test_megatron_optimizer.py (torch.distributed.run, 2 CPU ranks,
gloo, tests/megatron_cpu_shim.py). A tiny GPTModel with MoE (4 experts, top-1,
EP=2, alltoall dispatcher) is wrapped in megatron DDP with the distributed
optimizer and trained STEPS steps with gradient clipping.

The reference is independent of Megatron's optimizer: before each step every
rank takes its *local, unreduced* gradient of every parameter (``main_grad``
before ``finish_grad_sync``) and all ranks gather them. The gradient of the
global loss (the mean of the ranks' losses) is then, by definition, the mean of
the dense gradients over the 2 ranks and, for an expert, its owner's gradient
/ 2. On that full model every rank runs torch ``clip_grad_norm_`` -> phi_p
(``gradpower_ds.power.grad_power_``, p per dense/expert parameter) -> ``torch.optim.AdamW``
on fp32 master copies, and compares its own parameters with the reference
after the last step. Results go to argv[1] (JSON, written by rank 0).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (the shim)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (gradpower_ds, megatron_patches)

import megatron_cpu_shim  # noqa: E402

megatron_cpu_shim.install()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

import megatron_patches  # noqa: E402
from gradpower_ds.power import grad_power_  # noqa: E402

VOCAB, SEQ, BATCH, EXPERTS, EP = 64, 8, 2, 4, 2
STEPS, LR, WD, CLIP, BETAS, EPS = 3, 1e-2, 0.1, 0.05, (0.9, 0.95), 1e-8


def build(dtype: torch.dtype, seed: int = 1234):
    """The megatron DDP-wrapped tiny MoE GPT (identical on every run with the same seed)."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    bf16 = dtype == torch.bfloat16
    config = TransformerConfig(
        num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, num_moe_experts=EXPERTS,
        moe_router_topk=1, moe_router_pre_softmax=True, moe_token_dispatcher_type="alltoall", moe_ffn_hidden_size=32,
        expert_model_parallel_size=EP, moe_aux_loss_coeff=0.01, add_bias_linear=False, use_cpu_initialization=True,
        params_dtype=dtype, bf16=bf16, pipeline_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config, get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False),
                     vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope")
    if bf16:
        model = model.bfloat16()
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                               overlap_grad_reduce=False)
    model = DistributedDataParallel(config, ddp_config, model)
    model.broadcast_params()
    return model


def global_name(name: str) -> str:
    """Renames a local expert (``local_experts.<i>``) to its global index (EP rank r owns experts r*2, r*2+1)."""
    marker = "local_experts."
    if marker not in name:
        return name
    head, tail = name.split(marker)
    local, rest = tail.split(".", 1)
    index = parallel_state.get_expert_model_parallel_rank() * (EXPERTS // EP) + int(local)
    return f"{head}{marker}{index}.{rest}"


def is_expert(param) -> bool:
    return not getattr(param, "allreduce", True)


def batches(step: int):
    gen = torch.Generator().manual_seed(100 * step + dist.get_rank())
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def gather(local: dict) -> dict:
    """All ranks' {global name: tensor} dicts as {name: [tensor per rank that has it]}."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    merged: dict = {}
    for part in out:
        for name, t in part.items():
            merged.setdefault(name, []).append(t)
    return merged


def run_case(optimizer: str, dtype: torch.dtype, **fields) -> dict:
    """Trains STEPS steps with Megatron's optimizer; returns per-group max errors against the reference."""
    model = build(dtype)
    opt_config = OptimizerConfig(optimizer=optimizer, lr=LR, weight_decay=WD, clip_grad=CLIP, adam_beta1=BETAS[0],
                                 adam_beta2=BETAS[1], adam_eps=EPS, bf16=dtype == torch.bfloat16,
                                 params_dtype=dtype, use_distributed_optimizer=True, **fields)
    opt = get_megatron_optimizer(opt_config, [model])
    p_dense = fields.get("gradpower_p", 1.2) if optimizer == "adampower" else 1.0
    p_expert = fields.get("gradpower_p_expert") or p_dense
    named = {global_name(n): p for n, p in model.module.named_parameters()}
    expert_names = set(gather({n: None for n, p in named.items() if is_expert(p)}))  # every rank's experts
    # fp32 master copies of the full model, every rank the same
    ref = {n: torch.nn.Parameter(ts[0].float().clone()) for n, ts in
           gather({n: p.detach().float() for n, p in named.items()}).items()}
    ref_opt = torch.optim.AdamW(list(ref.values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for step in range(STEPS):
        model.zero_grad_buffer()
        opt.zero_grad()
        tokens, labels = batches(step)
        loss = model(tokens, torch.arange(SEQ).expand(BATCH, SEQ), None, labels=labels).float().mean()
        loss.backward()
        local = gather({n: p.main_grad.detach().float().clone() for n, p in named.items()})
        model.finish_grad_sync()
        ok, grad_norm, _ = opt.step()
        assert ok
        for n, p in ref.items():
            grads = local[n]
            p.grad = (torch.stack(grads).mean(0) if n not in expert_names else grads[0] / dist.get_world_size())
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), CLIP)
        assert abs(float(ref_norm) - grad_norm) <= 1e-5 * float(ref_norm), (step, float(ref_norm), grad_norm)
        for n, p in ref.items():
            grad_power_(p.grad, p_expert if n in expert_names else p_dense)
        ref_opt.step()
    err = {"dense": 0.0, "expert": 0.0}
    scale = {"dense": 0.0, "expert": 0.0}
    for n, p in named.items():
        kind = "expert" if n in expert_names else "dense"
        expected = ref[n].detach().to(p.dtype).float() if dtype != torch.float32 else ref[n].detach()
        err[kind] = max(err[kind], (p.detach().float() - expected).abs().max().item())
        scale[kind] = max(scale[kind], (ref[n].detach() - p.detach().float()).abs().max().item())
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    return {k: max(e[k] for e in errs) for k in err}


CASES = {
    "fp32_adam": ("adam", torch.float32, {}),
}


def main() -> None:
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(expert_model_parallel_size=EP)
    results = {}
    for name, (optimizer, dtype, fields) in CASES.items():
        results[name] = run_case(optimizer, dtype, **fields)
        if dist.get_rank() == 0:
            print(name, results[name], flush=True)
    if dist.get_rank() == 0 and len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
