"""Zero-code-change runner: ``python -m gradpower_ds.run train.py args...``.

Calls ``gradpower_ds.deepspeed.register()`` and then runs the user's unchanged
training script as ``__main__``, exactly as ``python train.py args...`` would
(``sys.argv``, ``sys.path[0]``), so its DeepSpeed config can say
``"optimizer": {"type": "AdamPower", ...}``. ``-m pkg.module`` runs a module
instead of a file. Works under every launcher that starts ``python -m``:

    torchrun --nproc_per_node 8 -m gradpower_ds.run train.py --deepspeed_config ds.json
    deepspeed --num_gpus 8 --module gradpower_ds.run train.py --deepspeed_config ds.json

The ``deepspeed`` launcher puts ``--local_rank=N`` right after the module name,
i.e. before the script; the runner moves it behind the script, where
``deepspeed train.py`` would have put it.
"""

from __future__ import annotations

import logging
import os
import re
import runpy
import sys

USAGE = ("usage: python -m gradpower_ds.run [--local_rank=N] (SCRIPT.py | -m MODULE) [ARGS...]\n"
         "Registers \"type\": \"AdamPower\" with DeepSpeed, then runs SCRIPT (or MODULE) as __main__ with ARGS.")
LOCAL_RANK = re.compile(r"--local[_-]rank(=.*)?$")

_log = logging.getLogger("gradpower_ds.run")


def split_args(argv: list[str]) -> tuple[str | None, str, list[str]]:
    """Parses the runner's arguments into (module or None, script or module name, script argv[1:]).

    Leading ``--local_rank=N`` / ``--local-rank N`` options (added by the
    ``deepspeed`` and ``torch.distributed.launch`` launchers) are moved to the
    front of the script's own arguments. Raises SystemExit(2) with USAGE when no
    script is given.
    """
    argv = list(argv)
    launcher_args = []
    while argv and LOCAL_RANK.match(argv[0]):
        takes_value = "=" not in argv[0] and len(argv) > 1
        launcher_args += argv[:2] if takes_value else argv[:1]
        argv = argv[2:] if takes_value else argv[1:]
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0)
    if argv and argv[0] == "-m":
        if len(argv) < 2:
            usage_error("-m needs a module name")
        return argv[1], argv[1], launcher_args + argv[2:]
    if not argv or argv[0].startswith("-"):
        usage_error("no training script given" + (f" (unknown option {argv[0]})" if argv else ""))
    return None, argv[0], launcher_args + argv[1:]


def usage_error(message: str) -> None:
    """Prints ``error: message`` and USAGE to stderr and exits with status 2 (as argparse does)."""
    print(f"error: {message}\n{USAGE}", file=sys.stderr)
    raise SystemExit(2)


def enable_rank0_logging(name: str = "gradpower_ds") -> None:
    """Shows INFO messages of logger `name` and its children (registration, the optimizer DeepSpeed built,
    training progress) on rank 0 only.

    Other ranks show warnings only. Adds one handler to that logger (none when it already has one) and
    stops propagation, so a root handler the script sets up prints nothing twice.
    """
    logger = logging.getLogger(name)
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)


def default_to_world_of_one() -> None:
    """Sets torch.distributed's env:// variables for a single process when no launcher set them (python -m ...)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))


def main(argv: list[str] | None = None) -> None:
    """Registers AdamPower with DeepSpeed and runs the script (or ``-m`` module) given in ``argv``."""
    module, target, script_args = split_args(sys.argv[1:] if argv is None else argv)
    if module is None and not os.path.isfile(target):
        usage_error(f"training script not found: {target}")
    enable_rank0_logging()
    from .deepspeed import register

    register()
    _log.info("gradpower_ds.run: registered DeepSpeed optimizer types AdamPower/AdamWPower; running %s", target)
    sys.argv = [target, *script_args]
    if module is not None:
        runpy.run_module(module, run_name="__main__", alter_sys=True)  # sets argv[0] to the module's file
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(target))
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
