"""The main job's settings: one flat dataclass, read from a JSON file and overridden by command-line flags.

Every field is a flag (``--steps 200``, ``--gpas true``) and a key of the JSON
file (``configs/quickstart.json``); unknown keys and bad values are refused with
a message naming them. ``deepspeed_config()`` turns the settings into the
DeepSpeed config the engine is built from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field

from .gpas import ACTIVATIONS, VARIANTS
from .hyperparams import check_power

OPTIMIZERS = {"adampower": "AdamPower", "adamw": "AdamW"}  # our name -> DeepSpeed "type"
SCHEDULES = ("wsd", "cosine", "constant")
PRECISIONS = ("bf16", "fp32", "fp16")


@dataclass
class TrainConfig:
    """What a pretraining run does; defaults are the quickstart's (a few minutes on 2 CPU cores)."""

    run_dir: str = "runs/quickstart"
    resume: bool = False
    seed: int = 0
    steps: int = 300
    stop_at: int = 0  # > 0: save and stop after this step (the schedule stays that of `steps`); resume later
    # data
    data: str = "stdlib"
    tokenizer: str = "byte"
    jsonl_key: str = "text"
    val_fraction: float = 0.01
    seq_len: int = 128
    micro_batch: int = 8
    grad_accum: int = 1
    # model (gradpower_ds.model.ModelConfig)
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 256
    num_experts: int = 4
    top_k: int = 2
    ep_size: int = 0  # 0: as many expert-parallel ranks as divide both the world size and num_experts
    aux_loss_coef: float = 0.01
    norm: str = "pre_ln"
    gpas: bool = False
    gpas_act: str = "silu"
    # optimizer
    optimizer: str = "adampower"
    power: float = 1.2
    expert_power: float | None = None
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # learning-rate schedule
    schedule: str = "wsd"
    warmup_steps: int = 30
    decay_fraction: float = 0.2  # WSD: the last fraction of the steps decays linearly
    min_lr_ratio: float = 0.0  # end of the decay, as a fraction of lr
    # DeepSpeed
    zero_stage: int = 2
    precision: str = "bf16"
    offload_optimizer: bool = False
    # evaluation, logging, checkpoints
    eval_every: int = 50
    eval_batches: int = 16
    log_every: int = 5
    save_every: int = 100
    tensorboard: bool = True
    progress: bool = True
    deepspeed_overrides: dict = field(default_factory=dict)  # merged into the generated DeepSpeed config

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.check()

    def check(self) -> None:
        """Raises ValueError naming the first setting that cannot work and what it accepts."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is unknown; choose one of {sorted(OPTIMIZERS)}")
        check_power(self.power, 0.0, owner="power")
        if self.expert_power is not None:
            check_power(self.expert_power, 0.0, owner="expert_power")
        choices = {"schedule": SCHEDULES, "precision": PRECISIONS, "norm": VARIANTS, "gpas_act": ACTIVATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is unknown; choose one of {list(allowed)}")
        positive = ("steps", "seq_len", "micro_batch", "grad_accum", "dim", "n_layers", "n_heads", "ffn_dim",
                    "eval_every", "eval_batches", "log_every", "save_every", "lr")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.num_experts and self.zero_stage == 3:
            raise ValueError("num_experts > 0 needs zero_stage 1 or 2 (DeepSpeed's MoE layers refuse ZeRO-3)")
        if self.num_experts < 0 or self.ep_size < 0:
            raise ValueError("num_experts and ep_size must be >= 0")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if not 0 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at={self.stop_at} must be in [0, steps={self.steps}] (0: run to the end)")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("decay_fraction and min_lr_ratio must be in [0, 1]")

    def expert_parallel_size(self, world_size: int) -> int:
        """The expert-parallel size for `world_size` ranks; ValueError when the config cannot be placed."""
        if not self.num_experts:
            return 1
        ep = self.ep_size or math.gcd(world_size, self.num_experts)
        if ep > world_size or world_size % ep or self.num_experts % ep:
            raise ValueError(f"ep_size={ep} cannot be placed: it must divide both the world size ({world_size} "
                             f"ranks) and num_experts ({self.num_experts}); set ep_size to such a number, or 0 "
                             "for the largest one")
        return ep

    def model_config(self, vocab_size: int, world_size: int):
        """The ModelConfig of this run (DeepSpeed's MoE layer for experts)."""
        from .model import ModelConfig

        return ModelConfig(vocab_size=vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           ffn_dim=self.ffn_dim, max_seq_len=self.seq_len, norm=self.norm,
                           num_experts=self.num_experts, top_k=self.top_k, moe_impl="deepspeed",
                           ep_size=self.expert_parallel_size(world_size), gpas=self.gpas, gpas_act=self.gpas_act)

    def deepspeed_config(self) -> dict:
        """The DeepSpeed config: optimizer, ZeRO stage, precision, batch, clipping, plus deepspeed_overrides."""
        params = {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}
        if self.optimizer == "adampower":
            params["power"] = self.power
            if self.expert_power is not None:
                params["expert_power"] = self.expert_power
        zero = {"stage": self.zero_stage}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        config = {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": self.grad_clip,
            "optimizer": {"type": OPTIMIZERS[self.optimizer], "params": params},
            "zero_optimization": zero,
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16", "initial_scale_power": 16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        return merge(config, self.deepspeed_overrides)

    def optimizer_label(self) -> str:
        """The optimizer as logs and plots name it, e.g. 'adampower p=1.2' or 'adamw'."""
        return self.optimizer + (f" p={self.power:g}" if self.optimizer == "adampower" else "")

    def to_dict(self) -> dict:
        """The settings as JSON-ready values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in recursively (override values win)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null", "") else float(text)


_FLAG_TYPES = {"bool": _parse_bool, "int": int, "float": float, "str": str, "float | None": _parse_optional_float,
               "tuple[float, float]": float, "dict": json.loads}


def argument_parser(prog: str = "python -m gradpower_ds train") -> argparse.ArgumentParser:
    """A parser with --config FILE.json and one flag per TrainConfig field (flags win over the file)."""
    parser = argparse.ArgumentParser(prog=prog, description="Pretrain the small LLaMA/MoE model with DeepSpeed.")
    parser.add_argument("--config", help="JSON file with TrainConfig keys (e.g. configs/quickstart.json)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        nargs = 2 if kind == "tuple[float, float]" else None
        parser.add_argument(f"--{f.name}", type=_FLAG_TYPES[kind], nargs=nargs, default=argparse.SUPPRESS,
                            metavar=f.name.upper() if nargs is None else ("B1", "B2"))
    return parser


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """TrainConfig from the --config file (if any) and the flags; ValueError names unknown keys or bad values."""
    args = vars(argument_parser().parse_args(argv))
    args.pop("local_rank")
    path = args.pop("config")
    values = {}
    if path:
        with open(path) as f:
            values = json.load(f)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(values) - known - {"_comment"})
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; accepted keys are {sorted(known)}")
        values.pop("_comment", None)
    values.update(args)
    return TrainConfig(**values)
