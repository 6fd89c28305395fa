"""Launched job: AdamPower under ZeRO with DeepSpeed's passes around the step folded into it, and without.

For each case of CASES it trains FOLD_STEPS steps twice, GRADPOWER_FOLD=1 then 0, and saves per
rank (argv[1]/rank<r>.pt): the losses, the full fp32 masters, this rank's low-precision partition (ZeRO-3's
ds_tensor, else the module's params), and how many steps received a folded grad_scale (with its values) and a
folded copy-out. Two gloo ranks on the CPU accelerator, where our optimizer is CPUAdamPower (the native kernel).
"""

import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from gradpower_ds.deepspeed import register
from gradpower_ds.jobs.processes import exit_when_done
from gradpower_ds.optimizer_base import AdamPowerBase

try:
    import ds_toy  # launched: tests/jobs is sys.path[0]
except ImportError:  # imported by the tests as jobs.ds_fold, for CASES and FOLD_STEPS
    from jobs import ds_toy

FOLD_STEPS = 3
CLIP = 1e-3  # below the toy's gradient norms, so the coefficient clips (fp16: the loss scale's inverse too)
# (stage, dtype, optimizer offload): bf16 and fp16 (the loss scale in the coefficient), each stage, and offload
CASES = [(1, "bf16", False), (2, "fp16", False), (2, "bf16", True), (3, "bf16", False), (3, "fp16", False),
         (3, "bf16", True), (3, "fp32", False)]


def counting_folds() -> dict:
    """Counts what AdamPowerBase.fold_into_next_step is asked (grad_scale values, copy-outs) from now on."""
    seen = {"grad_scale": [], "copy_out": 0}
    original = AdamPowerBase.fold_into_next_step

    def fold(self, *, grad_scale=None, copy_out=None):
        if grad_scale is not None:
            seen["grad_scale"].append(grad_scale)
        seen["copy_out"] += len(copy_out or {})
        return original(self, grad_scale=grad_scale, copy_out=copy_out)

    AdamPowerBase.fold_into_next_step = fold
    return seen


def low_precision_partition(engine) -> list[torch.Tensor]:
    """This rank's low-precision weights: ZeRO-3's partitions (ds_tensor), else the module's params."""
    return [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]


def main():
    register()
    ds_toy.enable_cpu_fp16()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    seen = counting_folds()
    results = {}
    for stage, dtype, offload in CASES:
        for folded in ("1", "0"):
            os.environ["GRADPOWER_FOLD"] = folded
            seen["grad_scale"].clear()
            seen["copy_out"] = 0
            config = ds_toy.ds_config(stage, dtype, offload, params=dict(ds_toy.LR_WD, power=1.2), clip=CLIP)
            model = ds_toy.make_model()
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
            losses = ds_toy.train(engine, rank, FOLD_STEPS)
            results[(ds_toy.case_name(stage, dtype, offload, False), folded)] = dict(
                losses=losses, params=ds_toy.full_fp32_params(engine), low=low_precision_partition(engine),
                grad_scales=[float(s) for s in seen["grad_scale"]], copy_outs=seen["copy_out"],
                optimizer=type(engine.basic_optimizer).__name__)
            engine.destroy()
    torch.save(results, os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    exit_when_done(main)
