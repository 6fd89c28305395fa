"""``python -m gradpower_ds train|compare|advise-p|verify-checkpoint ...``: the command line.

``train`` runs the main job in this one process (for several ranks start
``gradpower_ds.jobs.train`` under a launcher, as launch/quickstart.sh does); ``compare``
launches its runs itself; ``advise-p`` is the jobs wing's too. The commands import the jobs
wing only when run, so the library itself never does. ``verify-checkpoint`` is the library's
(``gradpower_ds.checkpoint_manifest``).
"""

import sys

USAGE = "usage: python -m gradpower_ds {train,compare,advise-p,verify-checkpoint} [options]   (--help after the command for its options)"
HELP = USAGE + """

commands:
  train     the main job in this one process (for several ranks run gradpower_ds.jobs.train under a launcher)
  compare   runs the main job for several optimizers, powers and seeds and compares them
  advise-p  the p our p-versus-batch study suggests for a run's measured gradient noise
  verify-checkpoint DIR
            checks checkpoint folders against their integrity manifests (exit 0 intact, 1 damaged)"""


def main() -> None:
    """Dispatches to gradpower_ds.jobs.train.main, .compare.main, .advise.main or checkpoint_manifest.main."""
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else (None, [])
    if command == "train":
        from .jobs.train import main as run
    elif command == "compare":
        from .jobs.compare import main as run
    elif command == "advise-p":
        from .jobs.advise import main as run
    elif command == "verify-checkpoint":
        from .checkpoint_manifest import main as verify

        raise SystemExit(verify(args))
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
