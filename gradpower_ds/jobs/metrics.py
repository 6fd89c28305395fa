"""Where a run's numbers go: a CSV (the record), TensorBoard (to watch), and PNG loss curves.

One CSV row per logged step: ``step, tokens, train_loss, val_loss, lr, tokens_per_s,
elapsed_s`` (val_loss empty between evaluations) and, on the steps where the gradient noise was
measured, ``gradpower_ds.noise.NOISE_FIELDS`` (empty on the others). On resume the rows after the
checkpoint's step are dropped, so the resumed run's curve continues the
checkpointed one instead of repeating steps; so are the TensorBoard events after
it (the event files are rewritten without them, so every viewer shows each step
once, whether or not it purges orphaned data itself).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from .files import atomic_open
from ..noise import NOISE_FIELDS

FIELDS = ("step", "tokens", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s", *NOISE_FIELDS)


class MetricsLog:
    """Appends metric rows to ``run_dir/metrics.csv`` and, if asked, to TensorBoard (``run_dir/tensorboard``)."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.csv"
        rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step else []
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows({k: _cell(r[k]) for k in FIELDS} for r in rows)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            directory = Path(run_dir) / "tensorboard"
            old_files = sorted(directory.glob("events.out.tfevents.*"))
            self.writer = SummaryWriter(str(directory))
            if old_files:
                _copy_events_through(old_files, resume_step, self.writer)

    def log(self, **row) -> None:
        """Writes one row (keys from FIELDS; missing ones empty) and its scalars to TensorBoard."""
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow({k: _cell(row.get(k)) for k in FIELDS})
        if self.writer is not None:
            for key in ("train_loss", "val_loss", "lr", "tokens_per_s", *NOISE_FIELDS):
                if row.get(key) is not None:
                    self.writer.add_scalar(key, row[key], row["step"])
            self.writer.flush()

    def close(self) -> None:
        """Flushes and closes TensorBoard."""
        if self.writer is not None:
            self.writer.close()


def _copy_events_through(files: list[Path], last_step: int, writer) -> None:
    """Copies the summaries of step <= `last_step` from the event `files` into `writer`'s new file (wall
    times kept), then deletes `files`: a run killed after its last checkpoint leaves no steps that the
    resumed run logs again."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    file_writer = writer._get_file_writer()
    for path in files:
        try:
            for event in LegacyEventFileLoader(str(path)).Load():
                if event.HasField("summary") and event.step <= last_step:
                    file_writer.add_event(event)
        except Exception:  # a file cut short by the kill: keep what was read
            pass
    writer.flush()
    for path in files:
        path.unlink(missing_ok=True)


def _cell(value):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.csv as dicts of numbers (None where empty); [] if the file does not exist."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [{k: int(float(v)) if k in ("step", "tokens") else float(v) if v else None for k, v in row.items()}
                for row in csv.DictReader(f)]


def plot_curves(series: dict[str, list[dict]], path: str | Path, title: str = "") -> None:
    """Writes a PNG with train (thin) and validation (markers) loss against step, one colour per label.

    `series` maps a label to rows as read_metrics returns them, or to aggregated rows
    with ``val_loss_std``/``train_loss_std`` (drawn as a band of ± one standard deviation).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (label, rows) in enumerate(series.items()):
        color = f"C{i % 10}"
        for key, style in (("train_loss", dict(lw=1, alpha=0.6)), ("val_loss", dict(lw=2, marker="o", ms=3))):
            points = [(r["step"], r[key], r.get(f"{key}_std")) for r in rows if r.get(key) is not None]
            if not points:
                continue
            steps, values, stds = zip(*points)
            ax.plot(steps, values, color=color, label=f"{label} ({key.split('_')[0]})", **style)
            if all(s is not None for s in stds):
                ax.fill_between(steps, [v - s for v, s in zip(values, stds)], [v + s for v, s in zip(values, stds)],
                                color=color, alpha=0.15, lw=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
