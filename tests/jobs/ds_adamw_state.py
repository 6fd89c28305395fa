"""Launched job: DeepSpeed "type": "AdamW" checkpoints resumed with "type": "AdamPower" (issue 35, item 3).

``ds_adamw_state.py ROOT OUT`` (2 ranks): for each of CASES, a run with DeepSpeed's AdamW (torch's AdamW:
``torch_adam``, on the offloaded CPU copy too) trains SAVE_AT steps and saves under ROOT/<case>, then trains on
to STEPS; a fresh AdamPower engine (power 1.0, i.e. Adam) loads the checkpoint and trains the same remaining
steps, and another (power 1.2) does too. Rank 0 writes each run's full fp32 params to OUT (torch.save).
"""

import sys

import deepspeed

from gradpower_ds import deepspeed as gds
from gradpower_ds.jobs.processes import exit_when_done

try:
    import ds_toy  # launched: tests/jobs is sys.path[0]
except ImportError:  # imported by the tests as jobs.ds_adamw_state, for CASES
    from jobs import ds_toy

STEPS, SAVE_AT = 4, 2
CASES = [(2, False), (3, False), (2, True), (3, True)]  # (ZeRO stage, offload_optimizer)


def case_name(stage: int, offload: bool) -> str:
    """'z2', 'z3-offload', ..."""
    return f"z{stage}" + ("-offload" if offload else "")


def engine_for(stage: int, offload: bool, opt_type: str, power: float | None = None):
    """A fresh toy model under ZeRO `stage` with DeepSpeed's `opt_type` ("AdamW": torch's AdamW everywhere)."""
    params = dict(ds_toy.LR_WD, **({"torch_adam": True} if opt_type == "AdamW" else {"power": power}))
    config = ds_toy.ds_config(stage, offload=offload, opt_type=opt_type, params=params)
    if opt_type == "AdamW" and offload:
        config["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW on the CPU copy, not DeepSpeedCPUAdam
    model = ds_toy.make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def main() -> None:
    root, out = sys.argv[1], sys.argv[2]
    gds.register()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = deepspeed.comm.get_rank()
    results = {}
    for stage, offload in CASES:
        name = case_name(stage, offload)
        folder = f"{root}/{name}"
        adamw = engine_for(stage, offload, "AdamW")
        ds_toy.train(adamw, rank, SAVE_AT)
        adamw.save_checkpoint(folder, tag="adamw")
        ds_toy.train(adamw, rank, STEPS - SAVE_AT, first_step=SAVE_AT)
        results[name] = {"adamw": ds_toy.full_fp32_params(adamw), "optimizer": type(adamw.basic_optimizer).__name__}
        adamw.destroy()
        for power in (1.0, 1.2):
            resumed = engine_for(stage, offload, "AdamPower", power)
            resumed.load_checkpoint(folder, tag="adamw")
            ds_toy.train(resumed, rank, STEPS - SAVE_AT, first_step=SAVE_AT)
            results[name][power] = ds_toy.full_fp32_params(resumed)
            results[name][f"groups {power}"] = [
                {k: v for k, v in g.items() if k != "params"} for g in resumed.basic_optimizer.param_groups]
            resumed.destroy()
    ds_toy.save_and_finish(results, out)


if __name__ == "__main__":
    exit_when_done(main)
