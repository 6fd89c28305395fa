"""Command-line flags and a JSON file for AdamPower / MuonPower / GPAS in Megatron-LM.

``add_arguments(parser)`` is a Megatron-LM ``extra_args_provider``; it adds

    --gradpower-p P            power: adampower: p for dense parameters (> 0; default 1.2);
                               muonpower: p before Muon's momentum (> 0; required)
    --gradpower-p-adam P       adam_power: muonpower: p of the Adam for what Muon leaves to Adam
                               (> 0; default 1.2)
    --gradpower-p-expert P     expert_power: p for MoE expert parameters (> 0; default: --gradpower-p)
    --blockwise-lr             blockwise learning rates (megatron_patches.blockwise; the file's key
                               blockwise_lr may also be an object of multipliers per block)
    --gpas                     GPAS gates in the decoder layers (Megatron's layers are Pre-LN)
    --gpas-act ACT             gate activation (gradpower_ds.gpas.ACTIVATIONS)
    --gradpower-resume-changes refuse|apply
                               gradpower_ds.jobs.train_megatron: a --load whose checkpoint has other
                               optimizer settings (p, betas, eps, weight decay, lr): refused naming
                               both values (default), or applied with a warning
                               (gradpower_ds.hyperparams.RESUME_POLICY)
    --gradpower-config FILE    JSON object with any of CONFIG_KEYS

and ``adampower``/``muonpower`` to the choices of Megatron's ``--optimizer`` (or, on a parser
without one, an ``--optimizer`` of its own). The three names of p are the flags of
``gradpower_ds.hyperparams.POWER_NAMES`` (their help texts come from it too). Precedence,
per setting, is ``gradpower_ds.config_sources.layered``'s: a flag given on the command
line wins over the JSON file, which wins over the default. "Given" is detected, not
guessed from the value: while the parser
parses, each of these options' default is a private sentinel, so
``--gradpower-p 1.2`` (the default value) still beats the file. The file is read
and everything is checked inside ``parse_args``/``parse_known_args`` of that
parser (add_arguments wraps them on that parser instance only): unknown JSON
keys and bad values end the parse through ``parser.error`` (exit status 2) with
a message naming the flag or the file's key. Megatron's own --lr, --weight-decay, --adam-eps,
--adam-beta1 and --adam-beta2, where the parser has them, are checked there too
(``check_adam_flags``, through ``gradpower_ds.hyperparams.check_settings``).

Megatron-LM defines ``--optimizer`` in ``megatron.training.arguments._add_training_args``
with fixed choices, and some code paths (e.g. fault-tolerance setup) parse again
without the extra provider; ``megatron_patches.apply()`` therefore also wraps
``_add_training_args`` to add our names to that option's choices, wraps
``megatron.training.training.get_megatron_optimizer_config`` (which copies dataclass
fields only) to build the config as for 'adam' / 'muon' and then set ``optimizer`` and
the ``gradpower_p*`` fields from the args (``optimizer_config_kwargs``), and wraps the
name ``get_megatron_muon_optimizer`` that module imported (Megatron-LM routes every
optimizer name holding "muon" there, and checks Muon's restrictions for it, so
``muonpower`` gets them). These patches apply only where Megatron-LM is
importable (``megatron_lm_patches``, listed in ``megatron_patches.patches``); they are
written against Megatron-LM core_v0.16.1 (whose megatron-core is the version ``apply()``
checks). The names of p are validated by ``megatron_patches.optimizer.checked_powers``, as
OptimizerConfig's fields are.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import logging
import math

from gradpower_ds.blockwise import resolve_multipliers
from gradpower_ds.config_sources import layered, read_settings_file
from gradpower_ds.gpas import ACTIVATIONS
from gradpower_ds.hyperparams import POWER_NAMES, REQUIRED, RESUME_CHANGES, RESUME_CHANGES_DEFAULT, check_settings
from gradpower_ds.patching import Wrap

from .blockwise import BLOCKWISE_OPTIMIZERS
from .blockwise import FIELD as BLOCKWISE_FIELD
from .blockwise import multipliers as blockwise_multipliers
from .optimizer import (DIST_MUON_NAME, FIELDS, KNOWN_AS, MUON_NAMES, NAME_OF_FIELD, OPTIMIZER_NAMES, RESUME_FLAG,
                        RESUME_FLAGS, build_muon_with_power, build_optimizer_with_power, check_muon_available,
                        checked_powers, config_powers, muon_builds_muon, named)

DEFAULTS = {"optimizer": "adam", **FIELDS, "blockwise_lr": False, "gpas": False, "gpas_act": "silu"}
CONFIG_KEYS = tuple(DEFAULTS)  # the keys a --gradpower-config file may hold
FLAGS = {key: "--" + key.replace("_", "-") for key in CONFIG_KEYS}  # the names of p: hyperparams.POWER_NAMES' flags

_log = logging.getLogger(__name__)
_UNSET = object()  # an option's default while parsing: "not given on the command line"


def _number(text: str) -> float:
    """A flag's number (its range is checked once the settings are resolved, by checked_powers)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _power_help(field: str) -> str:
    """A name of p's help text, from hyperparams.POWER_NAMES: what it is for each optimizer, and its default."""
    uses = POWER_NAMES[NAME_OF_FIELD[field]].uses
    return "; ".join(f"--optimizer {opt}: {use.meaning}" + (", required" if use.default == REQUIRED else
                                                          f", default {use.default:g}" if isinstance(use.default, float)
                                                          else "")
                     for opt, use in uses.items() if "megatron" in use.stacks)


def _optimizer_action(parser: argparse.ArgumentParser):
    return next((a for a in parser._actions if "--optimizer" in a.option_strings), None)


def add_optimizer_choice(parser: argparse.ArgumentParser) -> bool:
    """Adds 'adampower', 'muonpower' and, where Megatron offers 'dist_muon', 'dist_muonpower' to the choices of the
    parser's ``--optimizer``; False when it has no such option."""
    action = _optimizer_action(parser)
    if action is None:
        return False
    if action.choices is not None:
        ours = [name for name in OPTIMIZER_NAMES if name != DIST_MUON_NAME or KNOWN_AS[name] in action.choices]
        action.choices = [*action.choices, *(name for name in ours if name not in action.choices)]
    return True


def add_arguments(parser: argparse.ArgumentParser, after_parse=None) -> argparse.ArgumentParser:
    """Adds the GradPower/GPAS flags and --gradpower-config to `parser` (a Megatron-LM extra_args_provider).

    ``after_parse(args, parser)``, if given, runs after each parse once the settings are resolved
    (e.g. to refuse what the caller does not support, through ``parser.error``).
    """
    if getattr(parser, "_gradpower_arguments", False):
        return parser
    if not add_optimizer_choice(parser):
        parser.add_argument("--optimizer", default=DEFAULTS["optimizer"],
                            choices=["adam", "sgd", "muon", *(n for n in OPTIMIZER_NAMES if n != DIST_MUON_NAME)],
                            help="optimizer (adampower: Adam fed with sign(g)|g|^p; muonpower: Muon fed with it)")
    group = parser.add_argument_group("GradPower / GPAS (megatron_patches)")
    for field in FIELDS:
        group.add_argument(FLAGS[field], type=_number, default=None, metavar="P", help=_power_help(field))
    group.add_argument(FLAGS["blockwise_lr"], action="store_true",
                       help="blockwise learning rates: each block (embedding, Q/K, V/O, FFN, ...) at the paper's "
                            "multiple of --lr (--optimizer adam or adampower; other multipliers: the "
                            "--gradpower-config key blockwise_lr as an object)")
    group.add_argument(FLAGS["gpas"], action="store_true", help="GPAS gates in the decoder layers")
    group.add_argument(FLAGS["gpas_act"], choices=sorted(ACTIVATIONS), default=DEFAULTS["gpas_act"],
                       help="GPAS gate activation (default silu)")
    group.add_argument(RESUME_FLAG, choices=RESUME_CHANGES, default=RESUME_CHANGES_DEFAULT,
                       help=f"gradpower_ds.jobs.train_megatron: a --load of a checkpoint saved with another "
                            f"{', '.join(RESUME_FLAGS.values())}: refuse (default; the error names both values) or "
                            "apply (this run's values, with a warning naming old -> new)")
    group.add_argument("--gradpower-config", metavar="FILE.json", default=None,
                       help=f"JSON object with any of {list(CONFIG_KEYS)}; flags given on the command line win "
                            "over the file, the file over the defaults")
    parser._gradpower_arguments = True
    original = parser.parse_known_args  # parse_args calls it too

    @functools.wraps(original)
    def parse_known_args(args=None, namespace=None):
        actions = [a for a in parser._actions if a.dest in DEFAULTS]
        defaults = {a: a.default for a in actions}
        for action in actions:
            action.default = _UNSET
        try:
            parsed, extras = original(args, namespace)
        finally:
            for action, default in defaults.items():
                action.default = default
        resolve(parsed, parser, {a.dest: d for a, d in defaults.items()})
        if after_parse is not None:
            after_parse(parsed, parser)
        return parsed, extras

    parser.parse_known_args = parse_known_args
    return parser


def read_config(path: str, optimizers=None) -> dict:
    """The settings in a --gradpower-config file (``config_sources.read_settings_file``), their types and choices
    checked (the names of p are checked with the flags, once resolved); ValueError naming the file and the key."""
    values = read_settings_file(path, CONFIG_KEYS, f"--gradpower-config {path}")
    where = f"--gradpower-config {path}: key"
    if "gpas" in values and not isinstance(values["gpas"], bool):
        raise ValueError(f"{where} gpas={values['gpas']!r}: must be true or false")
    blockwise = values.get("blockwise_lr", False)
    if not isinstance(blockwise, (bool, dict)):
        raise ValueError(f"{where} blockwise_lr={blockwise!r}: must be true, false or an object of multipliers per "
                         "block")
    if isinstance(blockwise, dict):
        try:
            resolve_multipliers(blockwise)
        except ValueError as error:
            raise ValueError(f"{where} blockwise_lr: {error}") from None
    choices = {"gpas_act": sorted(ACTIVATIONS), "optimizer": optimizers}
    for key, allowed in choices.items():
        if key in values and allowed is not None and values[key] not in allowed:
            raise ValueError(f"{where} {key}={values[key]!r} is unknown; choose one of {list(allowed)}")
    return values


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """Fills the settings not given on the command line from --gradpower-config, then the defaults
    (``config_sources.layered``); checks them, the names of p with ``checked_powers`` (for adampower,
    gradpower_p's default is filled in).

    Settings still holding the parse-time sentinel were not given. Errors go through ``parser.error``.
    """
    action = _optimizer_action(parser)
    path = getattr(args, "gradpower_config", None)
    try:
        from_file = read_config(path, action.choices if action else None) if path else {}
    except ValueError as err:
        parser.error(str(err))
    given = {key: getattr(args, key) for key in CONFIG_KEYS if getattr(args, key, _UNSET) is not _UNSET}
    values, source = layered({**DEFAULTS, **(defaults or {})}, from_file, given,
                             lambda key: f"--gradpower-config key {key}", FLAGS.get)
    for key, value in values.items():
        setattr(args, key, value)
    try:
        powers = checked_powers({field: values[field] for field in FIELDS}, args.optimizer,
                                label=lambda key: source.get(key, FLAGS[key]) if key in FIELDS else FLAGS[key])
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    if "power" in powers:  # the others stay None where not set: OptimizerConfig resolves them alike
        args.gradpower_p = powers["power"]
    if args.blockwise_lr not in (False, None) and args.optimizer not in BLOCKWISE_OPTIMIZERS:
        parser.error(f"{source.get('blockwise_lr', FLAGS['blockwise_lr'])} works with --optimizer "
                     f"{' or '.join(BLOCKWISE_OPTIMIZERS)}, not {args.optimizer!r} (Muon builds its own param groups)")
    if not args.gpas:
        if "gpas_act" in source:
            parser.error(f"{source['gpas_act']} has no effect without --gpas (or \"gpas\": true in the file)")
    check_adam_flags(args, parser)


ADAM_FLAGS = {"lr": "--lr", "eps": "--adam-eps", "weight_decay": "--weight-decay"}  # check_settings' name: the flag


def check_adam_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Checks Megatron's --lr, --adam-eps, --weight-decay (finite, >= 0) and --adam-beta1/--adam-beta2 (in [0, 1))
    with ``hyperparams.check_settings``, for any --optimizer (all of them use Adam's somewhere), so a bad value ends
    the parse (``parser.error``) rather than every rank later. Flags the parser lacks, or left None, are skipped.
    """
    given = {name: getattr(args, flag[2:].replace("-", "_"), None) for name, flag in ADAM_FLAGS.items()}
    values = {name: value for name, value in given.items() if value is not None}
    betas = [getattr(args, f"adam_beta{i}", None) for i in (1, 2)]
    if betas != [None, None]:  # a missing one stands in as 0.0 (valid), so an error names the flag given
        values["betas"] = tuple(0.0 if beta is None else beta for beta in betas)
    try:  # optimizer "adam" takes no name of p: nothing about p is checked or filled in
        check_settings(values, optimizer="adam", stack="megatron", label=lambda name: ADAM_FLAGS.get(name, name))
    except (TypeError, ValueError) as err:
        parser.error(str(err).replace("betas[0]", "--adam-beta1").replace("betas[1]", "--adam-beta2"))


def optimizer_config_kwargs(args) -> dict:
    """The OptimizerConfig fields for the parsed args: optimizer, for adampower/muonpower the gradpower_p*, and
    the blockwise lr setting if on."""
    fields = {"optimizer": args.optimizer}
    if args.optimizer in OPTIMIZER_NAMES:
        fields.update({key: getattr(args, key) for key in FIELDS})
    if getattr(args, "blockwise_lr", False):
        fields[BLOCKWISE_FIELD] = args.blockwise_lr
    return fields


def add_training_args_with_adampower(original):
    """Megatron-LM's _add_training_args with 'adampower' and 'muonpower' among its --optimizer choices."""

    @functools.wraps(original)
    def wrapper(parser, *args, **kwargs):
        result = original(parser, *args, **kwargs)
        if not add_optimizer_choice(result if result is not None else parser):
            _log.warning("megatron_patches: Megatron-LM's _add_training_args defined no --optimizer; "
                         "'adampower' and 'muonpower' were not added")
        return result

    return wrapper


def optimizer_config_with_adampower(original):
    """Megatron-LM's get_megatron_optimizer_config building, for --optimizer adampower (muonpower), the config for
    'adam' ('muon') plus the GradPower fields from the args, and for any optimizer the blockwise lr setting."""

    @functools.wraps(original)
    def wrapper(args, *rest, **kwargs):
        name = getattr(args, "optimizer", None)
        if name not in OPTIMIZER_NAMES and not getattr(args, "blockwise_lr", False):
            return original(args, *rest, **kwargs)
        with named(args, KNOWN_AS.get(name, name)):
            result = original(args, *rest, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        for field, value in optimizer_config_kwargs(args).items():
            setattr(config, field, value)
        if name in OPTIMIZER_NAMES:
            config_powers(config)
        if name in MUON_NAMES:
            check_muon_available(name)
        blockwise_multipliers(config)
        return result

    return wrapper


def validate_args_as_known(original):
    """Megatron-LM's validate_args (core_v0.18.0 on) checking ours as what it steps as (KNOWN_AS): from 0.18 on it
    treats every --optimizer but adam/sgd as an emerging optimizer and, with --use-distributed-optimizer, switches
    to the layer-wise optimizer, which AdamPower must not get. A name it changes (dist_muon: muon and the layer-wise
    optimizer) becomes ours for the new one (muonpower)."""

    @functools.wraps(original)
    def validate_args(args, *rest, **kwargs):
        name = getattr(args, "optimizer", None)
        if name not in OPTIMIZER_NAMES:
            return original(args, *rest, **kwargs)
        with named(args, KNOWN_AS[name]):
            result = original(args, *rest, **kwargs)
            renamed = args.optimizer
        if renamed != KNOWN_AS[name]:
            args.optimizer = {known: ours for ours, known in KNOWN_AS.items()}.get(renamed, renamed)
        return result

    return validate_args


def megatron_lm_patches() -> list:
    """The Megatron-LM patches (``Wrap``s) where Megatron-LM is importable; empty where it is not. LookupError,
    saying what to install, where Megatron-LM lacks a function they patch (an older Megatron-LM)."""
    try:
        training = importlib.import_module("megatron.training.training")
        megatron_arguments = importlib.import_module("megatron.training.arguments")
    except ImportError:
        return []
    if not hasattr(training, "get_megatron_optimizer_config"):  # Megatron-LM core_v0.16.0 on
        raise LookupError(
            "megatron_patches: this Megatron-LM's megatron.training.training has no get_megatron_optimizer_config "
            "(Megatron-LM core_v0.16.0 on), where --gradpower-p/--gradpower-p-expert reach the optimizer config; "
            "without it they would be ignored. Use Megatron-LM core_v0.16.0 or newer (megatron-core alone, without "
            "Megatron-LM's training loop, works from 0.13.0: OptimizerConfig(optimizer='adampower', gradpower_p=...))")
    return [
        # every version: our names among --optimizer's choices; our fields in the optimizer config it builds
        Wrap(megatron_arguments, "_add_training_args", add_training_args_with_adampower),
        Wrap(training, "get_megatron_optimizer_config", optimizer_config_with_adampower),
        # every version: the get_megatron_optimizer it imported (megatron_patches.optimizer.build_optimizer_with_power)
        *([Wrap(training, "get_megatron_optimizer", build_optimizer_with_power)]
          if hasattr(training, "get_megatron_optimizer") else []),
        # core_v0.16 and 0.17: the get_megatron_muon_optimizer it imported builds Muon (0.18 on it imports none, and
        # megatron-core's is a stub forwarding to get_megatron_optimizer)
        *([Wrap(training, "get_megatron_muon_optimizer", build_muon_with_power)]
          if hasattr(training, "get_megatron_muon_optimizer") and muon_builds_muon() else []),
        # core_v0.18 on (parse_and_validate_args, the config-container pretrain): validate_args' emerging check
        *([Wrap(megatron_arguments, "validate_args", validate_args_as_known)]
          if hasattr(megatron_arguments, "parse_and_validate_args") else []),
    ]


def chain_providers(provider, after_parse=None):
    """An extra_args_provider running `provider` (if any) and then add_arguments(parser, after_parse)."""

    def extra_args_provider(parser):
        if provider is not None:
            returned = provider(parser)
            parser = parser if returned is None else returned
        return add_arguments(parser, after_parse)

    return extra_args_provider


def replace_argument(function, name: str, replace):
    """`function` whose argument `name` (given by position or keyword, or absent: None) is passed as
    ``replace(value)``; RuntimeError if `function` has no such parameter (not a Megatron-LM megatron_patches knows)."""
    signature = inspect.signature(function)
    if name not in signature.parameters:
        raise RuntimeError(f"{function.__module__}.{function.__qualname__} takes no {name}; this Megatron-LM is "
                           "not one megatron_patches supports (core_v0.16.0 through core_v0.19.0)")

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments[name] = replace(bound.arguments.get(name))
        return function(*bound.args, **bound.kwargs)

    return wrapper


def with_extra_args(function, after_parse=None):
    """`function` (e.g. megatron.training.pretrain) with its extra_args_provider argument chained to ours."""
    return replace_argument(function, "extra_args_provider", lambda provider: chain_providers(provider, after_parse))


__all__ = ["CONFIG_KEYS", "DEFAULTS", "OPTIMIZER_NAMES", "add_arguments", "add_optimizer_choice",
           "chain_providers", "optimizer_config_kwargs", "read_config", "replace_argument", "resolve",
           "with_extra_args"]
