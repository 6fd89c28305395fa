"""Launched job (1 rank, gloo): how deepspeed.initialize treats AdamPower configs, good and bad.

Writes a JSON dict to argv[1]: for each check, the optimizer class built or the error raised.
FEATURE_CHECKS are the DeepSpeed features that step only with DeepSpeed's own Adam (refused with a ValueError
inside deepspeed.initialize) and their neighbours that must still build ours.
"""

import json
import sys

import deepspeed
import torch.distributed as dist

import ds_toy
from gradpower_ds.deepspeed import register, unregister
from gradpower_ds.jobs.processes import exit_when_done

CHECKS = {
    "lowercase": dict(opt_type="adampower"),
    "uppercase_adamw": dict(opt_type="ADAMWPOWER", params=dict(power=1.1)),
    "l2_mode": dict(opt_type="AdamPower", params=dict(adam_w_mode=False, weight_decay=0.1)),
    "zero2": dict(stage=2),
    "zero3_offload": dict(stage=3, offload=True),
    "unknown_key": dict(params=dict(lr=1e-3, pwr=1.2)),
    "bad_power": dict(params=dict(power=0.0)),
    "bad_expert_power": dict(params=dict(expert_power=-1.0)),
    "adamw_l2_conflict": dict(opt_type="AdamWPower", params=dict(adam_w_mode=False)),
}

CPU_OFFLOAD = {"device": "cpu"}
FEATURE_CHECKS = {
    "partial_offload": dict(stage=3, zero={"offload_optimizer": dict(CPU_OFFLOAD, ratio=0.5)}),
    "full_offload_ratio": dict(stage=3, zero={"offload_optimizer": dict(CPU_OFFLOAD, ratio=1.0)}),
    "super_offload": dict(stage=3, zero={"offload_optimizer": dict(CPU_OFFLOAD, super_offload=True)}),
    # DeepSpeed uses SuperOffload only at ZeRO-3 and ignores the flag below: ours is built as without it
    "super_offload_zero2": dict(stage=2, zero={"offload_optimizer": dict(CPU_OFFLOAD, super_offload=True)}),
    "zenflow": dict(stage=2, zero={"offload_optimizer": CPU_OFFLOAD, "overlap_comm": True, "zenflow": {}}),
    "zenflow_overlap_step": dict(stage=2, zero={"offload_optimizer": CPU_OFFLOAD, "overlap_comm": True,
                                                "zenflow": {"overlap_step": True}}),
    "bf16_master_weights": dict(stage=2, dtype="bf16", zero={"offload_optimizer": CPU_OFFLOAD},
                                extra={"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}),
    "bf16_master_weights_zero3": dict(stage=3, dtype="bf16", zero={"offload_optimizer": CPU_OFFLOAD},
                                      extra={"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}),
    "fp16_master_weights": dict(stage=2, dtype="fp16", zero={"offload_optimizer": CPU_OFFLOAD},
                                extra={"fp16": {"enabled": True, "fp16_master_weights_and_grads": True}}),
    "bf16_optimizer_states_zero2": dict(stage=2, dtype="bf16", zero={"offload_optimizer": CPU_OFFLOAD},
                                        extra={"bf16": {"enabled": True, "bf16_master_weights_and_grads": True,
                                                        "bf16_optimizer_states": True}}),
}


def features_of_this_deepspeed() -> dict:
    """Which of the FEATURE_CHECKS' features this DeepSpeed has (older ones lack some, e.g. ZenFlow and
    bf16_optimizer_states): a config field or an engine method of its own."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadOptimizerConfig

    offload_fields = DeepSpeedZeroOffloadOptimizerConfig.model_fields
    return {"partial_offload": "ratio" in offload_fields, "super_offload": "super_offload" in offload_fields,
            "zenflow": "zenflow" in DeepSpeedZeroConfig.model_fields,
            **{name: hasattr(DeepSpeedEngine, name) for name in (
                "bf16_optimizer_states", "bf16_master_weights_and_gradients", "fp16_master_weights_and_gradients")}}


def build(stage=0, offload=False, opt_type="AdamPower", params=None, extra=None, dtype="fp32", zero=None) -> dict:
    """deepspeed.initialize on the toy model; returns what was built or what was raised.

    zero: keys merged into "zero_optimization"; extra: top-level keys replacing the config's.
    """
    config = ds_toy.ds_config(stage, dtype=dtype, offload=offload, opt_type=opt_type, params=params)
    config["zero_optimization"].update(zero or {})
    config.update(extra or {})
    model = ds_toy.make_model()
    try:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    except Exception as exc:  # the job reports every failure; the test decides which are expected
        return dict(error=type(exc).__name__, message=str(exc))
    group = engine.basic_optimizer.param_groups[0]
    built = dict(optimizer=type(engine.basic_optimizer).__name__, power=group["power"],
                 adam_w_mode=group["adam_w_mode"], weight_decay=group["weight_decay"])
    engine.destroy()
    return built


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    results = {"unregistered": build(), "features": features_of_this_deepspeed()}
    register()
    register()  # idempotent
    results.update({name: build(**kwargs) for name, kwargs in CHECKS.items()})
    results["bf16_optimizer_states"] = build(extra={"bf16": {"enabled": True, "bf16_optimizer_states": True}})
    ds_toy.enable_cpu_fp16()  # for "fp16_master_weights" (the CPU accelerator refuses fp16 otherwise)
    results.update({name: build(**kwargs) for name, kwargs in FEATURE_CHECKS.items()})
    unregister()
    results["after_unregister"] = build()
    with open(sys.argv[1], "w") as out:
        json.dump(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    exit_when_done(main)
