"""``python -m gradpower_ds train|compare|advise-p ...``: the main job, the optimizer comparison, advice on p.

``train`` runs in this one process (for several ranks start ``gradpower_ds.train``
under a launcher, as launch/quickstart.sh does); ``compare`` launches its runs itself.
"""

import sys

from .processes import exit_when_done

USAGE = "usage: python -m gradpower_ds {train,compare,advise-p} [options]   (--help after the command for its options)"
HELP = USAGE + """

commands:
  train     the main job in this one process (for several ranks run gradpower_ds.train under a launcher)
  compare   runs the main job for several optimizers, powers and seeds and compares them
  advise-p  the p our p-versus-batch study suggests for a run's measured gradient noise"""


def main() -> None:
    """Dispatches to gradpower_ds.train.main, gradpower_ds.compare.main or gradpower_ds.advise.main."""
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else (None, [])
    if command == "train":
        from .train import main as run
    elif command == "compare":
        from .compare import main as run
    elif command == "advise-p":
        from .advise import main as run
    elif command in ("-h", "--help"):
        print(HELP)
        raise SystemExit(0)
    else:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    run(args)


if __name__ == "__main__":
    exit_when_done(main)
