"""A small megatron-core MoE GPT pretraining job with AdamPower / MuonPower and GPAS, for users without Megatron-LM.

    torchrun --nproc_per_node 2 -m gradpower_ds.jobs.train_megatron \\
        --gradpower-config configs/megatron/adampower_gpas.json --train-iters 300 --save runs/megatron

or ``bash launch/megatron_moe.sh`` (torchrun, one or many nodes). Flags carry Megatron-LM's names for
the same settings (a subset: DP x EP, no TP/PP), plus the GradPower/GPAS flags of
``megatron_patches.arguments`` (``--optimizer adampower|muon|muonpower``, ``--gradpower-p``,
``--gradpower-p-expert``, ``--gradpower-p-adam``, ``--gpas``, ``--gpas-act``, ``--gradpower-config``).
The data is the project's embedded corpus
(``gradpower_ds.jobs.data``: the Python standard library's sources, or ``--data-path`` text / JSONL /
Megatron indexed data) with the byte tokenizer, sampled as in the DeepSpeed main job.

Megatron's own machinery does the training: ``parallel_state`` (data x expert parallel), ``GPTModel``
with the local MoE layer spec, ``Float16Module`` for bf16, megatron DDP and ``get_megatron_optimizer``
(the distributed optimizer with ``--use-distributed-optimizer``) or, for muon/muonpower,
``get_megatron_muon_optimizer`` (Muon for the hidden matrices, Adam chained for the rest),
``forward_backward_no_pipelining`` for the micro-batches of a step (gradient accumulation, MoE aux-loss
scaling, ``finalize_model_grads``), ``OptimizerParamScheduler`` for the lr, and ``dist_checkpointing``
for ``--save``/``--load``. Every step reseeds the RNGs from (``--seed``, step), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have. With ``--gpas`` each gate's gradient is
clipped to +-``gradpower_ds.gpas.GATE_GRAD_CLIP`` before megatron DDP takes it, as in the DeepSpeed main job.

``--save DIR`` is the run folder, kept as the DeepSpeed main job keeps its own (``gradpower_ds.jobs.run_dir``):
besides the checkpoints it holds ``status.json`` (running / failed / stopped / complete), ``metrics.csv``,
``tensorboard/`` and, when the run completes, ``loss.png`` and ``summary.json``. SIGTERM or SIGINT (on any
rank) finishes the current step on all ranks, saves a checkpoint (with ``--save``), marks the run
``stopped`` and exits with 128 + the signal number (143, 130); continue it with ``--load DIR``.
Checkpoints also carry the training seconds, so a resumed run's tokens/s counts the whole run. Rank 0
ends with the same one line as the DeepSpeed main job (``gradpower_ds.jobs.run_dir.summary_line``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_patches import arguments

from . import require_extra
from .. import checkpoint_manifest
from ..atomic_write import atomic_open
from ..rank_logging import enable_rank0_logging
from .processes import default_to_world_of_one, exit_when_done, exit_with_launcher
from .run_dir import RunDir, RunDirError, StopRequest, make_summary, summary_line
from .run_lock import lock_run_dir

JOB = "gradpower_ds.jobs.train_megatron"  # how the job names itself in its messages and its end line
_log = logging.getLogger(JOB)
LATEST = "latest_checkpointed_iteration.txt"  # Megatron-LM's name for the pointer to the newest checkpoint
DECAY_STYLES = ("constant", "linear", "cosine", "WSD")


def build_parser() -> argparse.ArgumentParser:
    """The job's flags (Megatron-LM names) plus megatron_patches.arguments' GradPower/GPAS flags."""
    parser = argparse.ArgumentParser(prog=f"python -m {JOB}", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    add = parser.add_argument_group("model").add_argument
    add("--num-layers", type=int, default=4)
    add("--hidden-size", type=int, default=128)
    add("--ffn-hidden-size", type=int, default=None, help="dense MLP width (default 4 x hidden size)")
    add("--num-attention-heads", type=int, default=4)
    add("--seq-length", type=int, default=128)
    add("--num-experts", type=int, default=4, help="MoE experts per layer (0: dense MLPs)")
    add("--moe-router-topk", type=int, default=2)
    add("--moe-ffn-hidden-size", type=int, default=None, help="expert MLP width (default: --ffn-hidden-size)")
    add("--moe-token-dispatcher-type", choices=("alltoall", "allgather"), default="alltoall")
    add("--moe-aux-loss-coeff", type=float, default=0.01)
    add("--expert-model-parallel-size", type=int, default=1)
    add("--hidden-dropout", type=float, default=0.0)
    add("--attention-dropout", type=float, default=0.0)
    add("--bf16", action="store_true", help="bf16 parameters and activations, fp32 main params in the optimizer")
    add = parser.add_argument_group("training").add_argument
    add("--micro-batch-size", type=int, default=4)
    add("--global-batch-size", type=int, default=None, help="sequences per step (default: micro batch x data "
                                                             "parallel size; a multiple of it = grad accumulation)")
    add("--train-iters", type=int, default=300)
    add("--lr", type=float, default=1e-3)
    add("--min-lr", type=float, default=0.0)
    add("--lr-warmup-iters", type=int, default=30)
    add("--lr-decay-style", choices=DECAY_STYLES, default="WSD")
    add("--lr-wsd-decay-iters", type=int, default=None, help="WSD: length of the final decay (default 20%% of the "
                                                               "steps)")
    add("--weight-decay", type=float, default=0.1)
    add("--clip-grad", type=float, default=1.0)
    add("--adam-beta1", type=float, default=0.9)
    add("--adam-beta2", type=float, default=0.95)
    add("--adam-eps", type=float, default=1e-8)
    add("--use-distributed-optimizer", action="store_true", help="shard the optimizer state over data parallel ranks")
    add("--seed", type=int, default=1234)
    add("--distributed-timeout-minutes", type=float, default=10.0,
        help="longest wait of any collective (every process group) before the ranks fail, e.g. on a lost node "
             "(Megatron-LM's flag and default)")
    add = parser.add_argument_group("data, evaluation, checkpoints, logging").add_argument
    add("--data-path", default="stdlib", help="the embedded corpus 'stdlib', a text/JSONL file or folder, or a "
                                              "Megatron indexed prefix (see gradpower_ds.jobs.data)")
    add("--eval-interval", type=int, default=100)
    add("--eval-iters", type=int, default=8, help="validation batches per evaluation (per run, all ranks)")
    add("--save", default=None, help="run folder: checkpoints, status.json, metrics.csv, tensorboard/, loss.png, "
                                     "summary.json")
    add("--save-interval", type=int, default=None, help="save every N steps (and always after the last step)")
    add("--load", default=None, help="resume from the newest checkpoint in this folder (the iteration in "
                                     f"{LATEST}, or --ckpt-step)")
    add("--ckpt-step", type=int, default=None, help="with --load: resume from this iteration's checkpoint")
    add("--log-interval", type=int, default=10)
    add("--noise-interval", type=int, default=10, help="measure the gradient noise every N iterations (0: off; "
                                                        "docs/main-job.md)")
    arguments.add_arguments(parser, after_parse=check_args)
    return parser


def check_args(args, parser) -> None:
    """Refuses settings that cannot work, naming the flag (runs inside parse_args)."""
    positive = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "train_iters",
                "expert_model_parallel_size", "moe_router_topk", "log_interval", "eval_interval",
                "distributed_timeout_minutes")
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("lr", "min_lr", "weight_decay", "clip_grad", "lr_warmup_iters", "eval_iters", "num_experts",
                 "noise_interval"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.hidden_size % args.num_attention_heads:
        parser.error(f"--hidden-size {args.hidden_size} is not a multiple of --num-attention-heads "
                     f"{args.num_attention_heads}")
    if args.num_experts == 0 and (args.expert_model_parallel_size > 1 or args.gradpower_p_expert is not None):
        parser.error("--num-experts 0 (dense) leaves nothing for --expert-model-parallel-size > 1 or "
                     "--gradpower-p-expert")
    if args.num_experts and (args.num_experts % args.expert_model_parallel_size
                             or args.moe_router_topk > args.num_experts):
        parser.error(f"--num-experts {args.num_experts} must be a multiple of --expert-model-parallel-size "
                     f"{args.expert_model_parallel_size} and >= --moe-router-topk {args.moe_router_topk}")
    if args.lr_warmup_iters > args.train_iters:
        parser.error(f"--lr-warmup-iters {args.lr_warmup_iters} exceeds --train-iters {args.train_iters}")
    if "muon" in args.optimizer and args.use_distributed_optimizer:
        parser.error(f"--optimizer {args.optimizer} cannot run with --use-distributed-optimizer: megatron-core's "
                     "Muon does not support the distributed optimizer ('muon with dist optimizer is not "
                     "supported'); drop --use-distributed-optimizer")
    if args.ckpt_step is not None and args.load is None:
        parser.error("--ckpt-step needs --load")
    if args.load is not None and not Path(args.load).is_dir():
        parser.error(f"--load {args.load}: no such folder")


def data_parallel_layout(args) -> tuple[int, int, int]:
    """(data parallel rank, data parallel size, micro-batches per step); errors name the flags."""
    from megatron.core import parallel_state

    rank, size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    per_pass = args.micro_batch_size * size
    global_batch = args.global_batch_size or per_pass
    if global_batch % per_pass:
        raise ValueError(f"--global-batch-size {global_batch} must be a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x {size} data parallel ranks = {per_pass}")
    return rank, size, global_batch // per_pass


def build_model(args, vocab_size: int):
    """GPTModel (MoE local spec), GPAS gates if asked (their gradients clipped), Float16Module for bf16, wrapped
    in megatron DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    import megatron_patches

    from ..gpas import GATE_GRAD_CLIP, register_gate_grad_clip

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    ffn = args.ffn_hidden_size or 4 * args.hidden_size
    moe = dict(num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
               moe_ffn_hidden_size=args.moe_ffn_hidden_size or ffn,
               moe_token_dispatcher_type=args.moe_token_dispatcher_type, moe_aux_loss_coeff=args.moe_aux_loss_coeff,
               moe_router_load_balancing_type="aux_loss") if args.num_experts else {}
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=ffn,
        num_attention_heads=args.num_attention_heads, expert_model_parallel_size=args.expert_model_parallel_size,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout, add_bias_linear=False,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        params_dtype=dtype, bf16=args.bf16, pipeline_dtype=dtype, use_cpu_initialization=True,
        init_method_std=0.02, **moe)
    spec = get_gpt_layer_local_spec(num_experts=args.num_experts or None, moe_grouped_gemm=False, normalization="RMSNorm")
    model = GPTModel(config, spec, vocab_size=vocab_size, max_sequence_length=args.seq_length,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    if args.gpas:
        megatron_patches.apply_gpas(model, act=args.gpas_act)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if args.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=args.use_distributed_optimizer)
    model = DistributedDataParallel(config, ddp_config, model)
    if args.gpas:  # a tensor hook on each gate: it runs before DDP's hook copies the gradient into main_grad
        register_gate_grad_clip(model, GATE_GRAD_CLIP)
    model.broadcast_params()
    return model


def optimizer_powers(args) -> str:
    """The GradPower settings in the job's first log line: 'p=1.2' (adampower; ', expert p=...' where it differs),
    'p=0.9, Adam p=1.2' (muonpower)."""
    from megatron_patches.optimizer import config_powers

    powers = config_powers(args)
    dense, expert = powers["power"], powers["expert_power"]
    return f"p={dense:g}" + (f", expert p={expert:g}" if expert != dense else "") + \
        (f", Adam p={powers['adam_power']:g}" if "adam_power" in powers else "")


def build_optimizer(args, model):
    """get_megatron_optimizer with AdamPower (or Adam), or get_megatron_muon_optimizer with MuonPower (or Muon), per
    the flags, and Megatron's lr scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        **arguments.optimizer_config_kwargs(args), lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer)
    if "muon" in args.optimizer:
        from megatron.core.optimizer.muon import get_megatron_muon_optimizer

        optimizer = get_megatron_muon_optimizer(config, [model])
    else:
        optimizer = get_megatron_optimizer(config, [model])
    wsd = args.lr_wsd_decay_iters if args.lr_wsd_decay_iters is not None else round(0.2 * args.train_iters)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.train_iters, lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters, wd_incr_style="constant",
        wsd_decay_steps=wsd if args.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if args.lr_decay_style == "WSD" else None)
    return optimizer, scheduler


def scheduled_lr(optimizer, max_lr: float) -> float:
    """The lr of this step for a parameter at the base lr (Megatron's warmup starts at 0): group 0's lr, scaled by
    `max_lr` over the group's own max_lr (a blockwise group has its multiple of it)."""
    group = optimizer.param_groups[0]
    return group["lr"] * max_lr / group["max_lr"] if group.get("max_lr") else group["lr"]


def run_micro_batches(model, batches: list, args, forward_only: bool = False, before_each=None) -> torch.Tensor:
    """Forward (and backward) over `batches` with Megatron's no-pipelining schedule; the mean LM loss.
    ``before_each()``, if given, runs before each micro-batch's forward (and so before its backward)."""
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    def loss_func(per_token: torch.Tensor):
        loss = per_token.float().mean()
        return loss, {"lm loss": loss.detach().clone()}  # a copy: the schedule divides `loss` in place

    def forward_step(data_iterator, module):
        if before_each is not None:
            before_each()
        inputs, targets = next(data_iterator)
        positions = torch.arange(inputs.shape[1]).expand_as(inputs)
        return module(inputs, positions, None, labels=targets), loss_func

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    losses = forward_backward_no_pipelining(
        forward_step_func=forward_step, data_iterator=iter(batches), model=model, num_microbatches=len(batches),
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, forward_only=forward_only)
    return torch.stack([item["lm loss"] for item in losses]).mean()


def data_parallel_mean(value: torch.Tensor) -> float:
    """The mean of `value` over the data parallel ranks."""
    from megatron.core import parallel_state

    value = value.detach().clone()
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return value.item() / parallel_state.get_data_parallel_world_size()


def reseed(seed: int, step: int) -> None:
    """Sets torch's and Megatron's (tensor/expert parallel) RNGs from (seed, step): resume replays the same draws."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed + 100_003 * step)
    model_parallel_cuda_manual_seed(seed + 100_003 * step)


def unwrap(model):
    """The GPTModel inside megatron DDP and Float16Module (their state dict keys carry a 'module.' prefix)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def sharded_state(model, optimizer, scheduler, step: int, loading: bool, train_seconds: float = 0.0,
                  noise: dict | None = None, settings: dict | None = None) -> dict:
    """The state dict dist_checkpointing saves and loads: model and optimizer shards plus plain run state (the
    iteration, the training seconds so far for the run's tokens/s, the gradient noise averages, the optimizer
    settings a resume compares: megatron_patches.optimizer.resume_settings)."""
    from megatron_patches.patches import DP_RESHARDABLE_FROM, MEGATRON_CORE

    # "dp_reshardable" reshards by data-parallel size; before it, the model-space format
    sharding = "dp_reshardable" if MEGATRON_CORE.installed_at_least(DP_RESHARDABLE_FROM) else \
        "fully_sharded_model_space"
    model_state = unwrap(model).sharded_state_dict()
    return {"model": model_state,
            "optimizer": optimizer.sharded_state_dict(model_state, is_loading=loading,
                                                      metadata={"distrib_optim_sharding_type": sharding}),
            "scheduler": scheduler.state_dict(), "iteration": step, "train_seconds": train_seconds,
            "noise": noise or {}, "gradpower_settings": settings or {}}


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """Megatron-LM's layout: ROOT/iter_0000100."""
    return Path(root) / f"iter_{step:07d}"


def save_checkpoint(root: str, model, optimizer, scheduler, step: int, train_seconds: float = 0.0,
                    noise: dict | None = None, settings: dict | None = None) -> None:
    """Writes ROOT/iter_NNNNNNN with dist_checkpointing and its integrity manifest (every rank hashes a share), then
    (rank 0) points ROOT/latest... at it. The training seconds saved are rank 0's (the plain run state must be the
    same on every rank)."""
    from megatron.core import dist_checkpointing

    path = checkpoint_dir(root, step)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    seconds = torch.tensor([train_seconds], dtype=torch.float64,
                           device="cuda" if torch.cuda.is_available() else "cpu")
    dist.broadcast(seconds, src=0)
    dist.barrier()
    dist_checkpointing.save(sharded_state(model, optimizer, scheduler, step, loading=False,
                                          train_seconds=seconds.item(), noise=noise, settings=settings), str(path))
    dist.barrier()
    written = checkpoint_manifest.write_collectively(path)
    dist.barrier()  # the manifest is written before LATEST names the checkpoint
    if written is not None:
        files, size, seconds = written
        with atomic_open(Path(root) / LATEST, durable=True) as f:
            f.write(f"{step}\n".encode())
        _log.info("saved checkpoint %s (manifest of %d files, %.1f MB, in %.2f s)", path, files, size / 1e6, seconds)


def verify_checkpoint(path: Path) -> None:
    """Checks checkpoint `path` against its integrity manifest on all ranks (each a share of the files): a damaged one
    is refused on every rank naming the file and the --ckpt-step of the previous checkpoint; one without a manifest
    (saved by an earlier version) is loaded with a warning."""
    try:
        verified = checkpoint_manifest.verify_collectively(path, "")
    except checkpoint_manifest.CheckpointIntegrityError as error:
        previous = checkpoint_manifest.previous_checkpoint(path)
        remedy = (f"Resume from the previous checkpoint with --ckpt-step {int(previous.name[len('iter_'):])}"
                  if previous is not None else "No earlier checkpoint with a manifest is left: start without --load") \
            + f" (`python -m gradpower_ds verify-checkpoint {path.parent}` lists which are intact)"
        raise checkpoint_manifest.CheckpointIntegrityError(path, error.problems, remedy) from None
    if not verified and dist.get_rank() == 0:
        _log.warning("checkpoint %s has no %s (saved by an earlier version): loaded without an integrity check", path,
                     checkpoint_manifest.MANIFEST)


def load_checkpoint(root: str, step: int | None, model, optimizer, scheduler, args=None) -> tuple[int, float, dict]:
    """Loads ROOT's checkpoint of `step` (default: the one LATEST names); returns its iteration, training
    seconds and gradient noise state (0 and {} for a checkpoint that does not record them). With `args`, the
    checkpoint's optimizer settings are compared with the run's first (megatron_patches.optimizer.check_resume:
    refused, or applied with --gradpower-resume-changes apply)."""
    from megatron.core import dist_checkpointing

    if step is None:
        pointer = Path(root) / LATEST
        if not pointer.exists():
            raise FileNotFoundError(f"--load {root}: no {LATEST} (no checkpoint saved there yet); drop --load to "
                                    "start from scratch, or pass --ckpt-step")
        step = int(pointer.read_text())
    path = checkpoint_dir(root, step)
    if not path.is_dir():
        raise FileNotFoundError(f"--load {root}: no checkpoint {path.name} for iteration {step}")
    verify_checkpoint(path)
    try:
        state = dist_checkpointing.load(sharded_state(model, optimizer, scheduler, step, loading=True), str(path))
    except Exception as error:  # dist_checkpointing's own errors rarely say which rank or folder
        raise RuntimeError(f"rank {dist.get_rank()}: cannot load checkpoint {path}: {type(error).__name__}: "
                           f"{error}") from error
    with torch.no_grad():  # fp32 main params are views of the model's leaf params
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if args is not None:
        from megatron_patches.optimizer import apply_resume_changes, check_resume

        apply_resume_changes(check_resume(state.get("gradpower_settings") or {}, args), args, optimizer, scheduler)
    _log.info("resumed from %s", path)
    return int(state["iteration"]), float(state.get("train_seconds", 0.0)), state.get("noise") or {}


def train(args) -> dict:
    """Runs (or resumes) the pretraining on an initialised process group; returns the summary (rank 0 keeps the
    run folder, --save). Stopped by SIGTERM/SIGINT it saves, marks the run stopped and raises
    SystemExit(128 + signal number)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    import megatron_patches
    from megatron_patches.optimizer import resume_settings

    from .data import load_corpus_distributed
    from ..noise import NoiseMonitor

    megatron_patches.apply()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=args.expert_model_parallel_size,
                                             distributed_timeout_minutes=args.distributed_timeout_minutes)
    dp_rank, dp_size, micro_batches = data_parallel_layout(args)
    corpus = load_corpus_distributed(args.data_path)
    val_batches = corpus.val_batches(args.micro_batch_size, args.seq_length, args.eval_iters)[dp_rank::dp_size] \
        if args.eval_iters else []
    reseed(args.seed, 0)
    model = build_model(args, corpus.vocab_size)
    optimizer, scheduler = build_optimizer(args, model)
    config = model.config
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync

    noise = NoiseMonitor(unwrap(model).named_parameters(), args.micro_batch_size * args.seq_length,
                         args.noise_interval, args.seed)
    rank0 = dist.get_rank() == 0
    save = Path(args.save) if args.save else None
    run = RunDir(save, writer=rank0, rank=dist.get_rank())  # before the load: a rank failing there records it
    try:
        start, elapsed, noise_state = load_checkpoint(args.load, args.ckpt_step, model, optimizer, scheduler, args) \
            if args.load else (0, 0.0, {})
    except BaseException as error:
        run.failed(None, error)
        raise
    if noise_state:
        noise.load_state_dict(noise_state)
    label = args.optimizer + (f" ({optimizer_powers(args)})" if args.optimizer in arguments.OPTIMIZER_NAMES else "") \
        + (" + blockwise lr" if args.blockwise_lr else "")
    stop = StopRequest()
    stop.install()
    run.start(start)
    if rank0:
        experts = f"{args.num_experts} experts top-{args.moe_router_topk}, EP={args.expert_model_parallel_size}" \
            if args.num_experts else "dense"
        _log.info("%s: %s | %d ranks (DP=%d), %s | %s | %s%s | %s | %.2fM parameters%s", JOB,
                  corpus.description, dist.get_world_size(), dp_size, experts, label,
                  "GPAS " + args.gpas_act if args.gpas else "no GPAS", ", distributed optimizer"
                  if args.use_distributed_optimizer else "", "bf16" if args.bf16 else "fp32",
                  sum(p.numel() for p in model.parameters()) / 1e6, f" | resumed at iteration {start}" if start else "")
    step_tokens = micro_batches * args.micro_batch_size * dp_size * args.seq_length
    tokens, val_loss = start * step_tokens, None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    last = args.train_iters
    stopped_by = 0  # the signal that stopped the run
    done = start
    try:
        for step in range(start, last):
            began = time.perf_counter()
            reseed(args.seed, step + 1)
            model.zero_grad_buffer()
            optimizer.zero_grad()
            batches = [corpus.train_batch(step, micro, dp_rank, dp_size, args.micro_batch_size, args.seq_length,
                                          args.seed) for micro in range(micro_batches)]
            noise.begin_step(step)
            loss = run_micro_batches(model, batches, args, before_each=lambda: noise.next_micro_batch(device))
            lr = scheduled_lr(optimizer, args.lr)
            ok, grad_norm, _ = optimizer.step()
            if ok:
                scheduler.step(increment=1)
            train_loss = data_parallel_mean(loss)
            measured = noise.end_step()
            stop_flags = stop.flags(device)  # how many ranks were asked to stop, by SIGTERM or by SIGINT
            dist.all_reduce(stop_flags)
            elapsed += time.perf_counter() - began
            tokens += step_tokens
            done = step + 1
            if val_batches and (done % args.eval_interval == 0 or done == last):
                model.eval()
                with torch.no_grad():
                    val_loss = data_parallel_mean(run_micro_batches(model, val_batches, args, forward_only=True))
                model.train()
            else:
                val_loss = None
            if done < last:
                stopped_by = stop.agreed(stop_flags)
            logged = rank0 and (done % args.log_interval == 0 or val_loss is not None or bool(measured))
            if logged:
                _log.info("iteration %d/%d | lm loss %.6f | lr %.3e | grad norm %.4f | %s%.0f tokens/s", done,
                          last, train_loss, lr, grad_norm if grad_norm is not None else float("nan"),
                          f"validation loss {val_loss:.6f} | " if val_loss is not None else "", tokens / elapsed)
                run.log(step=done, tokens=tokens, train_loss=train_loss, val_loss=val_loss, lr=lr, elapsed=elapsed,
                        **measured)
            saving = save is not None and (done == last or bool(stopped_by)
                                           or bool(args.save_interval and done % args.save_interval == 0))
            if saving:
                save_checkpoint(str(save), model, optimizer, scheduler, done, train_seconds=elapsed,
                                noise=noise.state_dict(), settings=resume_settings(args))
            if (logged or saving) and not stopped_by and done < last:
                run.running(done)
            if stopped_by:
                break
    except BaseException as error:
        run.failed(done, error)
        raise
    finally:
        stop.restore()
        run.close()
    if stopped_by:
        run.stopped(done, stopped_by)
        if rank0:
            _log.info("%s: stopped after iteration %d of %d by %s, %s", JOB, done, last,
                      signal.Signals(stopped_by).name, f"checkpoint saved; continue with --load {save}" if save
                      else "nothing saved (no --save)")
        dist.barrier()  # no rank exits (and so makes its launcher stop the others) before the run is marked
        raise SystemExit(128 + stopped_by)
    summary = make_summary(val_loss=val_loss, steps=last, resumed_at=start, tokens=tokens, train_seconds=elapsed,
                           world_size=dist.get_world_size(), run_dir=save, optimizer=args.optimizer, gpas=args.gpas,
                           noise_scale=noise.run_value)
    run.complete(summary, label + (" + GPAS" if args.gpas else ""))
    return summary


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: parse, set up torch.distributed (any launcher), train, print the end line on rank 0."""
    require_extra(JOB)
    enable_rank0_logging()
    enable_rank0_logging("megatron_patches")
    exit_with_launcher()  # a rank whose launcher is killed saves and stops instead of training on
    args = build_parser().parse_args(argv)
    try:
        lock_run_dir(args.save)  # rank 0 holds the run folder until it exits: a second run is refused
    except RunDirError as error:
        print(f"{JOB}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    default_to_world_of_one()
    cuda = torch.cuda.is_available()
    try:
        torch.cuda.current_device()  # megatron-core calls torch.cuda throughout, even for CPU tensors
    except (AssertionError, RuntimeError) as err:
        raise SystemExit(f"{JOB}: megatron-core needs CUDA ({err}); run it on GPU nodes. "
                         "Without a GPU, use the DeepSpeed main job (python -m gradpower_ds.jobs.train) "
                         "instead") from None
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=args.distributed_timeout_minutes))
    try:
        if dist.get_world_size() % args.expert_model_parallel_size:
            raise SystemExit(f"--expert-model-parallel-size {args.expert_model_parallel_size} does not divide the "
                             f"{dist.get_world_size()} ranks")
        summary = train(args)
        if dist.get_rank() == 0:
            print(summary_line(JOB, summary), flush=True)
    except checkpoint_manifest.CheckpointIntegrityError as error:  # every rank refuses alike; status.json says failed
        if dist.get_rank() == 0:
            print(f"{JOB}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    exit_when_done(main)
