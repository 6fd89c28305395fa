"""2-rank job: megatron-core's Muon with ``OptimizerConfig(optimizer="muonpower")`` vs a plain-PyTorch reference.

Launched by tests/test_megatron_optimizer.py (torch.distributed.run, 2 CPU ranks, gloo,
tests/megatron_cpu_shim.py). The tiny MoE GPTModel of tests/jobs/megatron_optimizer.py (EP=2,
alltoall) under megatron DDP without the distributed optimizer (Megatron's Muon refuses it),
built by ``get_megatron_muon_optimizer``, trains STEPS clipped steps, fp32 and bf16, with
``muon_fp32_matmul_prec="highest"``: Megatron's default "medium" lets fp32 matmuls run in bf16 where
the CPU has it (AVX512-BF16), which alone moves Newton-Schulz by ~1e-3.

The reference takes the gradient of the global loss from every rank's local gradients, as the
AdamPower job does, and on the full model: clipping by the total norm of all gradients ->
phi_p (``gradpower_ds.power.grad_power``, float64) -> for each matrix Muon updates (2-D, not the
embedding or output layer, Megatron's rule): decoupled weight decay, the momentum buffer's EMA,
Q, K and V split per query group, Newton-Schulz (emerging-optimizers' ``newton_schulz``, what
Megatron's Muon calls) times the spectral scale max(rows, cols)^0.5, the lr step; for the rest
torch AdamW. Muon's matrices use the Muon p (experts the expert p), the rest the Adam p.
Results go to argv[1] (JSON, written by rank 0).
"""

from __future__ import annotations

import torch

from megatron_optimizer import BETAS, CLIP, EPS, LR, WD, build, gather, global_name, is_expert, max_errors, \
    run_all, train_with_references  # noqa: I001 (installs the CPU shim first)

from megatron.core.optimizer import OptimizerConfig  # noqa: E402
from megatron.core.optimizer import muon as megatron_muon  # noqa: E402
from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz  # noqa: E402

import megatron_patches  # noqa: E402
from gradpower_ds.power import grad_power  # noqa: E402
from gradpower_ds.jobs.processes import exit_when_done  # noqa: E402

MOMENTUM, NS_STEPS = 0.95, 5  # megatron-core 0.16.1's Muon defaults (no Nesterov, quintic coefficients)


def is_muon_matrix(param) -> bool:
    """Megatron's Muon takes 2-D parameters that are not the embedding or output layer."""
    return param.dim() == 2 and not getattr(param, "is_embedding_or_output_parameter", False)


class Reference:
    """fp32 copies of the full model (every rank the same): Muon for the matrices, AdamW for the rest."""

    def __init__(self, named: dict, muon_p: float, expert_p: float, adam_p: float, qkv_shapes: list[int]):
        full = gather({n: p.detach().float() for n, p in named.items()})
        kinds = gather({n: (is_muon_matrix(p), is_expert(p)) for n, p in named.items()})
        self.params = {n: ts[0].clone() for n, ts in full.items()}
        self.muon = {n for n, k in kinds.items() if k[0][0]}
        self.powers = {n: (expert_p if k[0][1] else muon_p) if n in self.muon else adam_p for n, k in kinds.items()}
        self.buffers = {n: torch.zeros_like(self.params[n]) for n in self.muon}
        self.qkv_shapes = qkv_shapes
        adam = [torch.nn.Parameter(self.params[n]) for n in self.params if n not in self.muon]
        self.adam_params = {n: p for n, p in zip([n for n in self.params if n not in self.muon], adam)}
        self.adam = torch.optim.AdamW(adam, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    def orthogonalize(self, name: str, update: torch.Tensor) -> torch.Tensor:
        if "linear_qkv.weight" not in name:
            return newton_schulz(update, steps=NS_STEPS, coefficient_type="quintic") * max(update.shape) ** 0.5
        groups = update.shape[0] // sum(self.qkv_shapes)
        parts = torch.split(update.view(groups, sum(self.qkv_shapes), -1), self.qkv_shapes, dim=1)
        parts = [self.orthogonalize("", part.reshape(-1, update.shape[-1])).view(groups, -1, update.shape[-1])
                 for part in parts]
        return torch.cat(parts, dim=1).view(update.shape)

    def step(self, grads: dict) -> float:
        """clip -> phi -> Muon / AdamW; returns the pre-clip norm."""
        norm = float(torch.nn.utils.get_total_norm(list(grads.values())))
        scale = min(1.0, CLIP / (norm + 1e-6))  # as torch's clip_grad_norm_ and Megatron's clip
        grads = {n: grad_power(g * scale, self.powers[n]) for n, g in grads.items()}
        with torch.no_grad():
            for n in self.muon:
                param, buffer = self.params[n], self.buffers[n]
                param.mul_(1 - LR * WD)
                buffer.lerp_(grads[n], 1 - MOMENTUM)
                param.sub_(self.orthogonalize(n, buffer), alpha=LR)
        for n, p in self.adam_params.items():
            p.grad = grads[n]
        self.adam.step()
        return norm

    def value(self, name: str) -> torch.Tensor:
        return (self.adam_params[name] if name in self.adam_params else self.params[name]).detach()


def run_case(optimizer: str, dtype: torch.dtype, **fields) -> tuple[dict, dict]:
    """Trains STEPS steps with Megatron's Muon; returns (results, final local params).

    results: per inner optimizer its class name and the (dense p, expert p) it powers with, and per
    reference variant ("right": the configured p; "p1": p = 1 everywhere; "swapped": Muon's dense and expert p
    exchanged) the largest |param - reference| over Muon's matrices and over the rest (all ranks).
    """
    model = build(dtype, distributed_optimizer=False)
    config = OptimizerConfig(optimizer=optimizer, lr=LR, weight_decay=WD, clip_grad=CLIP, adam_beta1=BETAS[0],
                             adam_beta2=BETAS[1], adam_eps=EPS, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                             muon_momentum=MOMENTUM, muon_num_ns_steps=NS_STEPS, muon_fp32_matmul_prec="highest",
                             **fields)
    opt = megatron_muon.get_megatron_muon_optimizer(config, [model])  # looked up after apply()
    inners = [dict(cls=type(inner).__name__, powers=getattr(inner, "gradpower", None))
              for inner in megatron_patches.optimizer.inner_optimizers(opt)]
    muon_p = fields.get("gradpower_p", 1.0)
    expert_p = fields.get("gradpower_p_expert") or muon_p
    adam_p = fields.get("gradpower_p_adam", 1.2) if optimizer == "muonpower" else 1.0
    named = {global_name(n): p for n, p in model.module.named_parameters()}
    mconfig = model.module.config
    kv = mconfig.kv_channels
    qkv_shapes = [mconfig.num_attention_heads // mconfig.num_query_groups * kv, kv, kv]
    expert_names = set(gather({n: None for n, p in named.items() if is_expert(p)}))  # every rank's experts
    refs = {"right": Reference(named, muon_p, expert_p, adam_p, qkv_shapes),
            "p1": Reference(named, 1.0, 1.0, 1.0, qkv_shapes),
            "swapped": Reference(named, expert_p, muon_p, adam_p, qkv_shapes)}
    train_with_references(model, opt, named, expert_names, [ref.step for ref in refs.values()])
    errors = {variant: max_errors(named, ref.value, lambda n, ref=ref: "muon" if n in ref.muon else "adam", dtype)
              for variant, ref in refs.items()}
    counts = {"muon": len(refs["right"].muon), "adam": len(refs["right"].adam_params)}
    return dict(inners=inners, errors=errors, counts=counts, config_optimizer=config.optimizer), \
        {n: p.detach().clone() for n, p in named.items()}


POWERS = dict(gradpower_p=0.8, gradpower_p_expert=1.3, gradpower_p_adam=1.5)
CASES = {f"{name}_{variant}": (optimizer, dtype, fields)
         for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
         for variant, optimizer, fields in (("muon", "muon", {}), ("muonpower", "muonpower", POWERS),
                                            ("muonpower_p1", "muonpower", dict(gradpower_p=1.0, gradpower_p_adam=1.0)))}


if __name__ == "__main__":
    exit_when_done(lambda: run_all(CASES, run_case, "muon"))
