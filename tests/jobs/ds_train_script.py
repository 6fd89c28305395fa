"""An ordinary DeepSpeed training script that knows nothing of gradpower_ds: the runner's test subject.

Started through ``python -m gradpower_ds.jobs.run`` its configs may say ``"type": "AdamPower"``.
For each ``--deepspeed_config`` it builds the toy model (the MoE toy with experts on
``--moe_ep_size`` ranks when that is > 0), trains ``--steps`` optimizer steps and
records what a test needs; each rank writes its records to ``--out/rank<R>.pt``,
keyed by config file stem.
"""

import argparse
import json
import os
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

import ds_moe_toy
import ds_toy
from gradpower_ds.jobs.processes import exit_when_done


def parse_args() -> argparse.Namespace:
    """Command line: configs, model, steps, output folder, and the launcher's --local_rank."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deepspeed_config", nargs="+", required=True, help="DeepSpeed JSON config(s), run in turn")
    parser.add_argument("--moe_ep_size", type=int, default=0, help="0: dense toy; N: MoE toy, experts on N ranks")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per config")
    parser.add_argument("--out", required=True, help="folder for rank<R>.pt")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser.parse_args()


def train_one(config_path: str, args: argparse.Namespace, rank: int) -> dict:
    """Trains the toy model with one config.

    Returns the optimizer's class and param groups, the losses, the fp32 params
    before and after training (experts under their global index) and the seconds taken.
    """
    start_time = time.perf_counter()
    config = json.loads(Path(config_path).read_text())
    model = ds_moe_toy.make_moe_model(args.moe_ep_size) if args.moe_ep_size else ds_toy.make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    start = ds_toy.full_fp32_params(engine)
    losses = ds_toy.train(engine, rank, args.steps)
    params = ds_toy.full_fp32_params(engine)
    if args.moe_ep_size:
        start, params = ({ds_moe_toy.global_expert_name(k, rank, args.moe_ep_size): v for k, v in d.items()}
                         for d in (start, params))
    record = dict(
        optimizer=type(engine.basic_optimizer).__name__,
        groups=[{k: v for k, v in group.items() if k != "params"} for group in engine.basic_optimizer.param_groups],
        losses=losses, start=start, params=params, seconds=time.perf_counter() - start_time)
    engine.destroy()
    return record


def main():
    """Trains every config given and saves this rank's records."""
    args = parse_args()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    rank = dist.get_rank()
    results = {Path(path).stem: train_one(path, args, rank) for path in args.deepspeed_config}
    results["launch"] = dict(world_size=dist.get_world_size(), local_rank_arg=args.local_rank,
                             local_rank_env=int(os.environ["LOCAL_RANK"]))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.save(results, Path(args.out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    exit_when_done(main)
