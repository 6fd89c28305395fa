"""The best p against the global batch, with the gradient noise measured in every run (results: docs/RESULTS.md).

The GradPower paper (Section 3.5) finds the best p falling as the batch grows and the gradient noise drops.
This reproduces the sweep at small scale: AdamPower p in --powers x global batches (--batches, in
sequences of the quickstart's 128 tokens, on 2 ranks) x --seeds, all on the quickstart model and corpus
(configs/quickstart.json) in fp32, at equal tokens per run (--tokens), with the warmup (5 %), the
evaluations (4 per run, on the same 128 validation sequences) at the same fractions of the run; lr and
everything else as the quickstart's. Each batch is one ``python -m gradpower_ds compare`` (finished runs are
reused when it is rerun), and one more at p = 1 (plain Adam) over the same seeds that measures the gradient
noise scale B_simple at every step (``gradpower_ds.noise``; each run's B_simple is its summed tr Sigma over
its summed |G|^2), so the noise is measured the same way at every batch. It prints one markdown table
(final validation loss per p and batch, mean ± std
over seeds; the best p per batch, overall and per seed; the measured noise scale) and writes

    --plot      the validation loss against p, one line per batch (mean ± std)
    --relation  the measured relation as JSON, what ``python -m gradpower_ds advise-p`` reads

    python benchmarks/p_vs_batch.py                        # (4 p + 1) x 3 batches x 3 seeds = 45 runs, ~75 min
    python benchmarks/p_vs_batch.py --seeds 0 --powers 1.0 1.2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from gradpower_ds.jobs import compare

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, RANKS = 128, 2  # the quickstart's sequence length; ranks per run
RELATION = ROOT / "gradpower_ds" / "jobs" / "p_vs_batch.json"


def layout(batch: int, tokens: int) -> dict:
    """The main job's flags for a global batch of `batch` sequences at `tokens` tokens per run: micro-batches of at
    most 16 sequences per rank (gradient accumulation above), steps, warmup, evaluations, noise measurements."""
    per_rank, remainder = divmod(batch, RANKS)
    if remainder or per_rank < 1:
        raise ValueError(f"--batches {batch}: must be a positive multiple of the {RANKS} ranks")
    micro = min(per_rank, 16)
    if per_rank % micro:
        raise ValueError(f"--batches {batch}: {per_rank} sequences per rank are not a multiple of 16")
    steps, rest = divmod(tokens, batch * SEQ_LEN)
    if rest or steps < 8:
        raise ValueError(f"--tokens {tokens}: must be a multiple of {batch} x {SEQ_LEN} and give >= 8 steps")
    return {"micro_batch": micro, "grad_accum": per_rank // micro, "steps": steps,
            "eval_batches": max(RANKS, 128 // micro),  # the same 128 validation sequences at every batch
            "warmup_steps": max(1, steps // 20), "eval_every": max(1, steps // 4), "save_every": steps,
            "log_every": max(1, steps // 40)}


def best_p(losses: dict[float, list[float]]) -> tuple[float, list[float]]:
    """The p of the lowest mean loss, and each seed's own best p."""
    best = min(losses, key=lambda p: statistics.fmean(losses[p]))
    seeds = len(next(iter(losses.values())))
    return best, [min(losses, key=lambda p: losses[p][s]) for s in range(seeds)]


def run_batch(args, batch: int) -> dict:
    """The compare over the powers at `batch` and the noise-measuring one; the losses per p and the noise scale."""
    flags = layout(batch, args.tokens)

    def run(optimizers: list[str], out: str, *extra: str) -> dict:
        return compare.main(["--optimizers", *optimizers, "--seeds", *map(str, args.seeds), "--out",
                             str(Path(args.out) / out), "--nproc", str(RANKS), "--", "--config",
                             str(ROOT / "configs" / "quickstart.json"), "--precision", "fp32",
                             *(f"--{k}={v}" for k, v in flags.items()), *extra])

    table = run([f"adampower:{p:g}" for p in args.powers], f"batch{batch}")
    losses = {p: table[compare.variant_label("adampower", p, False)]["val_losses"] for p in args.powers}
    measured = run(["adampower:1"], f"batch{batch}-noise", "--noise_every=1")
    runs = Path(args.out) / f"batch{batch}-noise" / compare.variant_label("adampower", 1.0, False)
    noise = [json.loads((runs / f"seed{seed}" / "summary.json").read_text())["noise_scale"] for seed in args.seeds]
    best, per_seed = best_p(losses)
    return {"batch_sequences": batch, "batch_tokens": batch * SEQ_LEN, **flags, "losses": {f"{p:g}": v for p, v in
            losses.items()}, "noise_scale": measured[compare.variant_label("adampower", 1.0, False)]["noise_scale"],
            "noise_scale_per_seed": noise, "best_p": best, "best_p_per_seed": per_seed}


def markdown(rows: list[dict], powers: list[float]) -> str:
    head = "| batch (seq / tokens) | steps | " + " | ".join(f"p = {p:g}" for p in powers) + \
        " | best p (per seed) | noise scale B_simple (tokens) | batch / B_simple |"
    lines = [head, "|" + "---|" * (len(powers) + 5)]
    for row in rows:
        cells = [f"{statistics.fmean(v):.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"
                 for v in row["losses"].values()]
        noise, seeds = row["noise_scale"], ", ".join(f"{n:,.0f}" for n in row["noise_scale_per_seed"] if n)
        lines.append(f"| {row['batch_sequences']} / {row['batch_tokens']:,} | {row['steps']} | " + " | ".join(cells)
                     + f" | {row['best_p']:g} ({', '.join(f'{p:g}' for p in row['best_p_per_seed'])}) | "
                     + (f"{noise:,.0f} ({seeds}) | {row['batch_tokens'] / noise:.3g} |" if noise else "- | - |"))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ps = [float(p) for p in row["losses"]]
        means = [statistics.fmean(v) for v in row["losses"].values()]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in row["losses"].values()]
        noise = f", B_simple {row['noise_scale']:,.0f}" if row["noise_scale"] else ""
        ax.errorbar(ps, means, yerr=stds, marker="o", capsize=3,
                    label=f"batch {row['batch_tokens']:,} tokens{noise}")
    ax.set_xlabel("p (AdamPower)")
    ax.set_ylabel("final validation loss (nats/byte)")
    ax.set_title("best p vs batch, equal tokens (quickstart MoE, fp32, mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--powers", nargs="+", type=float, default=[0.8, 1.0, 1.2, 1.5])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32, 128], help="global batches, in sequences")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tokens", type=int, default=655_360, help="training tokens per run (all batches)")
    parser.add_argument("--out", default="runs/p_vs_batch")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "p-vs-batch.png"))
    parser.add_argument("--relation", default=str(RELATION))
    args = parser.parse_args()
    rows = [run_batch(args, batch) for batch in args.batches]
    Path(args.relation).write_text(json.dumps({"study": "benchmarks/p_vs_batch.py", "tokens": args.tokens,
                                               "seq_len": SEQ_LEN, "ranks": RANKS, "powers": args.powers,
                                               "seeds": args.seeds, "rows": rows}, indent=1) + "\n")
    plot(rows, Path(args.plot))
    print(markdown(rows, args.powers))


if __name__ == "__main__":
    main()
