"""2-rank job: megatron-core with ``OptimizerConfig(gradpower_blockwise_lr=True)`` vs a plain-PyTorch reference.

Launched by tests/test_megatron_blockwise.py (torch.distributed.run, 2 CPU ranks, gloo,
tests/megatron_cpu_shim.py). The tiny MoE GPTModel of megatron_optimizer.py, with 4 heads in 2 query groups (so
``linear_qkv`` holds per group 2 Q heads, 1 K and 1 V head), trains STEPS clipped steps of AdamPower (p = 1.2)
under Megatron's OptimizerParamScheduler (warmup from 0, cosine decay to MIN_RATIO x lr), with and without the
distributed optimizer, in fp32 and bf16.

Each step records every param group's lr and max_lr. The reference, independent of Megatron's optimizer and of
gradpower_ds.blockwise: on the full model's gradient (megatron_optimizer.train_with_references) it clips, applies
phi (float64), and steps Adam written out in float64 with a per-element lr = the step's base lr x the element's
multiplier, from EXPECTED by name and, for linear_qkv, per row from the Q/K/V layout; decoupled weight decay WD
on matrices, none on 1-D parameters (Megatron's standard overrides). "flat_qkv" is the same reference with every
linear_qkv row at the qk multiplier: far from Megatron, so the checks see the per-row lrs. Results go to argv[1].
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import megatron_optimizer as job  # noqa: E402  (installs the CPU shim)

from megatron.core import parallel_state  # noqa: E402
import megatron.core.optimizer as mcore_optimizer  # noqa: E402  (get_megatron_optimizer: looked up after apply())
from megatron.core.optimizer import OptimizerConfig  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402

import megatron_patches  # noqa: E402
from gradpower_ds.power import grad_power  # noqa: E402
from gradpower_ds.jobs.processes import exit_when_done  # noqa: E402

STEPS, WARMUP, MIN_RATIO, POWER = 4, 2, 0.1, 1.2
HEADS, GROUPS = 4, 2
# the paper's multipliers by name fragment, written out apart from gradpower_ds.blockwise's rules
EXPECTED = (("layernorm", 1.0), ("word_embeddings", 10.0), ("output_layer", 1.0), ("linear_proj", 4.0),
            (".mlp.", 6.0))
QK, VO = 8.0, 4.0
CASES = {"fp32_dist": (torch.float32, True), "bf16_dist": (torch.bfloat16, True), "fp32_plain": (torch.float32, False),
         "bf16_plain": (torch.bfloat16, False)}


def multipliers(name: str, param: torch.Tensor, flat_qkv: bool) -> torch.Tensor:
    """Each element's expected lr multiplier."""
    if "linear_qkv" in name:
        head_dim = param.shape[0] // (GROUPS * (HEADS // GROUPS + 2))
        rows = torch.tensor(([QK] * (HEADS // GROUPS + 1) * head_dim + [QK if flat_qkv else VO] * head_dim) * GROUPS,
                            dtype=torch.float64)
        return rows[:, None].expand(param.shape)
    return torch.full(param.shape, next(m for key, m in EXPECTED if key in name), dtype=torch.float64)


class Reference:
    """fp32 masters of the full model, stepped in float64: clip -> phi -> Adam with a per-element lr."""

    def __init__(self, named: dict, flat_qkv: bool):
        self.params = {n: ts[0].double().clone() for n, ts in
                       job.gather({n: p.detach().float() for n, p in named.items()}).items()}
        self.lr_mult = {n: multipliers(n, p, flat_qkv) for n, p in self.params.items()}
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.t = 0
        self.base = None  # the base lr of the next step, set by the job from Megatron's groups

    def step(self, grads: dict) -> float:
        norm = torch.stack([g.double().norm() for g in grads.values()]).norm().item()
        coef = min(1.0, job.CLIP / (norm + 1e-6))
        self.t += 1
        beta1, beta2 = job.BETAS
        for n, p in self.params.items():
            g = grad_power(grads[n].double() * coef, POWER)
            self.m[n].mul_(beta1).add_(g, alpha=1 - beta1)
            self.v[n].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            lr = self.base * self.lr_mult[n]
            wd = 0.0 if p.dim() == 1 else job.WD
            denom = (self.v[n] / (1 - beta2 ** self.t)).sqrt() + job.EPS
            p.mul_(1 - lr * wd).sub_(lr * (self.m[n] / (1 - beta1 ** self.t)) / denom)
        return norm


def run_case(dtype: torch.dtype, distributed: bool) -> dict:
    model = job.build(dtype, distributed_optimizer=distributed, num_attention_heads=HEADS, num_query_groups=GROUPS)
    config = OptimizerConfig(optimizer="adampower", gradpower_p=POWER, lr=job.LR, min_lr=job.LR * MIN_RATIO,
                             weight_decay=job.WD, clip_grad=job.CLIP, adam_beta1=job.BETAS[0],
                             adam_beta2=job.BETAS[1], adam_eps=job.EPS, bf16=dtype == torch.bfloat16,
                             params_dtype=dtype, use_distributed_optimizer=distributed, gradpower_blockwise_lr=True)
    opt = mcore_optimizer.get_megatron_optimizer(config, [model])
    scheduler = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=job.LR, min_lr=job.LR * MIN_RATIO, lr_warmup_steps=WARMUP, lr_decay_steps=STEPS,
        lr_decay_style="cosine", start_wd=job.WD, end_wd=job.WD, wd_incr_steps=STEPS, wd_incr_style="constant")
    named = {job.global_name(n): p for n, p in model.module.named_parameters()}
    expert_names = set(job.gather({n: None for n, p in named.items() if job.is_expert(p)}))
    refs = {"right": Reference(named, flat_qkv=False), "flat_qkv": Reference(named, flat_qkv=True)}
    lrs = []

    def record_and_step(grads: dict) -> float:
        """Runs after Megatron's step: records the groups' (lr, max_lr) of that step, sets the references' base lr
        from them, steps the references; then the scheduler moves on."""
        groups = [(g["lr"], g["max_lr"]) for g in opt.param_groups]
        lrs.append(groups)
        for ref in refs.values():
            ref.base = groups[0][0] * job.LR / groups[0][1]
        norms = [ref.step(grads) for ref in refs.values()]
        scheduler.step(increment=1)
        return norms[0]

    job.train_with_references(model, opt, named, expert_names, [record_and_step], steps=STEPS)
    inners = [type(inner).__name__ for inner in megatron_patches.optimizer.inner_optimizers(opt)]
    errors = {variant: job.max_errors(named, lambda n, ref=ref: ref.params[n].float(),
                                      lambda n: "qkv" if "linear_qkv" in n else "expert" if n in expert_names
                                      else "dense", dtype)
              for variant, ref in refs.items()}
    return dict(lrs=lrs, errors=errors, inners=inners)


def main() -> None:
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(expert_model_parallel_size=job.EP)
    megatron_patches.apply()
    results = {name: run_case(*case) for name, case in CASES.items()}
    if dist.get_rank() == 0:
        print(json.dumps({k: v["errors"] for k, v in results.items()}), flush=True)
        Path(sys.argv[1]).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    exit_when_done(main)
