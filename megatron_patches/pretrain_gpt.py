"""Megatron-LM's own ``pretrain_gpt.py``, unchanged, with AdamPower and the GradPower/GPAS flags.

    torchrun --nproc_per_node 8 -m megatron_patches.pretrain_gpt <Megatron-LM args> \\
        --optimizer adampower --gradpower-p 1.2 [--gradpower-config gp.json]

Finds ``pretrain_gpt.py`` (``--megatron-lm-path DIR``, else ``$MEGATRON_LM_PATH``,
else an importable module ``pretrain_gpt``, e.g. from an installed Megatron-LM
checkout), calls ``megatron_patches.apply()``, and runs the script as
``__main__`` with ``sys.argv`` as ``python pretrain_gpt.py ARGS`` would see it.
The one extra hook, for the two APIs of Megatron-LM's script:

- core_v0.16 and 0.17: ``pretrain(..., extra_args_provider)`` parses the arguments itself, so
  ``megatron.training.pretrain`` is wrapped to chain that provider with
  ``megatron_patches.arguments.add_arguments``;
- core_v0.18 on: the script calls ``megatron.training.arguments.parse_and_validate_args(
  extra_args_provider)`` and hands ``pretrain`` a config container, so that function's provider
  is chained instead.

(The script imports both by name when it runs, after the wraps.) With ``--gpas`` the model gets
``megatron_patches.apply_gpas`` before Megatron-LM wraps it in DDP: after the ``model_provider``
the script passes ``pretrain`` (to 0.18), or as a pre-wrap hook of the config container's model
(``pre_wrap_hooks``, Megatron-LM's own extension point; 0.19, whose script builds the model
from the container). That is thinner than replacing ``parse_args``, which
``megatron.training.initialize`` has already bound by name, or rewriting the layer specs. ``--gpas`` together
with a setting GPAS cannot run with (``megatron_patches.gpas.REFUSED_FLAGS``:
CUDA graphs, the MoE/EP overlap) is refused when the arguments are parsed. Without Megatron-LM
this exits with status 2 and says how to point at it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import os
import runpy
import sys

import megatron_patches
from gradpower_ds.rank_logging import enable_rank0_logging
from megatron_patches.arguments import with_extra_args
from megatron_patches.gpas import refused_settings

ENV = "MEGATRON_LM_PATH"
PATH_FLAG = "--megatron-lm-path"
NOT_FOUND = (
    "megatron_patches.pretrain_gpt: Megatron-LM not found ({why}).\n"
    "Point at a Megatron-LM checkout (core_v0.16.0 through core_v0.19.0, with its megatron-core) with one of:\n"
    "  MEGATRON_LM_PATH=/path/to/Megatron-LM python -m megatron_patches.pretrain_gpt ARGS...\n"
    "  python -m megatron_patches.pretrain_gpt --megatron-lm-path /path/to/Megatron-LM ARGS...\n"
    "  pip install -e /path/to/Megatron-LM   (so that pretrain_gpt and megatron.training are importable)")


_log = logging.getLogger("megatron_patches.pretrain_gpt")  # not __name__: run with -m, that is "__main__"


def refuse_unsupported_gpas(args, parser) -> None:
    """--gpas with a Megatron-LM setting GPAS cannot run with (CUDA graphs, MoE/EP overlap): refuse at parse time."""
    if not args.gpas:
        return
    for name, value, allowed, why in refused_settings(args):
        parser.error(f"--gpas cannot be combined with --{name.replace('_', '-')}={value!r} ({why}); drop one of "
                     f"them ({name} must be {allowed!r} with GPAS)")


def _gates_if_asked(model) -> None:
    """GPAS gates into `model` (one model stage) when --gpas is set."""
    from megatron.training import get_args

    settings = get_args()
    if settings.gpas:
        layers = megatron_patches.apply_gpas(model, act=settings.gpas_act)
        _log.info("megatron_patches: GPAS gates (act=%s) in %d layers", settings.gpas_act, len(layers))


def with_gpas_model(pretrain):
    """`pretrain` putting GPAS gates into the model it builds when --gpas is set: after the model_provider it is
    given, or else as a pre-wrap hook of its config container's model (core_v0.19's script passes no provider).

    Megatron-LM calls the provider (or the hooks) and only then wraps the result in Float16Module and DDP, so the
    gates exist before DDP allocates grad buffers and the optimizer sees them.
    """
    signature = inspect.signature(pretrain)

    def gpas_provider(provider):
        def model_provider(*args, **kwargs):
            model = provider(*args, **kwargs)
            _gates_if_asked(model)
            return model

        return model_provider

    def gpas_pre_wrap_hook(stages):
        for stage in stages:
            _gates_if_asked(stage)
        return stages

    @functools.wraps(pretrain)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        provider = bound.arguments.get("model_provider")
        model = getattr(bound.arguments.get("cfg_container"), "model", None)
        if provider is not None:
            bound.arguments["model_provider"] = gpas_provider(provider)
        elif model is not None:
            model.pre_wrap_hooks = [*model.pre_wrap_hooks, gpas_pre_wrap_hook]
        return pretrain(*bound.args, **bound.kwargs)

    return wrapper


def split_path(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --megatron-lm-path value or None, argv without it); it may appear anywhere in argv."""
    path, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == PATH_FLAG:
            if i + 1 >= len(argv):
                not_found(f"{PATH_FLAG} needs a directory")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith(PATH_FLAG + "="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return path, rest


def not_found(why: str) -> None:
    """Prints NOT_FOUND to stderr and exits with status 2."""
    print(NOT_FOUND.format(why=why), file=sys.stderr)
    raise SystemExit(2)


def find_script(path: str | None) -> str:
    """The path of Megatron-LM's pretrain_gpt.py; puts its checkout first on sys.path. Exits 2 when not found."""
    if path is None:
        path = os.environ.get(ENV) or None
        origin = f"${ENV}={path}"
    else:
        origin = f"{PATH_FLAG} {path}"
    if path is not None:
        script = os.path.join(os.path.abspath(path), "pretrain_gpt.py")
        if not os.path.isfile(script):
            not_found(f"{origin}: no pretrain_gpt.py in that directory")
        sys.path.insert(0, os.path.dirname(script))
    else:
        spec = importlib.util.find_spec("pretrain_gpt")
        if spec is None or not spec.origin or not os.path.isfile(spec.origin):
            not_found(f"no importable module pretrain_gpt, and ${ENV} is not set")
        script = spec.origin
    try:
        importlib.import_module("megatron.training")
    except ImportError as err:
        not_found(f"found {script}, but megatron.training cannot be imported: {err}")
    return script


def main(argv: list[str] | None = None) -> None:
    """Applies the patches and runs Megatron-LM's pretrain_gpt.py as __main__ with argv."""
    path, args = split_path(sys.argv[1:] if argv is None else list(argv))
    script = find_script(path)
    import megatron.training

    import megatron.training.arguments as megatron_arguments

    original = getattr(megatron.training, "pretrain", None)
    if original is None:
        not_found(f"found {script}, but megatron.training has no pretrain(); use Megatron-LM core_v0.16.0 or newer")
    enable_rank0_logging("megatron_patches")  # what was built shows on rank 0, whatever level Megatron-LM sets
    megatron_patches.apply()
    saved = {(megatron.training, "pretrain"): original}
    if "extra_args_provider" in inspect.signature(original).parameters:  # core_v0.16, 0.17
        megatron.training.pretrain = with_extra_args(with_gpas_model(original), refuse_unsupported_gpas)
    else:  # core_v0.18 on: the script parses with parse_and_validate_args
        parse = megatron_arguments.parse_and_validate_args
        saved[(megatron_arguments, "parse_and_validate_args")] = parse
        megatron_arguments.parse_and_validate_args = with_extra_args(parse, refuse_unsupported_gpas)
        megatron.training.pretrain = with_gpas_model(original)
    _log.info("megatron_patches.pretrain_gpt: patches applied; running %s", script)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(script)
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


if __name__ == "__main__":
    main()
