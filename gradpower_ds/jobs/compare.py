"""``python -m gradpower_ds compare``: the same pretraining for several optimizers/powers, GPAS off/on, seeds.

Each variant x seed is one ``gradpower_ds.jobs.train`` run under the ``deepspeed``
launcher in ``OUT/<variant>/seed<k>``; runs that already completed with the same
settings (the run folder's config.json) are reused, so an interrupted comparison
picks up where it stopped; a run folder with other settings is refused (use
another ``--out``). Every run's settings are checked before the first launch.
Then it prints a table
(final validation loss mean ± std over seeds, tokens/s) and writes
``OUT/compare.png`` (validation-loss curves, mean ± std band) and
``OUT/compare.json``.

    python -m gradpower_ds compare --optimizers adamw adampower:1.1 adampower:1.2 adampower:1.4 \\
        --gpas off on --seeds 0 1 2 --out runs/compare -- --config configs/quickstart.json --steps 200

``--blockwise_lr off on`` adds each variant with blockwise learning rates (label suffix ``-bw``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from . import require_extra
from .metrics import plot_curves, read_metrics
from .train_config import OPTIMIZERS, POWERED, ConfigError, OneLineParser, TrainConfig, load_config, report_error


def parse_variant(text: str) -> tuple[str, float | None]:
    """'adamw' -> ('adamw', None); 'adampower:1.2' -> ('adampower', 1.2); 'muonpower:0.9' -> ('muonpower', 0.9): P is
    the run's --power, the p of the optimizer named (for muonpower the p before Muon's momentum, required).

    A plain 'adampower' or 'muonpower' gets its power's default, as the main job resolves it (muonpower has none:
    refused). ValueError naming the entry for an unknown name or a bad power (checked by the main job's own check).
    """
    name, colon, power = text.partition(":")
    entry = f"--optimizers entry {text!r}"
    if name not in OPTIMIZERS:
        raise ValueError(f"{entry}: unknown optimizer {name!r} in {text!r}; choose one of {sorted(OPTIMIZERS)} "
                         "(adampower:P or muonpower:P for a power P)")
    if colon and name not in POWERED:
        raise ValueError(f"{entry}: only {' and '.join(POWERED)} take a power (adampower:1.2, muonpower:0.9)")
    if name not in POWERED:
        return name, None
    try:
        value = float(power) if colon else None
    except ValueError:
        raise ValueError(f"{entry}: the power {power!r} is not a number ({name}:P)") from None
    try:
        return name, TrainConfig(optimizer=name, power=value, grad_clip=0.0).power
    except ConfigError as error:
        raise ValueError(f"{entry}: {error}") from None


def variant_label(optimizer: str, power: float | None, gpas: bool, blockwise: bool = False) -> str:
    """A folder-safe label, e.g. 'adampower-p1.2-gpas', 'adamw-bw' (blockwise lr)."""
    return (optimizer + (f"-p{power:g}" if power is not None else "") + ("-gpas" if gpas else "")
            + ("-bw" if blockwise else ""))


def launch_command(nproc: int, port: int, train_args: list[str]) -> list[str]:
    """The deepspeed-launcher command for one training run on this node."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(port),
            "--module", "gradpower_ds.jobs.train", *train_args]


# settings that do not change what a run trains or measures: a finished run is reused whatever they are
_NOT_COMPARED = {"run_dir", "resume", "resume_tag", "resume_changes", "stop_at", "progress", "tensorboard", "log_every",
                 "save_every", "noise_every"}


def setting_differences(run_dir: Path, cfg: TrainConfig, nproc: int) -> list[str]:
    """How the run recorded in `run_dir` (config.json, and summary.json's world size) differs from `cfg` on `nproc`
    ranks: ['lr: 0.003 there, 0.0001 now', ...]; [] when it has the same settings."""
    recorded_path = run_dir / "config.json"
    if not recorded_path.exists():
        return ["no config.json to check its settings against"]
    try:
        recorded = json.loads(recorded_path.read_text())
    except ValueError:
        return [f"{recorded_path} is not valid JSON"]
    differences = [f"{key}: {'(not recorded)' if there is _MISSING else json.dumps(there)} there, "
                   f"{json.dumps(value)} now" for key, there, value in cfg.differences(recorded, _NOT_COMPARED, _MISSING)]
    summary = run_dir / "summary.json"
    if summary.exists():
        try:
            world = json.loads(summary.read_text()).get("world_size")
        except ValueError:
            world = None
        if world is not None and world != nproc:
            differences.append(f"ranks (--nproc): {world} there, {nproc} now")
    return differences


_MISSING = object()


def plan_runs(args, variants: list[tuple[str, float | None, bool, bool]]) -> list[tuple[str, Path, list[str], bool]]:
    """(label, run folder, train flags, complete) for every variant x seed, each run's settings checked as
    gradpower_ds.jobs.train will check them and each existing run folder checked to hold the same settings; ValueError
    (one line) before anything is launched otherwise."""
    plan = []
    for optimizer, power, gpas, blockwise in variants:
        label = variant_label(optimizer, power, gpas, blockwise)
        for seed in args.seeds:
            run_dir = Path(args.out) / label / f"seed{seed}"
            train_args = [*args.train_args, "--run_dir", str(run_dir), "--optimizer", optimizer, "--seed", str(seed),
                          "--gpas", str(gpas).lower(), "--blockwise_lr", str(blockwise).lower(), "--progress",
                          "false", "--resume", "true"]
            if power is not None:
                train_args += ["--power", str(power)]
            try:
                cfg = load_config(train_args, world_size=args.nproc)
            except ConfigError as error:
                raise ValueError(f"{label} seed {seed}: {error}") from None
            if (run_dir / "config.json").exists() or (run_dir / "summary.json").exists():
                differences = setting_differences(run_dir, cfg, args.nproc)
                if differences:
                    raise ValueError(f"{run_dir} holds a run with other settings ({'; '.join(differences)}); use "
                                     f"another --out, or delete {run_dir} to run it again")
            plan.append((label, run_dir, train_args, (run_dir / "summary.json").exists()))
    return plan


def run_all(args, variants: list[tuple[str, float | None, bool, bool]]) -> dict[str, list[Path]]:
    """Runs every variant x seed that has not completed yet (after checking them all); returns label -> run
    folders."""
    plan = plan_runs(args, variants)
    runs = {}
    for label, run_dir, train_args, complete in plan:
        runs.setdefault(label, []).append(run_dir)
        if complete:
            print(f"compare: {run_dir} already complete, reused (same settings)", flush=True)
            continue
        print(f"compare: training {label} seed {run_dir.name.removeprefix('seed')} -> {run_dir}", flush=True)
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
        noise = [s["noise_scale"] for s in summaries if s.get("noise_scale") is not None]
        table[label] = {"val_loss_mean": statistics.fmean(losses),
                        "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                        "val_losses": losses, "tokens_per_s": statistics.fmean(s["tokens_per_s"] for s in summaries),
                        "tokens": summaries[0]["tokens"], "seeds": len(dirs),
                        "noise_scale": statistics.fmean(noise) if noise else None}
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


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as it is written, and every option's default."""


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry (see the module docstring); returns the aggregated table."""
    require_extra("python -m gradpower_ds compare")
    parser = OneLineParser(prog="python -m gradpower_ds compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=Formatter)
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "adampower:1.1", "adampower:1.2", "adampower:1.4"],
                        help="adamw, adampower:P, muon and/or muonpower:P entries")
    parser.add_argument("--gpas", nargs="+", choices=["off", "on"], default=["off"], help="GPAS off and/or on")
    parser.add_argument("--blockwise_lr", nargs="+", choices=["off", "on"], default=["off"],
                        help="blockwise learning rates (docs/features.md) off and/or on")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="a run per seed and variant")
    parser.add_argument("--out", default="runs/compare", help="folder of the runs (OUT/<variant>/seed<k>) and plots")
    parser.add_argument("--nproc", type=int, default=int(os.environ.get("NUM_GPUS", 2)), help="ranks per run")
    parser.add_argument("--master_port", type=int, default=29512, help="rendezvous port of the runs")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: flags for gradpower_ds.jobs.train")
    args = parser.parse_args(argv)
    args.train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.nproc < 1:
        parser.error(f"--nproc {args.nproc} must be >= 1")
    given = [flag for flag in ("--power", "--optimizer", "--seed", "--gpas", "--blockwise_lr", "--run_dir")
             if flag in args.train_args]
    if given:
        parser.error(f"{given[0]} after -- is set by compare for each run (--optimizers adamw adampower:P muonpower:P, "
                     "--seeds, --gpas, --blockwise_lr, --out); give it there")
    try:
        optimizers = [parse_variant(v) for v in args.optimizers]
        variants = [(name, power, gpas == "on", blockwise == "on") for gpas in args.gpas
                    for blockwise in args.blockwise_lr for name, power in optimizers]
        plan_runs(args, variants)  # every run's settings and folder checked before the first launch
    except ValueError as error:
        report_error(str(error), parser.prog)
        raise SystemExit(2)
    table, curves = aggregate(run_all(args, variants))
    # deltas against DeepSpeed's own optimizer: AdamW, or Muon in a Muon-only comparison
    baseline = next((label for plain in ("adamw", "muon") for label in table if label.split("-")[0] == plain), None)
    print(format_table(table, baseline))
    out = Path(args.out)
    plot_curves(curves, out / "compare.png", title=f"validation loss, mean ± std over seeds {args.seeds}")
    (out / "compare.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"compare: wrote {out / 'compare.png'} and {out / 'compare.json'}")
    return table


if __name__ == "__main__":
    main()
