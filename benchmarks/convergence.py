"""Small-scale check of the papers' claims on this machine, at several seeds (results: docs/RESULTS.md).

Seven studies on the quickstart's MoE model and corpus (configs/quickstart.json), each
through the compare tool (so finished runs are reused when it is rerun):

  moe-wsd     AdamW vs AdamPower p=1.2, warmup-stable-decay
  moe-cosine  AdamW vs AdamPower p=1.2, cosine
  gpas        Pre-LN vs Pre-LN + GPAS, both AdamPower p=1.2, WSD (the Pre-LN runs are moe-wsd's)
  muon        DeepSpeed's Muon vs MuonPower p = 0.9, 1.0, 1.2 before Muon's momentum, WSD, without
              gradient clipping (MuonPower's auxiliary Adam is AdamPower at the quickstart's power 1.2, so
              p = 1.0 isolates that)
  blockwise   AdamW and AdamPower p=1.2, each without and with blockwise learning rates, WSD (the
              runs without are moe-wsd's)
  blockwise-lr1e-3, blockwise-lr3e-4  the same at lr 1e-3 and 3e-4 (the quickstart's is 3e-3; the
              multipliers take the embedding to 10x the lr)

It prints one markdown table per study (final validation loss, mean ± std over seeds,
the difference to the first row, per-seed values, tokens/s) and writes each study's
loss-curve plot to --plots.

    python benchmarks/convergence.py                              # 3 seeds, ~15 runs of ~100 s on 2 cores
    python benchmarks/convergence.py --seeds 0 1 2 3 4 -- --steps 600
    python benchmarks/convergence.py --studies muon              # one study
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from gradpower_ds.jobs import compare

ROOT = Path(__file__).resolve().parents[1]
STUDIES = [  # (id, title, schedule, optimizers, compare's variant options, training flags of the study's own);
    # runs go to OUT/<schedule>, or OUT/<id> for a study whose flags change what its runs share with others
    ("moe-wsd", "AdamPower vs AdamW — MoE, WSD schedule", "wsd", ["adamw", "adampower:1.2"], [], []),
    ("moe-cosine", "AdamPower vs AdamW — MoE, cosine schedule", "cosine", ["adamw", "adampower:1.2"], [], []),
    ("gpas", "GPAS vs Pre-LN — MoE, AdamPower p=1.2, WSD", "wsd", ["adampower:1.2"], ["--gpas", "off", "on"], []),
    # DeepSpeed's clipping would clip Muon's orthogonalised update (gradpower_ds.deepspeed.muon_power.CLIPPING_WARNING)
    ("muon", "MuonPower vs Muon — MoE, WSD, no clipping", "wsd",
     ["muon", "muonpower:0.9", "muonpower:1.0", "muonpower:1.2"], [], ["--grad_clip", "0"]),
    ("blockwise", "Blockwise learning rates with AdamW and AdamPower — MoE, WSD", "wsd", ["adamw", "adampower:1.2"],
     ["--blockwise_lr", "off", "on"], []),
    *((f"blockwise-lr{lr}", f"Blockwise learning rates at lr {lr} — MoE, WSD", "wsd", ["adamw", "adampower:1.2"],
       ["--blockwise_lr", "off", "on"], ["--lr", lr]) for lr in ("1e-3", "3e-4")),
]
OWN_FOLDER = {"blockwise-lr1e-3", "blockwise-lr3e-4"}  # their flags change what runs of the same labels share


def markdown_table(table: dict) -> str:
    """Rows of one study; Δ is against the first row."""
    first = next(iter(table.values()))["val_loss_mean"]
    lines = ["| variant | final val loss (mean ± std) | Δ vs first row | per seed | tokens/s |", "|---|---|---|---|---|"]
    for label, row in table.items():
        seeds = ", ".join(f"{v:.4f}" for v in row["val_losses"])
        lines.append(f"| {label} | {row['val_loss_mean']:.4f} ± {row['val_loss_std']:.4f} | "
                     f"{row['val_loss_mean'] - first:+.4f} | {seeds} | {row['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    """Runs (or reuses) every study and prints the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="runs/convergence")
    parser.add_argument("--plots", default=str(ROOT / "docs"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--studies", nargs="+", choices=[s[0] for s in STUDIES], default=[s[0] for s in STUDIES])
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: extra gradpower_ds.jobs.train flags")
    args = parser.parse_args()
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    report = []
    for study, title, schedule, optimizers, options, flags in STUDIES:
        if study not in args.studies:
            continue
        out = Path(args.out) / (study if study in OWN_FOLDER else schedule)
        table = compare.main(["--optimizers", *optimizers, *options, "--seeds", *map(str, args.seeds),
                              "--out", str(out), "--nproc", str(args.nproc), "--",
                              "--config", str(ROOT / "configs" / "quickstart.json"), "--schedule", schedule, *flags,
                              *extra])
        plot = Path(args.plots) / f"convergence-{study}.png"
        plot.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "compare.png", plot)
        report.append(f"### {title}\n\n{markdown_table(table)}\n\n![{study}]({plot.name})\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
