"""Zero-code-change runner: ``python -m gradpower_ds.jobs.run train.py args...``.

Calls ``gradpower_ds.deepspeed.register()`` and then runs the user's unchanged
training script as ``__main__``, exactly as ``python train.py args...`` would
(``sys.argv``, ``sys.path[0]``), so its DeepSpeed config can say
``"optimizer": {"type": "AdamPower", ...}``. ``-m pkg.module`` runs a module
instead of a file. Works under every launcher that starts ``python -m``:

    torchrun --nproc_per_node 8 -m gradpower_ds.jobs.run train.py --deepspeed_config ds.json
    deepspeed --num_gpus 8 --module gradpower_ds.jobs.run train.py --deepspeed_config ds.json
    accelerate launch --config_file accelerate.yaml -m gradpower_ds.jobs.run train.py ...
    python -m gradpower_ds.jobs.run train.py --deepspeed_config ds.json      # one process

The ``deepspeed`` launcher puts ``--local_rank=N`` right after the module name,
i.e. before the script; the runner moves it behind the script, where
``deepspeed train.py`` would have put it. Started with no launcher (no ``RANK`` /
``WORLD_SIZE``, no MPI environment) it sets torch.distributed's variables for a
world of one process (``gradpower_ds.jobs.processes``), where DeepSpeed would otherwise
try MPI discovery.
A launcher given as the script is refused: the runner belongs after the
launcher, in every process it starts (registration does not cross processes).
"""

from __future__ import annotations

import logging
import os
import re
import runpy
import sys

from ..rank_logging import enable_rank0_logging
from .processes import default_to_world_of_one

USAGE = ("usage: python -m gradpower_ds.jobs.run [--local_rank=N] (SCRIPT.py | -m MODULE) [ARGS...]\n"
         "Registers \"type\": \"AdamPower\" with DeepSpeed, then runs SCRIPT (or MODULE) as __main__ with ARGS.")
LOCAL_RANK = re.compile(r"--local[_-]rank(=.*)?$")
LAUNCHER_SCRIPTS = ("deepspeed", "torchrun", "accelerate", "accelerate-launch")
LAUNCHER_MODULES = ("torch.distributed.run", "torch.distributed.launch", "deepspeed.launcher.runner",
                    "accelerate.commands.launch", "accelerate.commands.accelerate_cli")

_log = logging.getLogger("gradpower_ds.jobs.run")


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


def refuse_launcher(module: str | None, target: str) -> None:
    """Usage error when the target is a launcher (torchrun, deepspeed, accelerate): the processes it starts would
    not be registered (DeepSpeed then says "AdamPower is not a supported DeepSpeed Optimizer")."""
    name = module if module is not None else os.path.basename(target)
    if name in (LAUNCHER_MODULES if module is not None else LAUNCHER_SCRIPTS):
        usage_error(f"{name} is a launcher: put gradpower_ds.jobs.run after it, so that every process it starts "
                    "registers AdamPower, e.g. `torchrun ... -m gradpower_ds.jobs.run train.py`, `deepspeed --module "
                    "gradpower_ds.jobs.run train.py`, `accelerate launch ... -m gradpower_ds.jobs.run train.py`")


def usage_error(message: str) -> None:
    """Prints ``error: message`` and USAGE to stderr and exits with status 2 (as argparse does)."""
    print(f"error: {message}\n{USAGE}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Registers AdamPower with DeepSpeed and runs the script (or ``-m`` module) given in ``argv``."""
    module, target, script_args = split_args(sys.argv[1:] if argv is None else argv)
    refuse_launcher(module, target)
    if module is None and not os.path.isfile(target):
        usage_error(f"training script not found: {target}")
    one_process = default_to_world_of_one()
    enable_rank0_logging()
    from ..deepspeed import explain_unregistered, register

    register()
    _log.info("gradpower_ds.jobs.run: registered DeepSpeed optimizer types AdamPower/AdamWPower; running %s", target)
    if one_process:
        _log.info("gradpower_ds.jobs.run: no launcher (RANK, WORLD_SIZE unset): one process, world size 1, "
                  "MASTER_PORT %s", os.environ["MASTER_PORT"])
    sys.argv = [target, *script_args]
    try:
        if module is not None:
            runpy.run_module(module, run_name="__main__", alter_sys=True)  # sets argv[0] to the module's file
        else:
            sys.path[0] = os.path.dirname(os.path.abspath(target))
            runpy.run_path(target, run_name="__main__")
    except Exception as exc:  # e.g. from a process the script started without registering (mp.spawn)
        explain_unregistered(exc)
        raise


if __name__ == "__main__":
    main()
