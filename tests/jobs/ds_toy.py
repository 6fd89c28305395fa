"""The toy set-up every DeepSpeed test shares: a tiny model, per-rank data, configs, and the reference run.

Jobs launched on several ranks import it as ``ds_toy``; tests import it as
``jobs.ds_toy`` to compute the single-process reference the ranks must match.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from gradpower_ds import AdamPower
from gradpower_ds.jobs.model import CausalLM, ModelConfig

VOCAB, SEQ, MICRO_BATCH = 64, 16, 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LR_WD = {"lr": 1e-2, "weight_decay": 0.1}  # the optimizer settings every toy run shares
MATRIX_STEPS = 3  # optimizer steps per case of the ZeRO x precision x offload matrix
INITIAL_SCALE_POWER = 8  # fp16: dynamic loss scaling from 2**8, so no step of these short runs overflows


def make_model(seed: int = 0) -> CausalLM:
    """A 2-layer LLaMA-style model, identical for a given seed on every rank and in the reference."""
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(n_layers=2, dim=32, n_heads=4, ffn_dim=64, num_experts=0, vocab_size=VOCAB,
                                max_seq_len=SEQ))


def adam_power_engine(stage: int, universal: bool = False, **params):
    """A DeepSpeed engine of a fresh toy model under ZeRO `stage` with AdamPower (LR_WD and `params`, e.g. power),
    loading universal checkpoints where `universal`."""
    import deepspeed

    model = make_model()
    config = ds_config(stage, params=dict(LR_WD, **params))
    if universal:
        config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def micro_batch(rank: int, micro_step: int) -> torch.Tensor:
    """The tokens rank `rank` trains on at micro-step `micro_step` (deterministic)."""
    gen = torch.Generator().manual_seed(1000 * rank + micro_step)
    return torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=gen)


def ds_config(stage: int, dtype: str = "fp32", offload: bool = False, param_offload: bool = False,
              opt_type: str = "AdamPower", params: dict | None = None, gas: int = 2, clip: float = 1.0) -> dict:
    """A DeepSpeed config for the toy model: ZeRO `stage`, precision, offload, optimizer."""
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if param_offload:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "optimizer": {"type": opt_type, "params": dict(params or LR_WD)},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": INITIAL_SCALE_POWER}
    return config


def enable_cpu_fp16() -> None:
    """Test-only: DeepSpeed's CPU accelerator refuses fp16, though torch and gloo handle it on the CPU.

    Lets the fp16 dynamic-loss-scaling path run here; the GPU test covers it on real hardware.
    """
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    accelerator.is_fp16_supported = lambda: True
    dtypes = accelerator.supported_dtypes()
    if torch.float16 not in dtypes:  # DeepSpeed before 0.16.8 lists fp16 for no CPU, whatever is_fp16_supported says
        accelerator.supported_dtypes = lambda: [*dtypes, torch.float16]


def train(engine, rank: int, steps: int, first_step: int = 0) -> list[float]:
    """`steps` optimizer steps of `engine` on rank `rank`'s data; returns the micro-batch losses."""
    gas = engine.gradient_accumulation_steps()
    losses = []
    for step in range(first_step, first_step + steps):
        for micro in range(gas):
            tokens = micro_batch(rank, step * gas + micro).to(engine.device)
            loss = engine(tokens, tokens)[1]
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses


def full_fp32_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master copy (gathered from the ZeRO shards), by name."""
    from deepspeed.utils import safe_get_full_fp32_param

    # ZeRO 1-3 and the bf16 optimizer map params to their masters; the stage-0 fp16/bf16 wrappers keep
    # per-group lists of masters (unfused) or one flat master per group (fused): pair them up by position.
    opt = engine.optimizer
    masters = getattr(opt, "fp32_groups", None) or [
        flat.split([p.numel() for p in group]) for flat, group in zip(getattr(opt, "fp32_groups_flat", []),
                                                                      getattr(opt, "fp16_groups", []))]
    stage0 = {id(lp): hp.view(lp.shape) for lps, hps in zip(getattr(opt, "fp16_groups", []), masters)
              for lp, hp in zip(lps, hps)}
    out = {}
    for name, param in engine.module.named_parameters():
        master = safe_get_full_fp32_param(param)
        if master is None:
            master = stage0.get(id(param), param)
        out[name] = master.detach().float().cpu().clone()
    return out


def reference_gradients(master: CausalLM, step: int, dtype: str = "fp32", world: int = 2, gas: int = 2,
                        accumulate: str = "fp32") -> list[torch.Tensor]:
    """The gradient DeepSpeed averages for optimizer step `step`, computed in one process, one per parameter of
    `master` (fp32): each micro-batch of each of `world` ranks runs forward/backward in `dtype` on a copy of the
    masters (fp16 with the loss scaled by 2**INITIAL_SCALE_POWER, then unscaled); the gradients are summed in
    `accumulate` precision ("fp32", or the model dtype as ZeRO stage 0 does) and averaged over `world` ranks and
    `gas` micro-batches."""
    low = copy.deepcopy(master).to(DTYPES[dtype])
    params = list(master.parameters())
    scale = 2.0 ** INITIAL_SCALE_POWER if dtype == "fp16" else 1.0
    grads = [torch.zeros_like(p, dtype=DTYPES[accumulate]) for p in params]
    for rank in range(world):
        for micro in range(gas):
            with torch.no_grad():
                for lp, p in zip(low.parameters(), params):
                    lp.copy_(p)
            low.zero_grad(set_to_none=True)
            tokens = micro_batch(rank, step * gas + micro)
            (low(tokens, tokens)[1] * (scale / gas)).backward()
            for g, lp in zip(grads, low.parameters()):
                g += lp.grad.to(g.dtype)
    return [g.float() / (scale * world) for g in grads]


def reference_run(steps: int, dtype: str = "fp32", world: int = 2, gas: int = 2, clip: float = 1.0,
                  accumulate: str = "fp32", zero_grad_step: bool = False, **adam_power) -> dict[str, torch.Tensor]:
    """The same training in one process, unsharded: what every DeepSpeed configuration must reproduce.

    fp32 master weights stepped by the reference AdamPower (foreach=False) on reference_gradients(), clipped to
    global norm `clip` as DeepSpeed does (coefficient clip / (norm + 1e-6)). `zero_grad_step` first steps once on
    all-zero gradients, as DeepSpeed's stage-0 fp16/bf16 wrappers do when they initialise the optimizer state.
    """
    master = make_model()
    params = list(master.parameters())
    optimizer = AdamPower(params, foreach=False, **(adam_power or LR_WD))
    if zero_grad_step:
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    for step in range(steps):
        grads = reference_gradients(master, step, dtype, world, gas, accumulate)
        for p, g in zip(params, grads):
            p.grad = g
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
        coef = clip / (norm.item() + 1e-6)
        if clip > 0 and coef < 1:
            for p in params:
                p.grad.mul_(coef)
        optimizer.step()
    return {name: p.detach().clone() for name, p in master.named_parameters()}


def muon_reference_run(steps: int, dtype: str, power: float, adam_power: float, lr: float, weight_decay: float,
                       momentum: float, betas, eps: float, world: int = 2, gas: int = 2, accumulate: str = "fp32",
                       zero_grad_step: bool = False) -> dict[str, torch.Tensor]:
    """MuonPower's training in one process, unsharded, unclipped: on reference_gradients(), the matrices DeepSpeed
    gives Muon (2 or more dimensions, no "embed" or "lm_head" in the name) take phi_power (the float64
    reference), then DeepSpeed's Muon update (momentum, Newton-Schulz: its original_muon.muon_update) and
    decoupled weight decay; the other parameters take the reference AdamPower with adam_power. `accumulate` and
    `zero_grad_step` as for reference_run (on all-zero gradients Muon's update is 0: only the decay applies)."""
    from deepspeed.runtime.zero.muon.original_muon import muon_update

    from gradpower_ds.power import grad_power

    master = make_model()
    named = list(master.named_parameters())
    is_muon = [p.dim() >= 2 and not any(key in name.lower() for key in ("embed", "lm_head")) for name, p in named]
    adam = AdamPower([p for (_, p), muon in zip(named, is_muon) if not muon], foreach=False, lr=lr, betas=tuple(betas),
                     eps=eps, weight_decay=weight_decay, power=adam_power)
    momenta = {name: torch.zeros_like(p) for (name, p), muon in zip(named, is_muon) if muon}
    if zero_grad_step:
        with torch.no_grad():
            for (_, p), muon in zip(named, is_muon):
                if muon:
                    p.mul_(1 - lr * weight_decay)
                else:
                    p.grad = torch.zeros_like(p)
        adam.step()
    for step in range(steps):
        grads = reference_gradients(master, step, dtype, world, gas, accumulate)
        with torch.no_grad():
            for (name, p), g, muon in zip(named, grads, is_muon):
                if not muon:
                    p.grad = g
                    continue
                update = muon_update(grad_power(g, power), momenta[name], beta=momentum, ns_method="gram")
                p.mul_(1 - lr * weight_decay)
                p.add_(update.reshape(p.shape), alpha=-lr)
        adam.step()
    return {name: p.detach().clone() for name, p in named}


def matrix_cases() -> list[tuple[int, str, bool, bool]]:
    """(ZeRO stage, dtype, optimizer offload, param offload) combinations the integration must support."""
    cases = [(0, dtype, False, False) for dtype in DTYPES]
    cases += [(stage, dtype, offload, False) for stage in (1, 2, 3) for dtype in DTYPES for offload in (False, True)]
    cases += [(3, dtype, True, True) for dtype in DTYPES]
    return cases


def muon_cases() -> list[tuple[int, str, bool]]:
    """(ZeRO stage, dtype, optimizer offload) combinations MuonPower is checked in: every stage in fp32 and bf16,
    and ZeRO-2/3 with the optimizer offloaded to the CPU."""
    return [(stage, dtype, False) for stage in (0, 1, 2, 3) for dtype in ("fp32", "bf16")] + \
        [(stage, "fp32", True) for stage in (2, 3)]


def muon_case_name(stage: int, dtype: str, offload: bool) -> str:
    return case_name(stage, dtype, offload, False)


def skip_zero3_where_deepspeed_races(stage: int) -> None:
    """Skips a ZeRO-3 check on a DeepSpeed before gds.ZERO3_ON_CPU_FIXED_IN: on the CPU accelerator (gloo) its
    parameter all-gather races (DeepSpeed PR #8539), so its runs are nondeterministically wrong whatever the
    optimizer (docs/compatibility.md)."""
    import pytest

    from gradpower_ds import deepspeed as gds

    if stage == 3 and not gds.DEEPSPEED.installed_at_least(gds.ZERO3_ON_CPU_FIXED_IN):
        pytest.skip(f"DeepSpeed {gds.DEEPSPEED.installed()}: ZeRO-3 on the CPU accelerator races before "
                    f"{gds.ZERO3_ON_CPU_FIXED_IN} (DeepSpeed PR #8539), whatever the optimizer")


def case_name(stage: int, dtype: str, offload: bool, param_offload: bool) -> str:
    """A readable id such as 'z3-bf16-offload-params'."""
    return f"z{stage}-{dtype}" + ("-offload" if offload else "") + ("-params" if param_offload else "")


def save_and_finish(results: dict, path: str) -> None:
    """A job's end: rank 0 saves `results` to `path`, then every rank waits for it and leaves the process group."""
    if dist.get_rank() == 0:
        torch.save(results, path)
    dist.barrier()
    dist.destroy_process_group()
