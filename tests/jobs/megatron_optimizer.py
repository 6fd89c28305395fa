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
(``gradpower_ds.power.grad_power``, the float64 reference, p per dense/expert parameter) -> ``torch.optim.AdamW``
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
import megatron.core.optimizer as mcore_optimizer  # noqa: E402  (get_megatron_optimizer: looked up after apply())
from megatron.core.optimizer import OptimizerConfig  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

import megatron_patches  # noqa: E402
from gradpower_ds import folding  # noqa: E402
from gradpower_ds.folding import FoldsIntoStep  # noqa: E402
from gradpower_ds.power import grad_power  # noqa: E402
from gradpower_ds.jobs.processes import exit_when_done  # noqa: E402

VOCAB, SEQ, BATCH, EXPERTS, EP = 64, 8, 2, 4, 2
STEPS, LR, WD, CLIP, BETAS, EPS = 3, 1e-2, 0.1, 0.05, (0.9, 0.95), 1e-8


def build(dtype: torch.dtype, seed: int = 1234, distributed_optimizer: bool = True, **transformer):
    """The megatron DDP-wrapped tiny MoE GPT (identical on every run with the same seed); `transformer` overrides
    TransformerConfig fields (e.g. num_query_groups)."""
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    bf16 = dtype == torch.bfloat16
    config = TransformerConfig(**{
        **dict(num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2, num_moe_experts=EXPERTS,
               moe_router_topk=1, moe_router_pre_softmax=True, moe_token_dispatcher_type="alltoall",
               moe_ffn_hidden_size=32, expert_model_parallel_size=EP, moe_aux_loss_coeff=0.01, add_bias_linear=False,
               use_cpu_initialization=True, params_dtype=dtype, bf16=bf16, pipeline_dtype=dtype, hidden_dropout=0.0,
               attention_dropout=0.0),
        **transformer})
    model = GPTModel(config, get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False),
                     vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope")
    if bf16:
        model = model.bfloat16()
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer,
                                               grad_reduce_in_fp32=True, overlap_grad_reduce=False)
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


def reference(named: dict, expert_names: set, p_dense: float, p_expert: float) -> dict:
    """fp32 master copies of the full model (every rank the same) and their AdamW, powering with the given p."""
    params = {n: torch.nn.Parameter(ts[0].float().clone()) for n, ts in
              gather({n: p.detach().float() for n, p in named.items()}).items()}
    return dict(params=params, p_dense=p_dense, p_expert=p_expert,
                opt=torch.optim.AdamW(list(params.values()), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD))


def reference_step(ref: dict, grads: dict, expert_names: set) -> float:
    """clip_grad_norm_ -> phi_p -> AdamW on the full model; returns the pre-clip norm."""
    for n, p in ref["params"].items():
        p.grad = grads[n].clone()
    norm = float(torch.nn.utils.clip_grad_norm_(list(ref["params"].values()), CLIP))
    for n, p in ref["params"].items():
        p.grad = grad_power(p.grad, ref["p_expert"] if n in expert_names else ref["p_dense"])
    ref["opt"].step()
    return norm


def run_case(optimizer: str, dtype: torch.dtype, **fields) -> tuple[dict, dict]:
    """Trains STEPS steps with Megatron's optimizer; returns (results, final local params).

    results: the inner optimizers (per inner optimizer: its groups' is_expert_parallel, its
    class name and the (dense p, expert p) its class steps with), and per reference variant the largest
    |param - reference| over dense and over expert params (all ranks): "right" uses
    the configured p, "p1" p=1 everywhere, "swapped" the dense and expert p exchanged.
    """
    model = build(dtype)
    opt_config = OptimizerConfig(optimizer=optimizer, lr=LR, weight_decay=WD, clip_grad=CLIP, adam_beta1=BETAS[0],
                                 adam_beta2=BETAS[1], adam_eps=EPS, bf16=dtype == torch.bfloat16,
                                 params_dtype=dtype, use_distributed_optimizer=True, **fields)
    opt = mcore_optimizer.get_megatron_optimizer(opt_config, [model])
    inners = [dict(expert_groups=[g.get("is_expert_parallel") for g in inner.param_groups],
                   cls=type(inner).__name__, powers=getattr(inner, "gradpower", None))
              for inner in megatron_patches.optimizer.inner_optimizers(opt)]
    p_dense = fields.get("gradpower_p", 1.2) if optimizer == "adampower" else 1.0
    p_expert = fields.get("gradpower_p_expert") or p_dense
    named = {global_name(n): p for n, p in model.module.named_parameters()}
    expert_names = set(gather({n: None for n, p in named.items() if is_expert(p)}))  # every rank's experts
    refs = {"right": reference(named, expert_names, p_dense, p_expert),
            "p1": reference(named, expert_names, 1.0, 1.0),
            "swapped": reference(named, expert_names, p_expert, p_dense)}
    train_with_references(model, opt, named, expert_names,
                          [lambda grads, ref=ref: reference_step(ref, grads, expert_names) for ref in refs.values()])
    errors = {variant: max_errors(named, lambda n, ref=ref: ref["params"][n].detach(),
                                  lambda n: "expert" if n in expert_names else "dense", dtype)
              for variant, ref in refs.items()}
    return dict(inners=inners, errors=errors), {n: p.detach().clone() for n, p in named.items()}


def train_with_references(model, opt, named: dict, expert_names: set, reference_steps: list,
                          steps: int = STEPS) -> None:
    """`steps` clipped steps of Megatron's optimizer; after each, every ``reference_step(grads)`` steps its reference
    on the gradient of the global loss, from all ranks' local gradients, and returns its pre-clip norm, which must
    be Megatron's (and above CLIP, so clipping is active)."""
    for step in range(steps):
        model.zero_grad_buffer()
        opt.zero_grad()
        tokens, labels = batches(step)
        loss = model(tokens, torch.arange(SEQ).expand(BATCH, SEQ), None, labels=labels).float().mean()
        loss.backward()
        local = gather({n: p.main_grad.detach().float().clone() for n, p in named.items()})
        model.finish_grad_sync()
        ok, grad_norm, _ = opt.step()
        assert ok
        # the gradient of the mean of the ranks' losses: dense = mean over ranks, expert = owner's / ranks
        grads = {n: torch.stack(g).mean(0) if n not in expert_names else g[0] / dist.get_world_size()
                 for n, g in local.items()}
        for reference_step_ in reference_steps:
            ref_norm = reference_step_(grads)
            assert abs(ref_norm - grad_norm) <= 1e-5 * ref_norm, (step, ref_norm, grad_norm)
            assert ref_norm > CLIP


def max_errors(named: dict, expected, kind, dtype: torch.dtype) -> dict:
    """Per kind of parameter (``kind(name)``), the largest |param - expected(name)| (rounded to `dtype`), all ranks."""
    err: dict = {}
    for n, p in named.items():
        diff = (p.detach().float() - expected(n).to(dtype).float()).abs().max().item()
        err[kind(n)] = max(err.get(kind(n), 0.0), diff)
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    return {k: max(e.get(k, 0.0) for e in errs) for k in set().union(*errs)}


CASES = {
    "fp32_adam": ("adam", torch.float32, {}),
    "fp32_adampower": ("adampower", torch.float32, dict(gradpower_p=1.2, gradpower_p_expert=1.5)),
    "fp32_adampower_p1": ("adampower", torch.float32, dict(gradpower_p=1.0)),
    "bf16_adam": ("adam", torch.bfloat16, {}),
    "bf16_adampower": ("adampower", torch.bfloat16, dict(gradpower_p=1.2, gradpower_p_expert=1.5)),
    "bf16_adampower_p1": ("adampower", torch.bfloat16, dict(gradpower_p=1.0)),
}


def max_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over the parameters, all ranks."""
    local = max((a[n].float() - b[n].float()).abs().max().item() for n in a)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return max(out)


def counting_folds() -> list:
    """Records every grad scale folded into a step (FoldsIntoStep.fold_into_next_step) from now on."""
    seen = []
    original = FoldsIntoStep.fold_into_next_step

    def fold(self, *, grad_scale=None, copy_out=None):
        if grad_scale is not None:
            seen.append(float(grad_scale))
        return original(self, grad_scale=grad_scale, copy_out=copy_out)

    FoldsIntoStep.fold_into_next_step = fold
    return seen


def run_all(cases: dict, run_case, baseline: str, unfolded: tuple = ()) -> None:
    """A job's main: every case of `cases` through `run_case` (with the grad scales folded into its steps), then p = 1
    against Megatron's own `baseline` optimizer (the ``<dtype>_<baseline>power_p1`` case against
    ``<dtype>_<baseline>``, bit for bit), and each case named in `unfolded` again with GRADPOWER_FOLD=0 against
    itself folded (``<case>_folded_vs_unfolded``); rank 0 writes the results to argv[1] (JSON)."""
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(expert_model_parallel_size=EP)
    megatron_patches.apply()
    folds = counting_folds()
    results, params = {}, {}
    for name, (optimizer, dtype, fields) in cases.items():
        folds.clear()
        results[name], params[name] = run_case(optimizer, dtype, **fields)
        results[name]["folded_grad_scales"] = list(folds)
        if dist.get_rank() == 0:
            print(name, results[name], flush=True)
    for dtype in ("fp32", "bf16"):
        results[f"{dtype}_p1_vs_{baseline}"] = max_diff(params[f"{dtype}_{baseline}power_p1"],
                                                       params[f"{dtype}_{baseline}"])
    for name in unfolded:
        optimizer, dtype, fields = cases[name]
        os.environ[folding.ENV] = "0"
        folds.clear()
        _, plain = run_case(optimizer, dtype, **fields)
        del os.environ[folding.ENV]
        results[f"{name}_folded_vs_unfolded"] = max_diff(params[name], plain)
        results[f"{name}_unfolded_grad_scales"] = list(folds)
    if dist.get_rank() == 0:
        print({k: v for k, v in results.items() if "_p1_vs_" in k}, flush=True)
    if dist.get_rank() == 0 and len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    exit_when_done(lambda: run_all(CASES, run_case, "adam", unfolded=("fp32_adampower", "bf16_adampower")))
