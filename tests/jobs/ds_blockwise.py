"""Launched job: blockwise param groups through deepspeed.initialize, in every case of CASES (2 gloo ranks).

Each case builds the toy model's blockwise_param_groups (base lr BASE_LR), trains STEPS steps of AdamPower and
records, before every step, each optimizer group's (name, lr, multiplier), then the full fp32 parameters. The
"refused" case (WarmupDecayLR with a warmup_max_lr, which gives every group one lr) records the error instead;
"moe" builds the MoE toy model (experts over both ranks) and records its groups after DeepSpeed's MoE split.
Rank 0 writes everything to argv[1] (torch.save).
"""

import sys

import deepspeed
import torch
import torch.distributed as dist

from gradpower_ds.blockwise import LR_MULTIPLIER_KEY, blockwise_param_groups
from gradpower_ds.deepspeed import register
from gradpower_ds.jobs.model import CausalLM, ModelConfig
from gradpower_ds.jobs.processes import exit_when_done

try:
    import ds_toy  # launched: tests/jobs is sys.path[0]
except ImportError:  # imported by the tests as jobs.ds_blockwise, for the settings
    from jobs import ds_toy

STEPS, WARMUP, BASE_LR, WEIGHT_DECAY = 5, 2, 1e-3, 0.1
COSINE = {"type": "WarmupCosineLR", "params": {"total_num_steps": STEPS, "warmup_num_steps": WARMUP,
                                               "warmup_type": "linear", "cos_min_ratio": 0.1}}
DECAY = {"type": "WarmupDecayLR", "params": {"total_num_steps": STEPS, "warmup_num_steps": WARMUP,
                                             "warmup_max_lr": BASE_LR, "warmup_type": "linear"}}
# name -> (ZeRO stage, optimizer offload, the DeepSpeed config's scheduler or "lambda": a client torch LambdaLR)
CASES = {"z0-cosine": (0, False, COSINE), "z1-cosine": (1, False, COSINE), "z2-cosine": (2, False, COSINE),
         "z3-cosine": (3, False, COSINE), "z2-offload-cosine": (2, True, COSINE), "z1-lambda": (1, False, "lambda"),
         "refused": (1, False, DECAY)}


def lambda_schedule(step: int) -> float:
    """The client scheduler's factor: linear warmup over WARMUP steps, then linear decay to 0.2."""
    return (step + 1) / WARMUP if step < WARMUP else 1.0 - 0.8 * (step - WARMUP + 1) / (STEPS - WARMUP)


def group_lrs(engine) -> list[tuple[str, float, float]]:
    return [(g["name"], float(g["lr"]), g.get(LR_MULTIPLIER_KEY)) for g in engine.optimizer.param_groups]


def run_case(stage: int, offload: bool, scheduler) -> dict:
    config = ds_toy.ds_config(stage, offload=offload, params={"lr": BASE_LR, "weight_decay": WEIGHT_DECAY})
    client = None
    if scheduler == "lambda":
        client = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda_schedule)  # noqa: E731
    else:
        config["scheduler"] = scheduler
    model = ds_toy.make_model()
    engine, *_ = deepspeed.initialize(model=model, config=config, lr_scheduler=client,
                                      model_parameters=blockwise_param_groups(model, BASE_LR,
                                                                              weight_decay=WEIGHT_DECAY))
    lrs = []
    for step in range(STEPS):
        lrs.append(group_lrs(engine))
        ds_toy.train(engine, dist.get_rank(), 1, first_step=step)
    result = dict(lrs=lrs, params=ds_toy.full_fp32_params(engine))
    engine.destroy()
    return result


def moe_groups() -> dict:
    """The MoE toy model's optimizer groups after DeepSpeed's MoE split (name, lr, multiplier, moe), and the
    expert parameters' group lrs, after one step."""
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(n_layers=1, dim=32, n_heads=4, ffn_dim=32, num_experts=2, ep_size=2,
                                 vocab_size=ds_toy.VOCAB, max_seq_len=ds_toy.SEQ))
    engine, *_ = deepspeed.initialize(model=model, config=ds_toy.ds_config(2, params={"lr": BASE_LR}),
                                      model_parameters=blockwise_param_groups(model, BASE_LR))
    ds_toy.train(engine, dist.get_rank(), 1)
    groups = [(g["name"], float(g["lr"]), g.get(LR_MULTIPLIER_KEY), bool(g.get("moe", False)))
              for g in engine.optimizer.param_groups]
    engine.destroy()
    return dict(groups=groups)


def main():
    register()
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for name, case in CASES.items():
        try:
            results[name] = run_case(*case)
        except ValueError as error:
            results[name] = dict(error=str(error))
    results["moe"] = moe_groups()
    ds_toy.save_and_finish(results, sys.argv[1])


if __name__ == "__main__":
    exit_when_done(main)
