"""The main job: pretrain the small LLaMA/MoE model with DeepSpeed and AdamPower on the embedded corpus.

Run it under any launcher (one script for CPU/gloo and GPU/NCCL):

    deepspeed --num_gpus 2 --module gradpower_ds.jobs.train --config configs/quickstart.json
    torchrun --nproc_per_node 8 -m gradpower_ds.jobs.train --config configs/quickstart.json --steps 2000

A run directory holds ``config.json``, ``checkpoints/`` and what
``gradpower_ds.jobs.run_dir`` keeps for both training jobs: ``metrics.csv``,
``tensorboard/``, ``loss.png`` and ``status.json`` (``running`` with the last
logged or saved step, ``failed`` with the error, ``stopped`` by ``--stop_at`` or
by a signal, or ``complete``); ``summary.json`` is written only when the run
completes. GPAS gates get their gradients clipped to +-GATE_GRAD_CLIP
(``gradpower_ds.gpas``). ``--resume true`` continues from the newest checkpoint with the same
batches an uninterrupted run would have seen, so the loss curve continues exactly.
It refuses settings that differ from the run's ``config.json``, except those in
RESUME_MAY_CHANGE (the checkpoint holds the model, optimizer and schedule of the
saved settings). Each checkpoint carries an integrity manifest (gradpower_ds.checkpoint_manifest,
written before ``checkpoints/latest`` moves); a resume verifies it and refuses a damaged checkpoint
naming the file and ``--resume_tag`` of the previous one. SIGTERM or SIGINT (on any rank)
finishes the current step on all ranks, saves a checkpoint, marks the run ``stopped`` and exits with 128 + the
signal number (143, 130); a second SIGINT aborts at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import warnings
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ..blockwise import base_lr, blockwise_param_groups
from ..checkpoint_manifest import CheckpointIntegrityError, previous_checkpoint
from . import require_extra
from .precision import resolve_precision, slow_bf16_warning
from ..rank_logging import enable_rank0_logging
from .processes import default_to_world_of_one, exit_when_done, exit_with_launcher
from .run_dir import RunDir, RunDirError, StopRequest, make_summary, read_json, read_state, summary_line
from .run_lock import LOCK_FILE, lock_run_dir
from .train_config import RESUME_APPLIES, TrainConfig, load_config, report_error

JOB = "gradpower_ds.jobs.train"  # how the job names itself in its messages and its end line
_log = logging.getLogger(JOB)
# The only settings a resumed run may change: none of them changes the model, the data, the optimizer or the
# schedule (evaluation runs without gradients or randomness, so eval_every only changes when it is measured);
# with resume_changes "apply" the optimizer settings of RESUME_APPLIES may change too (hyperparams.RESUME_POLICY).
RESUME_MAY_CHANGE = ("resume", "stop_at", "run_dir", "progress", "tensorboard", "log_every", "save_every",
                     "eval_every", "noise_every", "dist_timeout", "resume_changes", "resume_tag")


def changed_settings(saved: dict, cfg: TrainConfig) -> list[tuple[str, object, object]]:
    """(name, saved value, new value) for each setting outside RESUME_MAY_CHANGE that differs from `saved`
    (a run's config.json; a key it lacks counts as its default)."""
    return cfg.differences(saved, RESUME_MAY_CHANGE)


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Checks that `cfg.run_dir` may be used: a new folder, or an existing run only with --resume true and the
    run's own settings (RunDirError otherwise); runs on every rank before anything is written."""
    run_dir = Path(cfg.run_dir)
    state = read_state(run_dir)
    if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()) and not cfg.resume:
        raise RunDirError(f"run_dir {run_dir} already holds a run (state: {state}); pass --resume true to continue "
                          "it, or choose another --run_dir")
    if not cfg.resume:
        return run_dir
    checkpoints = run_dir / "checkpoints"
    if cfg.resume_tag and not (checkpoints / cfg.resume_tag).is_dir():
        present = sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) if checkpoints.is_dir() else []
        raise RunDirError(f"--resume_tag {cfg.resume_tag}: no such checkpoint in {checkpoints} (it holds: "
                          f"{', '.join(present) or 'none'})")
    if not cfg.resume_tag and not (checkpoints / "latest").exists():
        if state in ("stopped", "complete"):
            raise RunDirError(f"run_dir {run_dir} holds a {state} run but no checkpoint ({checkpoints}/latest is "
                              "missing), so it cannot be resumed; start a new --run_dir")
        return run_dir  # nothing to resume: train() warns and starts from step 0
    saved = read_json(run_dir / "config.json")
    changes = changed_settings(saved, cfg) if saved is not None else []
    refused = [c for c in changes if cfg.resume_changes != "apply" or c[0] not in RESUME_APPLIES]
    if refused:
        listed = ", ".join(f"{name} {json.dumps(old)} -> {json.dumps(new)}" for name, old, new in refused)
        extend = (" (a run cannot be extended: its lr schedule ends at its steps; train a new run with the new "
                  "--steps, split into parts with --stop_at if needed)") if any(c[0] == "steps" for c in refused) \
            else ""
        appliable = [c[0] for c in refused if c[0] in RESUME_APPLIES]
        accept = (f"pass --resume_changes apply to train on with the new {', '.join(appliable)} (it accepts a changed "
                  f"{', '.join(RESUME_APPLIES)}), " if appliable and len(appliable) == len(refused)
                  and cfg.optimizer == "adampower" else "")
        raise RunDirError(f"--resume true cannot change the settings of the run in {run_dir}: {listed}{extend}. "
                          f"Its checkpoint holds the model, optimizer and schedule of its config.json; resume with "
                          f"those settings, {accept}or start a new --run_dir to train with these (a resumed run may "
                          f"change only {', '.join(RESUME_MAY_CHANGE[1:])}, and with --resume_changes apply "
                          f"{', '.join(RESUME_APPLIES)})")
    return run_dir


def apply_new_lrs(engine, fresh: list[float]) -> None:
    """With resume_changes "apply": the lr schedule resumes from this run's base lrs `fresh` (the LambdaLR's before
    engine.load_checkpoint replaced them with the checkpoint's; blockwise multipliers included), each group's lr
    set for the current step, and a warning names each old -> new base lr. A no-op when they did not change."""
    scheduler = engine.lr_scheduler
    if list(scheduler.base_lrs) == fresh:
        return
    _log.warning("%s: resume_changes apply: the lr schedule uses this run's base lrs, not the checkpoint's: %s",
                 JOB, "; ".join(f"group {i}: {old:g} -> {new:g}" for i, (old, new)
                                in enumerate(zip(scheduler.base_lrs, fresh)) if old != new))
    scheduler.base_lrs = list(fresh)
    for group, lr, factor in zip(scheduler.optimizer.param_groups, fresh, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def unbuilt_deepspeed_ops(cfg: TrainConfig) -> list[str]:
    """The DeepSpeed ops this run JIT-builds because neither DeepSpeed's install nor the torch extensions
    cache holds them (the shared-memory all-reduce on a CPU, the Adam kernel DeepSpeed's own AdamW uses)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = get_accelerator()
    wanted = ["ShareMemCommBuilder"] if accelerator.device_name() == "cpu" else []
    if cfg.optimizer == "adamw":
        wanted.append("CPUAdamBuilder" if cfg.offload_optimizer else "FusedAdamBuilder")
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:  # as torch.utils.cpp_extension._get_build_directory, which would create the folder
        device = f"rocm{torch.version.hip}" if torch.version.hip else \
            f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
        root = os.path.join(get_default_build_root(),
                            f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_"
                            f"{device.replace('.', '')}")
    unbuilt = []
    for kind in wanted:
        builder = accelerator.create_op_builder(kind)
        if builder is None or installed_ops.get(builder.NAME) or \
                not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue
        if not os.path.exists(os.path.join(root, builder.NAME, f"{builder.NAME}.so")):
            unbuilt.append(builder.NAME)
    return unbuilt


def _log_precision(cfg: TrainConfig) -> None:
    """Logs the precision the run trains in and why; warns when it is bf16 on a CPU that emulates bf16."""
    precision, why = resolve_precision(cfg.precision)
    _log.info("gradpower_ds.jobs.train: precision %s (%s)", precision, why)
    slow = slow_bf16_warning(precision)
    if slow:
        _log.warning("gradpower_ds.jobs.train: %s", slow)


def _warn_about_op_builds(cfg: TrainConfig) -> None:
    try:
        unbuilt = unbuilt_deepspeed_ops(cfg)
    except Exception:  # cannot tell: say it anyway
        unbuilt = ["its ops"]
    if unbuilt:
        _log.info("gradpower_ds.jobs.train: DeepSpeed builds %s on first use; this can take a few minutes",
                  ", ".join(unbuilt))


def build_engine(cfg: TrainConfig, vocab_size: int):
    """Model, param groups (GPAS gates without weight decay; blockwise lrs if asked) and the DeepSpeed engine with
    its lr schedule (a LambdaLR: it scales each group's lr, so blockwise ratios hold)."""
    import deepspeed

    from ..gpas import GATE_GRAD_CLIP, param_groups_with_gpas, register_gate_grad_clip
    from .model import CausalLM
    from .schedules import lr_multiplier

    torch.manual_seed(cfg.seed)
    model = CausalLM(cfg.model_config(vocab_size, torch.distributed.get_world_size()))
    if cfg.gpas:
        register_gate_grad_clip(model, GATE_GRAD_CLIP)
    schedule = partial(lr_multiplier, schedule=cfg.schedule, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                       decay_fraction=cfg.decay_fraction, min_ratio=cfg.min_lr_ratio)
    groups = (blockwise_param_groups(model, cfg.lr, cfg.blockwise_multipliers, cfg.weight_decay) if cfg.blockwise_lr
              else param_groups_with_gpas(model, cfg.weight_decay))
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=groups,
        config=cfg.deepspeed_config(), lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine


def evaluate(engine, batches: list, rank: int, world: int) -> float:
    """Mean next-token cross entropy over `batches` (each rank takes every world-th one; all ranks join)."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)  # (summed loss, tokens); on the
    with torch.no_grad():                                                # device, for NCCL's all-reduce
        for inputs, targets in batches[rank::world]:
            logits, _ = engine(inputs.to(engine.device))
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(engine.device).flatten(), reduction="sum")
            total[0] += loss.double()
            total[1] += targets.numel()
    engine.train()
    torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def resume_tag(engine, checkpoints: Path, requested: str = "") -> str | None:
    """The checkpoint every rank resumes from: `requested` (--resume_tag), else the tag in rank 0's
    `checkpoints`/latest (None: none, start afresh).
    DeepSpeed writes `latest` on global rank 0 only, even with use_node_local_storage, so the tag is sent to the
    other ranks. Raises RuntimeError on every rank when some rank lacks its model-state file of that tag (DeepSpeed's
    own name for it): nodes that do not share run_dir and keep no copy of their own."""
    latest = checkpoints / "latest"
    sent = [requested or (latest.read_text().strip() if torch.distributed.get_rank() == 0 and latest.exists()
                          else None)]
    torch.distributed.broadcast_object_list(sent, src=0)
    tag = sent[0]
    if tag is None:
        return None
    seen = torch.tensor([float(Path(engine._get_ckpt_name(str(checkpoints), tag)).exists()), 1.0], device=engine.device)
    torch.distributed.all_reduce(seen)
    found, world = int(seen[0].item()), int(seen[1].item())
    if found < world:
        raise RuntimeError(
            f"--resume true: only {found} of {world} ranks see checkpoint {tag} in {checkpoints}: the nodes do not "
            "share this folder. Put run_dir on a filesystem every node mounts, or let every node keep its own copy: "
            "deepspeed_overrides {\"checkpoint\": {\"use_node_local_storage\": true}} (docs/multi-node.md)")
    return tag


def load_checkpoint(engine, checkpoints: Path, tag: str):
    """engine.load_checkpoint of `tag`, verified against its integrity manifest (gradpower_ds.deepspeed.checkpointing):
    a damaged checkpoint is refused on every rank with the file's name and the --resume_tag of the previous one."""
    try:
        return engine.load_checkpoint(str(checkpoints), tag=tag)
    except CheckpointIntegrityError as error:
        previous = previous_checkpoint(error.folder)
        remedy = (f"Resume from the previous checkpoint with --resume_tag {previous.name}" if previous is not None
                  else "No earlier checkpoint with a manifest is left: start a new --run_dir") + \
            f" (`python -m gradpower_ds verify-checkpoint {checkpoints}` lists which are intact)"
        raise CheckpointIntegrityError(error.folder, error.problems, remedy) from None


def train(cfg: TrainConfig) -> dict:
    """Runs (or resumes) the configured pretraining; returns the summary rank 0 prints and saves ({} when
    stopped by stop_at). Stopped by SIGTERM/SIGINT it saves, marks the run stopped and raises
    SystemExit(128 + signal number)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from tqdm import tqdm

    from .data import load_corpus_distributed
    from ..deepspeed import register
    from ..noise import NoiseMonitor

    run_dir = prepare_run_dir(cfg)
    register()
    default_to_world_of_one()
    if os.environ.get("RANK", "0") == "0":
        _log_precision(cfg)
        _warn_about_op_builds(cfg)
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               timeout=timedelta(seconds=cfg.dist_timeout))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cfg.expert_parallel_size(world)  # fail before loading data when the experts cannot be placed
    corpus = load_corpus_distributed(cfg.data, tokenizer=cfg.tokenizer, val_fraction=cfg.val_fraction,
                                     jsonl_key=cfg.jsonl_key)
    val_batches = corpus.val_batches(cfg.micro_batch, cfg.seq_len, cfg.eval_batches - cfg.eval_batches % world or world)
    engine = build_engine(cfg, corpus.vocab_size)
    model = engine.module
    noise = NoiseMonitor(model.named_parameters(), cfg.micro_batch * cfg.seq_len, cfg.noise_every, cfg.seed)

    start, tokens, elapsed = 0, 0, 0.0
    checkpoints = run_dir / "checkpoints"
    run = RunDir(run_dir, writer=rank == 0, rank=rank)  # before the load: a rank failing there records it
    tag = resume_tag(engine, checkpoints, cfg.resume_tag) if cfg.resume else None
    if tag is not None:
        fresh_lrs = list(engine.lr_scheduler.base_lrs)  # this run's, before the checkpoint's replace them
        try:
            _, client = load_checkpoint(engine, checkpoints, tag)
        except BaseException as error:  # e.g. a damaged shard on one rank: the others' collectives fail after it
            run.failed(None, error)
            raise
        if cfg.resume_changes == "apply":
            apply_new_lrs(engine, fresh_lrs)
        start, tokens, elapsed = client["step"], client["tokens"], client["elapsed"]
        if "noise" in client:  # checkpoints before the noise measurement lack it: its averages start afresh
            noise.load_state_dict(client["noise"])
    elif cfg.resume and rank == 0:
        _log.warning("gradpower_ds.jobs.train: no checkpoint in %s: starting from step 0", checkpoints)
    stop = StopRequest()
    stop.install()
    run.start(start, config=cfg.to_dict(), tensorboard=cfg.tensorboard)
    if rank == 0:
        _log.info("gradpower_ds.jobs.train: %s | %d ranks, ZeRO-%d, %s, %s | %s | %.2fM parameters%s",
                  corpus.description, world, cfg.effective_zero_stage, cfg.effective_precision,
                  cfg.optimizer_label(),
                  type(engine.basic_optimizer).__name__,
                  sum(p.numel() for p in model.parameters()) / 1e6,
                  f" | resumed at step {start}" if start else "")
    step_tokens = cfg.micro_batch * cfg.seq_len * cfg.grad_accum * world
    bar = tqdm(total=cfg.steps, initial=start, disable=rank != 0 or not cfg.progress, unit="step", dynamic_ncols=True)
    val_loss = None
    last = cfg.stop_at or cfg.steps
    stopped_by = 0  # the signal that stopped the run
    done = start
    try:
        for step in range(start, last):
            began = time.perf_counter()
            lr = base_lr(engine.optimizer.param_groups)
            lm_loss = torch.zeros((), device=engine.device)
            noise.begin_step(step)
            for micro in range(cfg.grad_accum):
                inputs, targets = corpus.train_batch(step, micro, rank, world, cfg.micro_batch, cfg.seq_len, cfg.seed)
                _, loss = engine(inputs.to(engine.device), targets.to(engine.device), aux_loss_coef=cfg.aux_loss_coef)
                noise.next_micro_batch(engine.device)
                engine.backward(loss)
                engine.step()
                lm_loss += loss.detach().float() - cfg.aux_loss_coef * model.aux_loss().detach().float()
            # one all-reduce for the loss and for how many ranks were asked to stop, by SIGTERM or by SIGINT
            reduced = torch.cat([lm_loss.view(1), stop.flags(engine.device)])
            torch.distributed.all_reduce(reduced)
            train_loss = reduced[0].item() / (cfg.grad_accum * world)
            measured = noise.end_step()
            elapsed += time.perf_counter() - began
            tokens += step_tokens
            done = step + 1
            val_loss = evaluate(engine, val_batches, rank, world) if done % cfg.eval_every == 0 or done == cfg.steps \
                else None
            if step + 1 < last:
                stopped_by = stop.agreed(reduced[1:])
            logged = False
            if rank == 0:
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:,.0f}")
                if val_loss is not None:
                    bar.write(f"step {done}: validation loss {val_loss:.4f}")
                logged = done % cfg.log_every == 0 or val_loss is not None or bool(measured)
                if logged:
                    run.log(step=done, tokens=tokens, train_loss=train_loss, val_loss=val_loss, lr=lr,
                            elapsed=elapsed, **measured)
            saving = done % cfg.save_every == 0 or done == last or stopped_by
            if saving:
                engine.save_checkpoint(str(checkpoints), tag=f"step{done}",
                                       client_state={"step": done, "tokens": tokens, "elapsed": elapsed,
                                                     "noise": noise.state_dict()})
            if (logged or saving) and not stopped_by and done < last:
                run.running(done)
            if stopped_by:
                break
        if stopped_by:
            torch.distributed.barrier()  # every rank's part of the checkpoint is written
        elif val_loss is None and last == cfg.steps:  # resumed a finished run: nothing to train, measure again
            val_loss = evaluate(engine, val_batches, rank, world)
    except BaseException as error:
        run.failed(done, error)
        raise
    finally:
        stop.restore()
        bar.close()
        run.close()
    if stopped_by:
        run.stopped(done, stopped_by)
        if rank == 0:
            _log.info("gradpower_ds.jobs.train: stopped after step %d of %d by %s, checkpoint saved; continue with "
                      "--resume true", done, cfg.steps, signal.Signals(stopped_by).name)
        engine.destroy()
        raise SystemExit(128 + stopped_by)
    if last < cfg.steps:
        run.stopped(last)
        if rank == 0:
            _log.info("%s: stopped after step %d of %d as asked (stop_at); continue with --resume true", JOB, last,
                      cfg.steps)
        engine.destroy()
        return {}
    summary = make_summary(val_loss=val_loss, steps=cfg.steps, resumed_at=start, tokens=tokens, train_seconds=elapsed,
                           world_size=world, run_dir=run_dir, optimizer=cfg.optimizer, gpas=cfg.gpas,
                           noise_scale=noise.run_value)
    run.complete(summary, cfg.optimizer_label())
    engine.destroy()
    return summary


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: parse the config and flags, train, print the summary line on rank 0."""
    require_extra(JOB)
    enable_rank0_logging()
    exit_with_launcher()  # a rank whose launcher is killed saves and stops instead of training on
    # DeepSpeed 0.19.8's ZeRO calls it on every step; the warning is about DeepSpeed, not the run
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    try:
        cfg = load_config(argv)
        prepare_run_dir(cfg)  # every setting checked before deepspeed is imported (one line, exit status 2)
        lock_run_dir(cfg.run_dir)  # rank 0 holds run_dir until it exits: a second run is refused
    except ValueError as error:
        report_error(str(error))
        raise SystemExit(2)
    try:
        summary = train(cfg)
    except CheckpointIntegrityError as error:  # every rank refuses alike; status.json says failed
        if torch.distributed.get_rank() == 0:
            report_error(str(error))
        raise SystemExit(2)
    if summary and torch.distributed.get_rank() == 0:
        print(summary_line(JOB, summary), flush=True)


if __name__ == "__main__":
    exit_when_done(main)
