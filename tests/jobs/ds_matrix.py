"""Launched job: every ZeRO stage x precision x offload case, three optimizers each.

For each case of ds_toy.matrix_cases() (or only those named after argv[1], e.g. z2-bf16) it
trains MATRIX_STEPS steps with AdamPower (power 1.2), AdamPower (power 1) and DeepSpeed's own
AdamW, and saves the full fp32 parameters to argv[1] (a torch.save dict, written by rank 0).
For fp16 it also forces one overflowing step and records that DeepSpeed skipped it without
touching parameters or our state. CPU ranks (gloo; the tests launch 2), or one rank per GPU
(nccl) where CUDA is available (tests/test_gpu.py launches 1).
"""

import os
import sys

import deepspeed
import torch
import torch.distributed as dist

import ds_toy
from gradpower_ds.deepspeed import register
from gradpower_ds.jobs.processes import exit_when_done

OPTIMIZERS = {
    "power1.2": ("AdamPower", dict(ds_toy.LR_WD, power=1.2)),
    "power1": ("AdamPower", dict(ds_toy.LR_WD, power=1.0)),
    "ds_adamw": ("AdamW", ds_toy.LR_WD),
}


def overflow_is_skipped(engine) -> dict:
    """One optimizer step whose loss is inf: DeepSpeed must skip it, leaving params and our state as they were."""
    before = ds_toy.full_fp32_params(engine)
    steps_before = sorted(float(s["step"]) for s in engine.basic_optimizer.state.values())
    skipped = engine.skipped_steps
    for micro in range(engine.gradient_accumulation_steps()):
        tokens = ds_toy.micro_batch(dist.get_rank(), 10**6 + micro).to(engine.device)
        loss = engine(tokens, tokens)[1]
        engine.backward(loss * float("inf") if micro == 0 else loss)
        engine.step()
    after = ds_toy.full_fp32_params(engine)
    return dict(
        skipped=engine.skipped_steps - skipped,
        params_unchanged=all(torch.equal(before[k], after[k]) for k in before),
        state_steps_unchanged=steps_before == sorted(float(s["step"]) for s in engine.basic_optimizer.state.values()),
    )


def main():
    register()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        ds_toy.enable_cpu_fp16()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank = dist.get_rank()
    results = {}
    chosen = set(sys.argv[2:])
    for case in ds_toy.matrix_cases():
        if chosen and ds_toy.case_name(*case) not in chosen:
            continue
        stage, dtype, offload, param_offload = case
        for label, (opt_type, params) in OPTIMIZERS.items():
            config = ds_toy.ds_config(stage, dtype, offload, param_offload, opt_type=opt_type, params=params)
            model = ds_toy.make_model()
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
            ds_toy.train(engine, rank, ds_toy.MATRIX_STEPS)
            key = (ds_toy.case_name(*case), label)
            results[key] = dict(params=ds_toy.full_fp32_params(engine), wrapper=type(engine.optimizer).__name__,
                                optimizer=type(engine.basic_optimizer).__name__)
            if dtype == "fp16" and label == "power1.2":
                results[key]["overflow"] = overflow_is_skipped(engine)
            engine.destroy()
            if rank == 0:
                print("done", key, results[key]["optimizer"], flush=True)
    ds_toy.save_and_finish(results, sys.argv[1])


if __name__ == "__main__":
    exit_when_done(main)
