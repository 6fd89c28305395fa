"""``python -m gradpower_ds train|compare|advise-p ...``: the command line of the jobs wing (``gradpower_ds.jobs``).

``train`` runs the main job in this one process (for several ranks start
``gradpower_ds.jobs.train`` under a launcher, as launch/quickstart.sh does); ``compare``
launches its runs itself. The commands import the jobs wing only when run, so the
library itself never does.
"""

import sys

USAGE = "usage: python -m gradpower_ds {train,compare,advise-p} [options]   (--help after the command for its options)"
HELP = USAGE + """

commands:
  train     the main job in this one process (for several ranks run gradpower_ds.jobs.train under a launcher)
  compare   runs the main job for several optimizers, powers and seeds and compares them
  advise-p  the p our p-versus-batch study suggests for a run's measured gradient noise"""


def main() -> None:
    """Dispatches to gradpower_ds.jobs.train.main, .compare.main or .advise.main."""
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else (None, [])
    if command == "train":
        from .jobs.train import main as run
    elif command == "compare":
        from .jobs.compare import main as run
    elif command == "advise-p":
        from .jobs.advise import main as run
    elif command in ("-h", "--help"):
        print(HELP)
        raise SystemExit(0)
    else:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    run(args)


if __name__ == "__main__":
    from .jobs.processes import exit_when_done

    exit_when_done(main)
