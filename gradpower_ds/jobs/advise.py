"""``python -m gradpower_ds advise-p RUN_DIR``: the p that our measured p-versus-batch relation suggests for a run.

The GradPower paper's theory says the best p depends on the gradient noise: p > 1 when the batch B is
small against the noise scale B_simple, falling below 1 when B is far above it. ``benchmarks/p_vs_batch.py``
measured the best p and B_simple at several batches on this project's machine and ships the result as
``RELATION`` (``gradpower_ds/jobs/p_vs_batch.json``). This command reads a run's measured noise (a completed
run's B_simple in summary.json, else the last value its metrics.csv logged; ``gradpower_ds.noise``) and its
global batch (its config.json and
summary.json, or ``--batch-tokens``), places B / B_simple on the study's points and:

- where the study shows a relation (at least two batches whose best p every seed agrees on, falling as
  B / B_simple grows), prints the p it suggests (interpolated in log(B / B_simple), held at the ends) with
  the evidence and its uncertainty (the per-seed best p of the neighbouring batches);
- where it does not, says so and prints the evidence, instead of inventing a number.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from .metrics import read_metrics

RELATION = Path(__file__).with_name("p_vs_batch.json")


def run_noise(run_dir: Path) -> tuple[float, str]:
    """A run's gradient noise scale and where it came from: a completed run's B_simple (summary.json: its summed
    tr Sigma over its summed |G|^2), else the last smoothed value its metrics.csv logged; ValueError saying what
    is missing."""
    try:
        value = json.loads((run_dir / "summary.json").read_text()).get("noise_scale")
    except (OSError, ValueError):
        value = None
    if value is not None:
        return value, f"{run_dir}/summary.json (the run's summed tr Sigma / summed |G|^2)"
    rows = read_metrics(run_dir / "metrics.csv")
    if not rows:
        raise ValueError(f"{run_dir}: no metrics.csv (not a run folder of gradpower_ds.jobs.train or train_megatron)")
    logged = [r for r in rows if r.get("noise_scale") is not None]
    if not logged:
        raise ValueError(f"{run_dir}: metrics.csv logs no noise_scale: the run measured no gradient noise "
                         "(noise_every 0, a run before the measurement existed, or one micro-batch gradient per step "
                         "in all: grad_accum x ranks must be >= 2)")
    return logged[-1]["noise_scale"], f"{run_dir}/metrics.csv, step {logged[-1]['step']} (the smoothed value; the " \
                                      "run has not completed)"


def run_batch_tokens(run_dir: Path) -> int:
    """The run's global batch in tokens from its config.json and summary.json (world size); ValueError if absent."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        world = json.loads((run_dir / "summary.json").read_text())["world_size"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise ValueError(f"{run_dir}: cannot tell the global batch (needs config.json and a completed run's "
                         "summary.json, as gradpower_ds.jobs.train writes them); pass --batch-tokens") from None
    return config["micro_batch"] * config["seq_len"] * config["grad_accum"] * world


def study_points(study: dict) -> list[dict]:
    """The study's batches as points: B / B_simple, the best p, whether every seed agrees on it, sorted by x."""
    points = [{"x": row["batch_tokens"] / row["noise_scale"], "batch_tokens": row["batch_tokens"],
               "noise_scale": row["noise_scale"], "best_p": row["best_p"], "per_seed": row["best_p_per_seed"],
               "agreed": len(set(row["best_p_per_seed"])) == 1,
               "losses": {p: statistics.fmean(v) for p, v in row["losses"].items()}}
              for row in study["rows"] if row.get("noise_scale")]
    return sorted(points, key=lambda point: point["x"])


def relation(points: list[dict]) -> list[dict] | None:
    """The points that carry a relation (agreed best p, at least two, not all the same p, never rising with x),
    or None when the study shows none."""
    agreed = [point for point in points if point["agreed"]]
    ps = [point["best_p"] for point in agreed]
    if len(agreed) < 2 or len(set(ps)) < 2 or any(b > a for a, b in zip(ps, ps[1:])):
        return None
    return agreed


def suggest(x: float, points: list[dict]) -> tuple[float, str]:
    """The p at B / B_simple = `x`: interpolated in log x between the relation's points, held at its ends."""
    if x <= points[0]["x"]:
        return points[0]["best_p"], "below the study's range: its smallest B / B_simple"
    if x >= points[-1]["x"]:
        return points[-1]["best_p"], "above the study's range: its largest B / B_simple"
    for left, right in zip(points, points[1:]):
        if left["x"] <= x <= right["x"]:
            t = (math.log(x) - math.log(left["x"])) / (math.log(right["x"]) - math.log(left["x"]))
            return left["best_p"] + t * (right["best_p"] - left["best_p"]), "interpolated"
    raise AssertionError("unreachable")


def evidence(points: list[dict]) -> str:
    lines = ["the study (benchmarks/p_vs_batch.py; docs/RESULTS.md):",
             f"  {'batch tokens':>12} {'B_simple':>10} {'B/B_simple':>11}  best p (per seed)  mean loss per p"]
    for point in points:
        losses = ", ".join(f"{p}: {v:.4f}" for p, v in point["losses"].items())
        lines.append(f"  {point['batch_tokens']:>12,} {point['noise_scale']:>10,.0f} {point['x']:>11.3g}  "
                     f"{point['best_p']:g} ({', '.join(f'{p:g}' for p in point['per_seed'])})  {losses}")
    return "\n".join(lines)


def advise(noise: float, batch_tokens: int, study: dict) -> str:
    """The advice for a run with noise scale `noise` (tokens) at a global batch of `batch_tokens`."""
    x = batch_tokens / noise
    head = f"this run: batch {batch_tokens:,} tokens, gradient noise scale B_simple {noise:,.0f} tokens, " \
           f"B / B_simple = {x:.3g}"
    points = study_points(study)
    carried = relation(points)
    if carried is None:
        return (f"{head}\nno advice: the study shows no relation between the noise and the best p (it needs at least "
                "two batches whose best p every seed agrees on, falling as B / B_simple grows), so none is "
                f"suggested.\n{evidence(points)}")
    p, where = suggest(x, carried)
    nearest = sorted(carried, key=lambda point: abs(math.log(point["x"] / x)))[:2]
    spread = sorted({q for point in nearest for q in point["per_seed"]})
    return (f"{head}\nsuggested p = {p:.2f} ({where}; the per-seed best p of the nearest study batches: "
            f"{', '.join(f'{q:g}' for q in spread)}; the study's powers are a grid, so read it to about one grid "
            f"step)\n{evidence(points)}")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: prints the advice for RUN_DIR."""
    parser = argparse.ArgumentParser(prog="python -m gradpower_ds advise-p", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder of gradpower_ds.jobs.train (or train_megatron)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="the run's global batch in tokens (default: "
                                                                         "from its config.json and summary.json)")
    parser.add_argument("--relation", type=Path, default=RELATION, help="the study's JSON")
    args = parser.parse_args(argv)
    if args.batch_tokens is not None and args.batch_tokens <= 0:
        parser.error(f"--batch-tokens {args.batch_tokens} must be > 0")
    try:
        noise, source = run_noise(args.run_dir)
        batch = args.batch_tokens if args.batch_tokens is not None else run_batch_tokens(args.run_dir)
        study = json.loads(args.relation.read_text())
    except (ValueError, OSError) as error:
        parser.error(str(error))
    print(f"the run's noise: {source}")
    print(advise(noise, batch, study))
