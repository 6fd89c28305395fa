"""Launched job: AdamPower checkpoints through DeepSpeed (save/load, universal checkpoints, resume after SIGKILL).

Modes (argv[1]):

- ``resume ROOT OUT`` (2 ranks): for each of CASES, an uninterrupted run of STEPS steps;
  a run of SAVE_AT steps saved under ROOT/<case>; a fresh engine that loads it and
  trains on; the checkpoint converted with ds_to_universal and loaded the same way.
  Rank 0 writes parameters, step counts and state comparisons to OUT (torch.save).
- ``universal1 ROOT OUT`` (1 rank): loads the universal checkpoints ``resume`` left in ROOT
  and trains on the same data the 2 ranks saw (their micro-batches as 4 accumulation steps).
- ``train CKPT OUT TOTAL EVERY DELAY`` (2 ranks): trains to TOTAL steps from CKPT's
  ``latest`` checkpoint if there is one, saving every EVERY steps and sleeping DELAY s
  per step; appends progress ("step N", "saved TAG", "finished") to CKPT/progress.txt
  and writes each rank's pid to CKPT/pid.RANK, so a test can kill it mid-run. On
  finishing it also trains an uninterrupted TOTAL-step run and writes both to OUT.
"""

import contextlib
import os
import subprocess
import sys
import time
from unittest import mock

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_optimizer_state

from gradpower_ds import deepspeed as gds
from gradpower_ds.deepspeed import universal
from gradpower_ds.jobs.processes import exit_when_done

try:
    import ds_toy  # launched: tests/jobs is sys.path[0]
except ImportError:  # imported by the tests as jobs.ds_checkpoint, for CASES and the constants
    from jobs import ds_toy

# DeepSpeed before 0.18.0: register() refuses universal-checkpoint loads (the job records the refusal instead)
UNIVERSAL = gds.DEEPSPEED.installed_at_least(gds.UNIVERSAL_CHECKPOINTS_FROM)
STEPS, SAVE_AT = 4, 2  # optimizer steps of a full run; the step after which it is checkpointed
PARAMS = dict(ds_toy.LR_WD, power=1.2)
# (ZeRO stage, dtype, offload_optimizer, layout); layouts: "1group" (all params in one group),
# "2groups" (decay / no-decay groups), "subgroups" (one group that ZeRO-3 steps in sub-groups)
CASES = [(stage, "fp32", offload, "1group") for stage in (1, 2, 3) for offload in (False, True)]
CASES += [(2, "bf16", False, "1group"), (3, "bf16", True, "1group"), (2, "fp32", False, "2groups"),
          (3, "fp32", False, "2groups"), (3, "fp32", False, "subgroups")]
# the configuration the SIGKILL test trains: ZeRO-3 with offload, or ZeRO-2 where DeepSpeed's ZeRO-3 races on the CPU
KILL_CASE = (3 if gds.DEEPSPEED.installed_at_least(gds.ZERO3_ON_CPU_FIXED_IN) else 2, "fp32", True, "2groups")
SUB_GROUP_SIZE = 4000  # elements: ZeRO-3 steps the toy model's one param group in 3 sub-groups


def case_name(stage: int, dtype: str, offload: bool, layout: str) -> str:
    """A readable id such as 'z3-fp32-offload-2groups'."""
    return f"z{stage}-{dtype}" + ("-offload" if offload else "") + ("" if layout == "1group" else f"-{layout}")


def zero3_universal_defect(case) -> bool:
    """Whether DeepSpeed 0.19.8's own ZeRO-3 universal load mis-restores `case` (several sub-groups)."""
    return case[0] == 3 and case[3] != "1group"


def make_engine(case, gas: int = 2, universal: bool = False):
    """A fresh model and DeepSpeed engine for `case` (AdamPower, power 1.2)."""
    stage, dtype, offload, layout = case
    config = ds_toy.ds_config(stage, dtype, offload, params=PARAMS, gas=gas)
    if layout == "subgroups":
        config["zero_optimization"]["sub_group_size"] = SUB_GROUP_SIZE
    if universal:
        config["checkpoint"] = {"load_universal": True}
    model = ds_toy.make_model()
    params = list(model.parameters())
    if layout == "2groups":
        params = [{"params": [p for p in params if p.dim() > 1]},
                  {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    return engine


def local_state(engine) -> list[dict]:
    """This rank's optimizer state, one dict per flat fp32 partition, in partition order.

    ZeRO keeps one flat fp32 tensor per (sub-)group on each rank and the base optimizer
    keys its state by it; this is what a checkpoint saves and a resume must restore.
    """
    opt = engine.optimizer
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or opt.single_partition_of_fp32_groups
    return [{k: (float(v) if k == "step" else v.clone()) for k, v in engine.basic_optimizer.state[f].items()}
            for f in flats]


def states_equal(a: list[dict], b: list[dict]) -> bool:
    """Whether two local_state() results are bitwise identical (steps, exp_avg, exp_avg_sq)."""
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] == y[k] if k == "step" else torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b))


def steps_of(engine) -> list[float]:
    """This rank's optimizer step count of every flat partition."""
    return [s["step"] for s in local_state(engine)]


def full_states(engine) -> dict:
    """exp_avg and exp_avg_sq of every parameter, gathered whole, by (name, key).

    ZeRO 1/2 with several param groups: DeepSpeed 0.19.8 links the params to their state
    after the first group's step, before the other groups have any, so only group 0 works.
    """
    return {(name, key): safe_get_full_optimizer_state(p, key).clone()
            for name, p in engine.module.named_parameters() for key in ("exp_avg", "exp_avg_sq")}


def gathered(value) -> list:
    """`value` from every rank, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def to_universal(checkpoints: list[str]) -> None:
    """Rank 0 converts each checkpoint folder's `latest` tag with DeepSpeed's CLI, two at a time.

    The output goes to <tag>_universal and DeepSpeed writes <folder>/latest_universal.
    --inject_missing_state: only Megatron-style models record the `universal_checkpoint_info`
    the converter asks for; a plain module needs none of its patterns.
    """
    if dist.get_rank() == 0:
        for pair in (checkpoints[i:i + 2] for i in range(0, len(checkpoints), 2)):
            procs = []
            for ckpt in pair:
                with open(os.path.join(ckpt, "latest")) as f:
                    tag = f.read().strip()
                cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                       "--input_folder", os.path.join(ckpt, tag),
                       "--output_folder", os.path.join(ckpt, f"{tag}_universal"),
                       "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            for proc in procs:
                _, err = proc.communicate()
                if proc.returncode:
                    raise RuntimeError(f"ds_to_universal failed:\n{err[-4000:]}")
    dist.barrier()


def deepspeed_unrepaired(case):
    """Context in which ZeRO-3 universal loads run as DeepSpeed 0.19.8 has them, without register()'s repair."""
    if not zero3_universal_defect(case):
        return contextlib.nullcontext()
    return mock.patch.object(universal, "repair_zero3_load", lambda zero_optimizer, saved: None)


def save_and_resume(case, root: str, rank: int) -> tuple[dict, list, list]:
    """Uninterrupted run, run saved at SAVE_AT, fresh engine loading it and training on.

    Returns the results and this rank's optimizer state at the end of the uninterrupted
    run and at the save, for the universal-checkpoint comparisons.
    """
    ckpt = os.path.join(root, case_name(*case))
    res = {}
    engine = make_engine(case)
    ds_toy.train(engine, rank, STEPS)
    res["ref"], ref_state = ds_toy.full_fp32_params(engine), local_state(engine)
    res["ref_steps"] = gathered(steps_of(engine))
    engine.destroy()

    engine = make_engine(case)
    ds_toy.train(engine, rank, SAVE_AT)
    saved_state = local_state(engine)
    if case[3] != "2groups":
        res["saved_states"] = full_states(engine)
    engine.save_checkpoint(ckpt)
    engine.destroy()

    engine = make_engine(case)
    engine.load_checkpoint(ckpt)
    res["resume_global_steps"] = engine.global_steps
    res["resume_steps_loaded"] = gathered(steps_of(engine))
    ds_toy.train(engine, rank, STEPS - SAVE_AT, first_step=SAVE_AT)
    res["resume"], res["resume_steps"] = ds_toy.full_fp32_params(engine), gathered(steps_of(engine))
    res["resume_state_equal"] = gathered(states_equal(local_state(engine), ref_state))
    engine.destroy()

    if case == (2, "fp32", False, "1group"):  # negative control: weights restored, optimizer state not
        engine = make_engine(case)
        engine.load_checkpoint(ckpt, load_optimizer_states=False)
        ds_toy.train(engine, rank, STEPS - SAVE_AT, first_step=SAVE_AT)
        res["module_only"] = ds_toy.full_fp32_params(engine)
        engine.destroy()
    return res, ref_state, saved_state


def resume_universal(case, root: str, rank: int, res: dict, ref_state: list, saved_state: list) -> None:
    """Fresh engines loading the case's universal checkpoint and training on; results go into `res`.

    Cases DeepSpeed itself mis-restores also run without register()'s repair ("universal_unrepaired").
    """
    ckpt = os.path.join(root, case_name(*case))
    for variant in ["universal"] + (["universal_unrepaired"] if zero3_universal_defect(case) else []):
        engine = make_engine(case, universal=True)
        with deepspeed_unrepaired(case) if variant == "universal_unrepaired" else contextlib.nullcontext():
            engine.load_checkpoint(ckpt)
        res[f"{variant}_global_steps"] = engine.global_steps
        res[f"{variant}_steps_loaded"] = gathered(steps_of(engine))
        res[f"{variant}_loaded_state_equal"] = gathered(states_equal(local_state(engine), saved_state))
        ds_toy.train(engine, rank, STEPS - SAVE_AT, first_step=SAVE_AT)
        res[variant], res[f"{variant}_steps"] = ds_toy.full_fp32_params(engine), gathered(steps_of(engine))
        res[f"{variant}_state_equal"] = gathered(states_equal(local_state(engine), ref_state))
        engine.destroy()


def universal_refusal(case) -> str:
    """The error deepspeed.initialize raises for a universal-checkpoint load of `case` (DeepSpeed < 0.18.0)."""
    try:
        make_engine(case, universal=True).destroy()
    except ValueError as exc:
        return str(exc)
    return "(not refused)"


def resume(root: str, out: str) -> None:
    """Mode `resume`: save_and_resume for every case, then all conversions, then resume_universal."""
    rank = dist.get_rank()
    results, states = {}, {}
    for case in CASES:
        results[case], *states[case] = save_and_resume(case, root, rank)
    if UNIVERSAL:
        to_universal([os.path.join(root, case_name(*case)) for case in CASES])
    for case in CASES:
        if UNIVERSAL:
            resume_universal(case, root, rank, results[case], *states[case])
        else:
            results[case]["universal_refused"] = universal_refusal(case)
    if rank == 0:
        torch.save({case_name(*case): res for case, res in results.items()}, out)


def universal_one_rank(root: str, out: str) -> None:
    """Mode `universal1`: each "1group" case's universal checkpoint loaded and continued on 1 rank.

    The 2-rank runs averaged 2 micro-batches on each of 2 ranks per step; here one rank
    accumulates the same 4 micro-batches (gas 4), so the batch and its mean gradient match.
    """
    results = {}
    for case in (c for c in CASES if c[3] == "1group"):
        name = case_name(*case)
        engine = make_engine(case, gas=4, universal=True)
        engine.load_checkpoint(os.path.join(root, name))
        res = results[name] = dict(global_steps=engine.global_steps, steps_loaded=steps_of(engine),
                                   loaded_states=full_states(engine))
        for step in range(SAVE_AT, STEPS):
            for micro in range(4):
                tokens = ds_toy.micro_batch(micro // 2, step * 2 + micro % 2)
                engine.backward(engine(tokens, tokens)[1])
                engine.step()
        res["params"], res["steps"] = ds_toy.full_fp32_params(engine), steps_of(engine)
        engine.destroy()
        print("universal1 done", name, flush=True)
    torch.save(results, out)


def log_progress(ckpt: str, line: str) -> None:
    """Rank 0 appends `line` to CKPT/progress.txt and forces it to disk before going on."""
    if dist.get_rank() == 0:
        with open(os.path.join(ckpt, "progress.txt"), "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def train_with_checkpoints(ckpt: str, out: str, total: int, every: int, delay: float) -> None:
    """Mode `train`: resumable training with a checkpoint every `every` steps (see the module docstring)."""
    rank = dist.get_rank()
    os.makedirs(ckpt, exist_ok=True)
    with open(os.path.join(ckpt, f"pid.{rank}"), "w") as f:
        f.write(str(os.getpid()))
    engine = make_engine(KILL_CASE)
    resumed_from = None
    if os.path.isfile(os.path.join(ckpt, "latest")):
        path, _ = engine.load_checkpoint(ckpt)  # the model-states file inside the tag directory
        if path is None:
            raise RuntimeError(f"{ckpt}/latest exists but DeepSpeed loaded nothing")
        resumed_from = os.path.basename(os.path.dirname(path))
        log_progress(ckpt, f"resumed {resumed_from} at step {engine.global_steps}")
    for step in range(engine.global_steps, total):
        ds_toy.train(engine, rank, 1, first_step=step)
        time.sleep(delay)
        log_progress(ckpt, f"step {step + 1}")
        if (step + 1) % every == 0:
            engine.save_checkpoint(ckpt)
            log_progress(ckpt, f"saved global_step{step + 1}")
    result = dict(resumed_from=resumed_from, params=ds_toy.full_fp32_params(engine), steps=gathered(steps_of(engine)))
    engine.destroy()
    engine = make_engine(KILL_CASE)
    ds_toy.train(engine, rank, total)
    result.update(ref=ds_toy.full_fp32_params(engine), ref_steps=gathered(steps_of(engine)))
    engine.destroy()
    if rank == 0:
        torch.save(result, out)
    log_progress(ckpt, "finished")


def main():
    """Registers AdamPower with DeepSpeed, joins the gloo group and runs the mode argv[1] names."""
    gds.register()
    deepspeed.init_distributed(dist_backend="gloo")
    mode, *args = sys.argv[1:]
    if mode == "resume":
        resume(*args)
    elif mode == "universal1":
        universal_one_rank(*args)
    elif mode == "train":
        ckpt, out, total, every, delay = args
        train_with_checkpoints(ckpt, out, int(total), int(every), float(delay))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    exit_when_done(main)
