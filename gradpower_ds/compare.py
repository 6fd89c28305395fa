"""``python -m gradpower_ds compare``: the same pretraining for several optimizers/powers, GPAS off/on, seeds.

Each variant x seed is one ``gradpower_ds.train`` run under the ``deepspeed``
launcher in ``OUT/<variant>/seed<k>``; runs that already completed are reused, so
an interrupted comparison picks up where it stopped. Then it prints a table
(final validation loss mean ± std over seeds, tokens/s) and writes
``OUT/compare.png`` (validation-loss curves, mean ± std band) and
``OUT/compare.json``.

    python -m gradpower_ds compare --optimizers adamw adampower:1.1 adampower:1.2 adampower:1.4 \\
        --gpas off on --seeds 0 1 2 --out runs/compare -- --config configs/quickstart.json --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from .metrics import plot_curves, read_metrics
from .train_config import OPTIMIZERS


def parse_variant(text: str) -> tuple[str, float | None]:
    """'adamw' -> ('adamw', None); 'adampower:1.2' -> ('adampower', 1.2); ValueError for unknown names."""
    name, _, power = text.partition(":")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} in {text!r}; choose one of {sorted(OPTIMIZERS)} "
                         "(adampower:P for a power P)")
    if power and name != "adampower":
        raise ValueError(f"{text!r}: only adampower takes a power (adampower:1.2)")
    return name, float(power) if power else (1.2 if name == "adampower" else None)


def variant_label(optimizer: str, power: float | None, gpas: bool) -> str:
    """A folder-safe label, e.g. 'adampower-p1.2-gpas'."""
    return optimizer + (f"-p{power:g}" if power is not None else "") + ("-gpas" if gpas else "")


def launch_command(nproc: int, port: int, train_args: list[str]) -> list[str]:
    """The deepspeed-launcher command for one training run on this node."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(port),
            "--module", "gradpower_ds.train", *train_args]


def run_all(args, variants: list[tuple[str, float | None, bool]]) -> dict[str, list[Path]]:
    """Runs every variant x seed that has not completed yet; returns label -> run folders."""
    runs = {}
    for optimizer, power, gpas in variants:
        label = variant_label(optimizer, power, gpas)
        runs[label] = []
        for seed in args.seeds:
            run_dir = Path(args.out) / label / f"seed{seed}"
            runs[label].append(run_dir)
            if (run_dir / "summary.json").exists():
                print(f"compare: {run_dir} already complete, reused", flush=True)
                continue
            train_args = [*args.train_args, "--run_dir", str(run_dir), "--optimizer", optimizer, "--seed", str(seed),
                          "--gpas", str(gpas).lower(), "--progress", "false", "--resume", "true"]
            if power is not None:
                train_args += ["--power", str(power)]
            print(f"compare: training {label} seed {seed} -> {run_dir}", flush=True)
            proc = subprocess.run(launch_command(args.nproc, args.master_port, train_args))
            if proc.returncode:
                raise SystemExit(f"compare: the run {run_dir} failed (exit {proc.returncode}); see its output above. "
                                 "Fix the cause and rerun: completed runs are reused")
    return runs


def aggregate(runs: dict[str, list[Path]]) -> tuple[dict, dict]:
    """Per label: summary stats over seeds, and the validation curve as mean ± std rows."""
    table, curves = {}, {}
    for label, dirs in runs.items():
        summaries = [json.loads((d / "summary.json").read_text()) for d in dirs]
        losses = [s["val_loss"] for s in summaries]
        table[label] = {"val_loss_mean": statistics.fmean(losses),
                        "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                        "val_losses": losses, "tokens_per_s": statistics.fmean(s["tokens_per_s"] for s in summaries),
                        "tokens": summaries[0]["tokens"], "seeds": len(dirs)}
        per_step = {}
        for d in dirs:
            for row in read_metrics(d / "metrics.csv"):
                if row["val_loss"] is not None:
                    per_step.setdefault(row["step"], []).append(row["val_loss"])
        curves[label] = [{"step": step, "val_loss": statistics.fmean(v),
                          "val_loss_std": statistics.stdev(v) if len(v) > 1 else 0.0}
                         for step, v in sorted(per_step.items()) if len(v) == len(dirs)]
    return table, curves


def format_table(table: dict, baseline: str | None = None) -> str:
    """A plain-text table: label, final validation loss mean ± std (n seeds), Δ vs baseline, tokens/s."""
    lines = [f"{'variant':<28} {'val loss (mean ± std)':>24} {'Δ vs ' + (baseline or '-'):>22} {'tokens/s':>10}"]
    for label, row in table.items():
        delta = "" if baseline is None else f"{row['val_loss_mean'] - table[baseline]['val_loss_mean']:+.4f}"
        lines.append(f"{label:<28} {row['val_loss_mean']:>14.4f} ± {row['val_loss_std']:.4f} (n={row['seeds']})"
                     f" {delta:>22} {row['tokens_per_s']:>10,.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry (see the module docstring); returns the aggregated table."""
    parser = argparse.ArgumentParser(prog="python -m gradpower_ds compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "adampower:1.1", "adampower:1.2", "adampower:1.4"],
                        help="adamw and/or adampower:P entries")
    parser.add_argument("--gpas", nargs="+", choices=["off", "on"], default=["off"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--nproc", type=int, default=int(os.environ.get("NUM_GPUS", 2)), help="ranks per run")
    parser.add_argument("--master_port", type=int, default=29512)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: flags for gradpower_ds.train")
    args = parser.parse_args(argv)
    args.train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    try:
        optimizers = [parse_variant(v) for v in args.optimizers]
    except ValueError as error:
        parser.error(str(error))
    variants = [(name, power, gpas == "on") for gpas in args.gpas for name, power in optimizers]
    table, curves = aggregate(run_all(args, variants))
    baseline = next((label for label in table if label.startswith("adamw")), None)
    print(format_table(table, baseline))
    out = Path(args.out)
    plot_curves(curves, out / "compare.png", title=f"validation loss, mean ± std over seeds {args.seeds}")
    (out / "compare.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"compare: wrote {out / 'compare.png'} and {out / 'compare.json'}")
    return table


if __name__ == "__main__":
    main()
