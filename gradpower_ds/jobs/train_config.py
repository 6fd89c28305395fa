"""The main job's settings: one flat dataclass, read from a JSON file and overridden by command-line flags.

Every field is a flag (``--steps 200``, ``--gpas true``) and a key of the JSON
file (``configs/quickstart.json``); its help text lives in the field's metadata
(``--help`` lists them with their defaults). The model settings (``dim``,
``num_experts``, ``norm``, ``gpas``, ...) are ModelConfig's fields of the same
name: their defaults and help texts are gradpower_ds.jobs.model.ModelConfig's, and
``model_config()`` passes them on by name. Flag and JSON value types are the
fields' real types (``typing.get_type_hints``). ``load_config`` checks every
setting before anything heavy is imported or launched: value types (JSON
included), ranges, the AdamPower hyperparameters as the optimizer will check
them, the DeepSpeed config that results from ``deepspeed_overrides``, that the
data and tokenizer paths exist and that the experts can be placed on the
ranks. A bad setting raises ``ConfigError`` (a ValueError) whose one-line
message names the setting and where it came from (the flag or the file).
``deepspeed_config()`` turns the settings into the DeepSpeed config the engine
is built from.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..blockwise import resolve_multipliers
from ..config_sources import layered, read_settings_file
from ..gpas import ACTIVATIONS, VARIANTS
from ..deepspeed.params import split_params
from ..hyperparams import POWER_NAMES, RENAMED, REQUIRED, RESUME_CHANGES, RESUME_CHANGES_DEFAULT, power_names
from .model import ModelConfig
from .precision import PRECISIONS, resolve_precision

# our name -> DeepSpeed "type"
OPTIMIZERS = {"adampower": "AdamPower", "adamw": "AdamW", "muon": "Muon", "muonpower": "MuonPower"}
SCHEDULES = ("wsd", "cosine", "constant")
BLOCKWISE_OPTIMIZERS = ("adamw", "adampower")  # the optimizers that keep the param groups they are given
RESUME_APPLIES = ("power", "expert_power", "lr", "betas", "eps", "weight_decay")
"""The settings a resume may change with resume_changes "apply" (optimizer adampower): AdamPower's load applies the
param groups' ones, train() the lr (the lr schedule's base lrs)."""
POWERED = ("adampower", "muonpower")  # the optimizers that take a p (hyperparams.POWER_NAMES, as DeepSpeed's params)
# the settings that only some optimizers use -> those optimizers (any other choice refuses them when given)
OPTIMIZER_SETTINGS = {**{name: tuple(o for o in POWERED if name in power_names(o, "deepspeed")) for name in POWER_NAMES},
                      "muon_lr": ("muon", "muonpower"), "momentum": ("muon", "muonpower")}
ERROR_GRACE_S = 10.0  # see report_error  # only used by optimizer adampower
# DeepSpeed config keys that a TrainConfig field sets and the training loop relies on: deepspeed_overrides may
# not change them (the loop would not follow), only the field may
_FIELD_OF_DS_KEY = {"train_micro_batch_size_per_gpu": "micro_batch", "gradient_accumulation_steps": "grad_accum",
                    "gradient_clipping": "grad_clip"}


class ConfigError(ValueError):
    """A setting that cannot work; `keys` are the TrainConfig fields it is about (to say where they came from)."""

    def __init__(self, message: str, *keys: str):
        super().__init__(message)
        self.keys = keys


def _setting(default, help: str):
    """A TrainConfig field with its --help text (the one place flags are described)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}


def _power_setting(name: str):
    """A TrainConfig field that is one of hyperparams.POWER_NAMES, the name DeepSpeed's params give it: None (not
    set) by default, resolved by check(); its help text says what it is for each optimizer that takes it."""
    uses = {opt: use for opt, use in POWER_NAMES[name].uses.items() if "deepspeed" in use.stacks}
    text = "; ".join(f"{opt}: {use.meaning}" + (", required" if use.default == REQUIRED else
                                               f", default {use.default:g}" if isinstance(use.default, float) else "")
                     for opt, use in uses.items())
    return field(default=None, metadata={"help": f"GradPower exponent p > 0 ({text})"})


def _model_setting(name: str):
    """A TrainConfig field that is ModelConfig's field `name`: its default and help text are ModelConfig's (their
    one home), and model_config() passes it on by that name (metadata "model")."""
    f = _MODEL_FIELDS[name]
    return field(default=f.default, metadata={"help": f.metadata["help"], "model": True})


@dataclass
class TrainConfig:
    """What a pretraining run does; defaults are the quickstart's (a few minutes on 2 CPU cores)."""

    run_dir: str = _setting("runs/quickstart", "folder of the run (config.json, metrics.csv, checkpoints/, ...)")
    resume: bool = _setting(False, "continue the run in run_dir from its newest checkpoint")
    resume_tag: str = _setting("", "with --resume true: the checkpoint to continue from, a folder of "
                                   "run_dir/checkpoints (e.g. step100, when the newest is damaged); '' is the newest "
                                   "(checkpoints/latest)")
    seed: int = _setting(0, "random seed (model init and the batches drawn)")
    steps: int = _setting(300, "optimizer steps; the lr schedule spans them")
    stop_at: int = _setting(0, "> 0: save and stop after this step (the schedule stays that of steps); resume later")
    # data
    data: str = _setting("stdlib", "'stdlib', a text file, a folder or glob of text files, a .jsonl file, or a "
                                   "Megatron indexed dataset prefix (P.bin/P.idx)")
    tokenizer: str = _setting("byte", "'byte' (257 ids) or a local Hugging Face tokenizer folder")
    jsonl_key: str = _setting("text", "the key holding each document's text in a .jsonl file")
    val_fraction: float = _setting(0.01, "fraction of documents held out for validation, in (0, 1)")
    seq_len: int = _setting(128, "tokens per sequence")
    micro_batch: int = _setting(8, "sequences per rank per micro-step")
    grad_accum: int = _setting(1, "micro-steps per optimizer step")
    # model: the _model_setting fields are gradpower_ds.jobs.model.ModelConfig's (defaults and help texts there)
    dim: int = _model_setting("dim")
    n_layers: int = _model_setting("n_layers")
    n_heads: int = _model_setting("n_heads")
    ffn_dim: int = _model_setting("ffn_dim")
    num_experts: int = _model_setting("num_experts")
    top_k: int = _model_setting("top_k")
    # a job setting, not ModelConfig.ep_size: 0 asks for automatic placement; model_config() passes the resolved
    # size (expert_parallel_size) as ModelConfig.ep_size
    ep_size: int = _setting(0, "expert-parallel ranks (0: as many as divide both the world size and num_experts)")
    aux_loss_coef: float = _setting(0.01, "weight of the MoE load-balancing loss")
    norm: str = _model_setting("norm")
    gpas: bool = _model_setting("gpas")
    gpas_act: str = _model_setting("gpas_act")
    # optimizer
    optimizer: str = _setting("adampower", f"{', '.join(OPTIMIZERS)} (adamw, muon: DeepSpeed's own AdamW, Muon)")
    # the names of p are hyperparams.POWER_NAMES' (DeepSpeed's params): check() fills in their defaults
    power: float | None = _power_setting("power")
    adam_power: float | None = _power_setting("adam_power")
    expert_power: float | None = _power_setting("expert_power")
    muon_lr: float = _setting(0.02, "learning rate of the matrices Muon updates (muon, muonpower; lr is the "
                                    "auxiliary Adam's)")
    momentum: float = _setting(0.95, "Muon's momentum, in [0, 1) (muon, muonpower)")
    lr: float = _setting(3e-3, "peak learning rate")
    betas: tuple[float, float] = _setting((0.9, 0.95), "Adam betas, each in [0, 1)")
    eps: float = _setting(1e-8, "Adam epsilon (>= 0)")
    weight_decay: float = _setting(0.1, "decoupled weight decay (>= 0)")
    grad_clip: float = _setting(1.0, "gradient-norm clipping (0: off)")
    resume_changes: str = _setting(RESUME_CHANGES_DEFAULT, f"with --resume true, a changed {', '.join(RESUME_APPLIES)}:"
                                   " refuse (the saved run's settings hold) or apply (the new values, with a warning "
                                   "naming old -> new; optimizer adampower)")
    blockwise_lr: bool = _setting(False, "blockwise learning rates: each block (embedding, Q/K, V/O, FFN, ...) at its "
                                         "multiple of lr (adamw, adampower; docs/features.md)")
    blockwise_multipliers: dict = _setting({}, "with blockwise_lr: multipliers replacing the paper's for the blocks "
                                               "named, e.g. {\"embedding\": 5}")
    # learning-rate schedule
    schedule: str = _setting("wsd", f"lr schedule: {', '.join(SCHEDULES)}")
    warmup_steps: int = _setting(30, "linear warmup steps, in [0, steps)")
    decay_fraction: float = _setting(0.2, "WSD: the last fraction of the steps decays linearly")
    min_lr_ratio: float = _setting(0.0, "end of the decay, as a fraction of lr")
    # DeepSpeed
    zero_stage: int = _setting(2, "ZeRO stage 0-3 (1 or 2 with experts)")
    precision: str = _setting("auto", f"{', '.join(PRECISIONS)} (auto: bf16 on GPUs and on CPUs with native bf16, "
                                      "else fp32)")
    offload_optimizer: bool = _setting(False, "ZeRO optimizer states on the CPU")
    dist_timeout: float = _setting(1800.0, "seconds a collective (and the rendezvous) may wait for the other ranks "
                                           "before the job fails: bounds a hang on a lost node (docs/multi-node.md)")
    # evaluation, logging, checkpoints
    eval_every: int = _setting(50, "validation every N steps (and at the end)")
    eval_batches: int = _setting(16, "validation batches per evaluation")
    log_every: int = _setting(5, "metrics.csv row every N steps")
    noise_every: int = _setting(10, "measure the gradient noise every N steps (0: off); those steps' rows carry "
                                    "it (docs/main-job.md)")
    save_every: int = _setting(100, "checkpoint every N steps (and at the end)")
    tensorboard: bool = _setting(True, "write tensorboard/ event files")
    progress: bool = _setting(True, "progress bar on rank 0")
    deepspeed_overrides: dict = _setting({}, "JSON object merged into the generated DeepSpeed config")

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raises ConfigError naming the first setting that cannot work and what it accepts."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked_type(f.name, getattr(self, f.name), _TYPES[f.name]))
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is unknown; choose one of {sorted(OPTIMIZERS)}",
                              "optimizer")
        if self.blockwise_lr and self.optimizer not in BLOCKWISE_OPTIMIZERS:
            raise ConfigError(f"blockwise_lr with optimizer {self.optimizer}: DeepSpeed's Muon builds its own param "
                              "groups, which drop the blockwise lrs; use optimizer "
                              f"{' or '.join(BLOCKWISE_OPTIMIZERS)}", "blockwise_lr", "optimizer")
        if self.blockwise_multipliers and not self.blockwise_lr:
            raise ConfigError("blockwise_multipliers is set but blockwise_lr is false; set blockwise_lr true or drop "
                              "blockwise_multipliers", "blockwise_multipliers", "blockwise_lr")
        try:
            resolve_multipliers(self.blockwise_multipliers)
        except ValueError as error:
            raise ConfigError(str(error), "blockwise_multipliers") from None
        if self.resume_tag and not self.resume:
            raise ConfigError(f"resume_tag={self.resume_tag!r} needs --resume true", "resume_tag", "resume")
        if self.resume_changes == "apply" and self.optimizer != "adampower":
            raise ConfigError(f"resume_changes apply with optimizer {self.optimizer}: only adampower applies changed "
                              "settings at a resume (DeepSpeed's AdamW and Muon, and MuonPower, keep the "
                              "checkpoint's); resume with the run's settings", "resume_changes", "optimizer")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum={self.momentum!r} must be in [0, 1)", "momentum")
        choices = {"schedule": SCHEDULES, "precision": PRECISIONS, "norm": VARIANTS, "gpas_act": ACTIVATIONS,
                   "resume_changes": RESUME_CHANGES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is unknown; choose one of {list(allowed)}", name)
        positive = ("steps", "seq_len", "micro_batch", "grad_accum", "dim", "n_layers", "n_heads", "ffn_dim",
                    "eval_every", "eval_batches", "log_every", "save_every", "lr", "muon_lr")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be > 0", name)
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            raise ConfigError(f"dist_timeout={self.dist_timeout!r} must be a finite number of seconds > 0",
                              "dist_timeout")
        if self.noise_every < 0:
            raise ConfigError(f"noise_every={self.noise_every!r} must be >= 0 (0: off)", "noise_every")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}", "dim", "n_heads")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage={self.zero_stage} must be 0, 1, 2 or 3", "zero_stage")
        if self.num_experts < 0 or self.ep_size < 0:
            raise ConfigError("num_experts and ep_size must be >= 0", "num_experts", "ep_size")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]",
                              "top_k", "num_experts")
        if not 0 <= self.stop_at <= self.steps:
            raise ConfigError(f"stop_at={self.stop_at} must be in [0, steps={self.steps}] (0: run to the end)",
                              "stop_at", "steps")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})",
                              "warmup_steps", "steps")
        if not 0 <= self.decay_fraction <= 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("decay_fraction and min_lr_ratio must be in [0, 1]", "decay_fraction", "min_lr_ratio")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 1)", "val_fraction")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip={self.grad_clip} must be >= 0 (0: off)", "grad_clip")
        self._check_deepspeed_config()

    def _check_deepspeed_config(self) -> None:
        """The checks that depend on the final DeepSpeed config (after deepspeed_overrides)."""
        over = self.deepspeed_overrides
        ds = self.deepspeed_config()
        zero = ds.get("zero_optimization")
        if not isinstance(zero, dict):
            raise ConfigError(f"deepspeed_overrides: zero_optimization={zero!r} must be a JSON object",
                              "deepspeed_overrides")
        stage_key = "deepspeed_overrides" if "stage" in (over.get("zero_optimization") or {}) else "zero_stage"
        stage = zero.get("stage", 0)
        if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed_overrides: zero_optimization.stage={stage!r} must be 0, 1, 2 or 3",
                              "deepspeed_overrides")
        if self.num_experts and stage == 3:
            where = " (set by deepspeed_overrides)" if stage_key == "deepspeed_overrides" else ""
            raise ConfigError(f"num_experts={self.num_experts} > 0 needs zero_stage 1 or 2 (DeepSpeed's MoE layers "
                              f"refuse ZeRO-3); the DeepSpeed config has stage 3{where}", "num_experts", stage_key)
        if self.optimizer in ("muon", "muonpower") and self.grad_clip > 0 and stage > 0:
            from ..deepspeed.muon_power import CLIPPING_WARNING

            raise ConfigError(f"grad_clip={self.grad_clip:g} with optimizer {self.optimizer} under ZeRO-{stage}: "
                              f"{CLIPPING_WARNING}; set grad_clip 0", "grad_clip", "optimizer", stage_key)
        for key, name in _FIELD_OF_DS_KEY.items():
            if key in over and over[key] != getattr(self, name):
                raise ConfigError(f"deepspeed_overrides sets {key}={over[key]!r}, which the training loop does not "
                                  f"follow; set {name} instead", "deepspeed_overrides")
        if "train_batch_size" in over:
            raise ConfigError("deepspeed_overrides sets train_batch_size, which the training loop does not follow; "
                              "set micro_batch and grad_accum instead", "deepspeed_overrides")
        optimizer = ds.get("optimizer")
        if not isinstance(optimizer, dict) or not isinstance(optimizer.get("params", {}), dict):
            raise ConfigError(f"deepspeed_overrides: optimizer={optimizer!r} must be a JSON object with a params "
                              "object", "deepspeed_overrides")
        if str(optimizer.get("type", "")).lower() != OPTIMIZERS[self.optimizer].lower():
            raise ConfigError(f"deepspeed_overrides sets optimizer.type={optimizer.get('type')!r}; set optimizer "
                              f"({' or '.join(OPTIMIZERS)}) instead", "deepspeed_overrides", "optimizer")
        # what DeepSpeed's optimizer is checked for when it is built, checked now, as gradpower_ds.deepspeed checks
        # it: the keys, the names of p (their defaults filled in here), lr, betas, eps, weight decay
        try:
            powers = split_params(optimizer["type"], optimizer.get("params", {}))[1]
        except (TypeError, ValueError) as error:
            message = str(error).partition(": ")[2]
            name = next((k for k in _CHECKED_NAMES if re.search(rf"\b{k}\b", message)), None)
            if name is None or name in (over.get("optimizer") or {}).get("params", {}):
                keys = ("deepspeed_overrides",)
            else:  # a setting's bad value, or a REQUIRED p not set: then the optimizer that requires it
                keys = (name,) if getattr(self, name) is not None else (name, "optimizer")
            raise ConfigError(message, *keys) from None
        if self.optimizer in POWERED:
            self.power, self.adam_power = powers["power"], powers.get("adam_power")

    @property
    def effective_precision(self) -> str:
        """The precision this machine trains in: precision, with "auto" resolved (gradpower_ds.jobs.precision)."""
        return resolve_precision(self.precision)[0]

    @property
    def effective_zero_stage(self) -> int:
        """The ZeRO stage of the final DeepSpeed config (zero_stage, unless deepspeed_overrides sets another)."""
        return self.deepspeed_config()["zero_optimization"].get("stage", 0)

    def expert_parallel_size(self, world_size: int) -> int:
        """The expert-parallel size for `world_size` ranks; ConfigError when the config cannot be placed."""
        if not self.num_experts:
            return 1
        ep = self.ep_size or math.gcd(world_size, self.num_experts)
        if ep > world_size or world_size % ep or self.num_experts % ep:
            raise ConfigError(f"ep_size={ep} cannot be placed: it must divide both the world size ({world_size} "
                              f"ranks) and num_experts ({self.num_experts}); set ep_size to such a number, or 0 "
                              "for the largest one", "ep_size", "num_experts")
        return ep

    def check_paths(self) -> None:
        """ConfigError when the data source or the tokenizer folder does not exist (as gradpower_ds.jobs.data reads
        them; relative paths are relative to the current directory)."""
        if self.data != "stdlib":
            prefix = self.data.removesuffix(".bin").removesuffix(".idx")
            megatron = Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()
            path = Path(self.data).expanduser()
            if not (megatron or path.exists() or any(os.path.isfile(m) for m in glob.iglob(self.data,
                                                                                          recursive=True))):
                raise ConfigError(f"data path not found: {self.data} (from {os.getcwd()}); give 'stdlib', a text "
                                  "file, a folder or glob of text files, a .jsonl file or a Megatron prefix "
                                  "P (P.bin + P.idx)", "data")
        if self.tokenizer != "byte" and not Path(self.tokenizer).expanduser().exists():
            raise ConfigError(f"tokenizer path not found: {self.tokenizer} (from {os.getcwd()}); give 'byte' or a "
                              "local Hugging Face tokenizer folder", "tokenizer")

    def model_config(self, vocab_size: int, world_size: int) -> ModelConfig:
        """The ModelConfig of this run: the model settings by their shared names, max_seq_len = seq_len, and the
        expert-parallel size resolved for `world_size` ranks (experts: DeepSpeed's MoE layer); the other
        ModelConfig fields keep their defaults."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("model")}
        return ModelConfig(vocab_size=vocab_size, max_seq_len=self.seq_len,
                           ep_size=self.expert_parallel_size(world_size), **shared)

    def deepspeed_config(self) -> dict:
        """The DeepSpeed config: optimizer, ZeRO stage, precision, batch, clipping, plus deepspeed_overrides."""
        params = {"lr": self.lr, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}
        if self.optimizer in POWERED:  # the names of p are DeepSpeed's params' (hyperparams.POWER_NAMES)
            params.update({name: getattr(self, name) for name in power_names(self.optimizer, "deepspeed")
                           if getattr(self, name) is not None})
        if self.optimizer in ("muon", "muonpower"):
            params.update(muon_lr=self.muon_lr, momentum=self.momentum)
        if self.optimizer == "adampower" and self.resume_changes != RESUME_CHANGES_DEFAULT:
            params["resume_changes"] = self.resume_changes  # the default stays out of the DeepSpeed config
        zero = {"stage": self.zero_stage}
        if self.optimizer in ("muon", "muonpower") and self.zero_stage == 3:
            zero["reduce_scatter"] = False  # DeepSpeed's ZeRO-3 refuses Muon with reduce-scatter
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        config = {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": self.grad_clip,
            "optimizer": {"type": OPTIMIZERS[self.optimizer], "params": params},
            "zero_optimization": zero,
            "bf16": {"enabled": self.effective_precision == "bf16"},
            "fp16": {"enabled": self.effective_precision == "fp16", "initial_scale_power": 16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        return merge(config, self.deepspeed_overrides)

    def optimizer_label(self) -> str:
        """The optimizer as logs and plots name it, e.g. 'adampower p=1.2', 'muonpower p=0.9 adam p=1.2', 'adamw' or
        'adamw + blockwise lr'."""
        if self.optimizer == "muonpower":
            return f"muonpower p={self.power:g} adam p={self.adam_power:g}"
        return (self.optimizer + (f" p={self.power:g}" if self.optimizer == "adampower" else "")
                + (" + blockwise lr" if self.blockwise_lr else ""))

    def to_dict(self) -> dict:
        """The settings as JSON-ready values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def differences(self, recorded: dict, ignore, missing=None) -> list[tuple[str, object, object]]:
        """(name, recorded value, value here) for each setting outside `ignore` that a run's recorded settings
        (its config.json) hold differently; a setting `recorded` lacks counts as `missing` (None: its default).

        The one comparison behind a resume's refusal (gradpower_ds.jobs.train) and compare's reuse check.
        """
        now = json.loads(json.dumps(self.to_dict()))  # tuples as lists, as config.json holds them
        fill = json.loads(json.dumps(TrainConfig().to_dict())) if missing is None else dict.fromkeys(now, missing)
        return [(name, recorded.get(name, fill[name]), value) for name, value in now.items()
                if name not in ignore and recorded.get(name, fill[name]) != value]


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in recursively (override values win)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_TYPES = typing.get_type_hints(TrainConfig)  # field name -> its type (the annotations evaluated)
_EXPECTED = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             float | None: "a finite number or null", tuple[float, float]: "a list of 2 numbers",
             dict: "a JSON object"}


def _checked_type(name: str, value, kind):
    """`value` as field `name` of type `kind` (a key of _EXPECTED) holds it (ints as floats, lists as tuples);
    ConfigError naming the key and the expected type otherwise."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = _finite_number(value)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    elif kind == float | None:
        ok = value is None or _finite_number(value)
        value = float(value) if ok and value is not None else value
    elif kind == tuple[float, float]:
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_finite_number, value))
        value = tuple(map(float, value)) if ok else value
    elif kind is dict:
        ok = isinstance(value, dict)
    else:
        raise TypeError(f"TrainConfig.{name}: unsupported field type {kind!r}; supported are {list(_EXPECTED)}")
    if not ok:
        raise ConfigError(f"{name}={value!r} must be {_EXPECTED[kind]}, not {type(value).__name__}", name)
    return value


_CHECKED_NAMES = (*POWER_NAMES, "lr", "betas", "eps", "weight_decay")  # the settings a DeepSpeed params error names


# ---- flags and the config file ------------------------------------------------------------------------------------

def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def report_error(message: str, prog: str = "gradpower_ds.jobs.train") -> None:
    """Prints ``prog: error: message`` as one line to stderr, once per node: every rank fails alike, so the other
    local ranks first wait ERROR_GRACE_S for local rank 0 to print it and end the job (a launcher stops all ranks
    when one fails), and print it only if they are still running then."""
    if _local_rank() != 0:
        time.sleep(ERROR_GRACE_S)
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (not the usage of 45 flags), once per node, exit status 2."""

    def error(self, message: str):
        report_error(f"{message} (see --help)", self.prog)
        raise SystemExit(2)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _parse_optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "null", "") else _parse_float(text)


def _parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


_FLAG_TYPES = {bool: _parse_bool, int: _parse_int, float: _parse_float, str: str,
               float | None: _parse_optional_float, tuple[float, float]: _parse_float, dict: _parse_json_object}


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return "none" if value is None else str(value)


def argument_parser(prog: str = "python -m gradpower_ds train") -> argparse.ArgumentParser:
    """A parser with --config FILE.json and one flag per TrainConfig field (flags win over the file); the help
    texts and defaults come from the fields."""
    parser = OneLineParser(
        prog=prog, description="Pretrain the small LLaMA/MoE model with DeepSpeed. Every flag is also a key of "
                               "the --config file; flags win. The defaults shown are TrainConfig's; the config file "
                               "replaces them (configs/quickstart.json sets the quickstart's).")
    parser.add_argument("--config", metavar="FILE.json",
                        help="JSON file with TrainConfig keys (e.g. configs/quickstart.json)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for old, hint in RENAMED.items():  # an old name is refused, saying what replaced it (never a silent meaning)
        parser.add_argument(f"--{old}", nargs="?", action=_Renamed, hint=hint, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        kind = _TYPES[f.name]
        nargs = 2 if kind == tuple[float, float] else None
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        text = f"{f.metadata['help']} (default: {_show(default)})".replace("%", "%%")
        parser.add_argument(f"--{f.name}", type=_FLAG_TYPES[kind], nargs=nargs, default=argparse.SUPPRESS,
                            metavar=("B1", "B2") if nargs else "{true,false}" if kind is bool else f.name.upper(),
                            help=text)
    return parser


class _Renamed(argparse.Action):
    """The action of a renamed flag (hyperparams.RENAMED): a usage error saying what replaced it."""

    def __init__(self, *args, hint: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.hint = hint

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.hint}")


def read_config_file(path: str) -> dict:
    """The settings in a --config JSON file (``config_sources.read_settings_file``); ConfigError naming the file
    when it is missing, not JSON, not an object, or has unknown keys (an old name says what replaced it)."""
    try:
        return read_settings_file(path, [f.name for f in dataclasses.fields(TrainConfig)], f"--config {path}")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _where(keys, sources: dict) -> str:
    """Where the settings `keys` came from: '--flag', 'FILE' (for the defaults: nothing)."""
    found = []
    for key in keys:
        source = sources.get(key)
        if source and source not in found:
            found.append(source)
    return ", ".join(found)


def load_config(argv: list[str] | None = None, world_size: int | None = None) -> TrainConfig:
    """TrainConfig from the --config file (if any) and the flags, with every setting checked (see the module
    docstring) before anything is imported or launched; ConfigError names the setting and its flag or file.

    world_size (default: $WORLD_SIZE, else 1) is the number of ranks the experts must be placed on."""
    args = vars(argument_parser().parse_args(argv))  # the flags given: the parser's defaults are SUPPRESS
    args.pop("local_rank")
    path = args.pop("config")
    # defaults < file < flags (config_sources.layered); TrainConfig's own field defaults are the first layer
    from_file = read_config_file(path) if path is not None else {}
    if "optimizer" in args and args["optimizer"] != from_file.get("optimizer", TrainConfig.optimizer):
        # the file's p settings were its optimizer's (power: the p of the optimizer named): they do not carry over
        from_file = {key: value for key, value in from_file.items() if key not in POWER_NAMES}
    values, sources = layered({}, from_file, args, lambda key: path, lambda key: f"--{key}")
    try:
        _check_optimizer_settings(values, sources)
        cfg = TrainConfig(**values)
        cfg.check_paths()
        cfg.expert_parallel_size(world_size or int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ConfigError as error:
        where = _where(error.keys, sources)
        raise ConfigError(f"{where}: {error}" if where else str(error), *error.keys) from None
    return cfg


def _check_optimizer_settings(values: dict, sources: dict) -> None:
    """A setting of OPTIMIZER_SETTINGS given where another optimizer is chosen (as a flag, or both in the file) has no
    effect: refused, as megatron_patches refuses --gradpower-p without --optimizer adampower. One in the file with
    another --optimizer as a flag is fine (the flag switches the optimizer; the file's setting no longer applies)."""
    optimizer = values.get("optimizer", "adampower")
    if optimizer not in OPTIMIZERS:
        return
    chosen_at = 2 if str(sources.get("optimizer", "")).startswith("--") else 1 if "optimizer" in sources else 0
    for key, users in OPTIMIZER_SETTINGS.items():
        if optimizer in users or key not in sources or values[key] is None:
            continue
        given_at = 2 if sources[key].startswith("--") else 1
        if given_at >= chosen_at:
            given = f"--{key} {values[key]}" if given_at == 2 else f"{sources[key]} key {key}={values[key]!r}"
            chosen = {2: "--optimizer", 1: f"{sources.get('optimizer')} key optimizer", 0: "the default"}[chosen_at]
            raise ConfigError(f"{given} has no effect unless --optimizer {' or '.join(users)} (optimizer is "
                              f"{optimizer!r}, from {chosen}); drop it or choose {' or '.join(users)}")
