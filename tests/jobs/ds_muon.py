"""Launched job: MuonPower against DeepSpeed's own Muon, in every case of ds_toy.muon_cases() (or only those named
after argv[1], e.g. z2-bf16). CPU ranks (gloo; the tests launch 2), or one rank per GPU (nccl) where CUDA is
available (tests/test_gpu.py launches 1).

For each case it trains MUON_STEPS steps (2 micro-batches each) with MuonPower (POWER, ADAM_POWER), MuonPower
(1, 1) and DeepSpeed's "Muon", and records the full fp32 parameters and the optimizer classes. For the cases
of RESUME_CASES it also trains MuonPower for 1 step, saves a checkpoint, loads it into a new engine and trains
the remaining steps. Rank 0 writes everything to argv[1] (torch.save).
"""

import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from gradpower_ds.deepspeed import register
from gradpower_ds.jobs.processes import exit_when_done

try:
    import ds_toy  # launched: tests/jobs is sys.path[0]
except ImportError:  # imported by the tests as jobs.ds_muon, for the settings
    from jobs import ds_toy

POWER, ADAM_POWER = 1.5, 1.2
MUON_STEPS = 3
MUON_PARAMS = dict(lr=1e-2, weight_decay=0.1, momentum=0.95, betas=[0.9, 0.95], eps=1e-8)
OPTIMIZERS = {
    "power": ("MuonPower", dict(MUON_PARAMS, power=POWER, adam_power=ADAM_POWER)),
    "power1": ("MuonPower", dict(MUON_PARAMS, power=1.0, adam_power=1.0)),
    "ds_muon": ("Muon", MUON_PARAMS),
}
RESUME_CASES = ("z0-fp32", "z2-bf16", "z3-fp32")


def engine_for(case, label):
    stage, dtype, offload = case
    opt_type, params = OPTIMIZERS[label]
    config = ds_toy.ds_config(stage, dtype, offload, opt_type=opt_type, params=params, clip=0.0)
    if stage == 3:
        config["zero_optimization"]["reduce_scatter"] = False  # DeepSpeed's ZeRO-3 Muon refuses reduce-scatter
    model = ds_toy.make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def resumed(case, checkpoint_dir) -> dict:
    """MuonPower trained 1 step, saved, loaded into a fresh engine, trained MUON_STEPS - 1 more."""
    rank = dist.get_rank()
    engine = engine_for(case, "power")
    ds_toy.train(engine, rank, 1)
    engine.save_checkpoint(checkpoint_dir, tag="step1")
    engine.destroy()
    engine = engine_for(case, "power")
    engine.load_checkpoint(checkpoint_dir, tag="step1")
    ds_toy.train(engine, rank, MUON_STEPS - 1, first_step=1)
    params = ds_toy.full_fp32_params(engine)
    engine.destroy()
    return params


def main():
    register()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank = dist.get_rank()
    results = {}
    chosen = set(sys.argv[2:])
    for case in ds_toy.muon_cases():
        name = ds_toy.muon_case_name(*case)
        if chosen and name not in chosen:
            continue
        for label in OPTIMIZERS:
            engine = engine_for(case, label)
            ds_toy.train(engine, rank, MUON_STEPS)
            results[(name, label)] = dict(params=ds_toy.full_fp32_params(engine),
                                          wrapper=type(engine.optimizer).__name__,
                                          optimizer=type(engine.basic_optimizer).__name__,
                                          aux=type(engine.basic_optimizer.aux_optimizer).__name__)
            engine.destroy()
        if name in RESUME_CASES:
            results[(name, "resumed")] = dict(params=resumed(case, f"{sys.argv[1]}.{name}.ckpt"))
        if rank == 0:
            print("done", name, flush=True)
    ds_toy.save_and_finish(results, sys.argv[1])


if __name__ == "__main__":
    exit_when_done(main)
