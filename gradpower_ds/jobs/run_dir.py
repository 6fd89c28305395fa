"""A training run's folder as both training jobs keep it: status, metrics, loss curve, summary, the end line.

The DeepSpeed main job (``gradpower_ds.jobs.train``) keeps it in its ``--run_dir`` (beside ``config.json``
and ``checkpoints/``), the Megatron MoE job (``gradpower_ds.jobs.train_megatron``) in its ``--save``
folder (beside its ``iter_NNNNNNN`` checkpoints). ``RunDir`` writes, on rank 0 only (a failure file: on every
rank that fails), each file whole (``gradpower_ds.jobs.files``):

- ``status.json``: ``{"state": "running", "step": N}`` from the start and after each logged or saved
  step; ``{"state": "failed", "step": N, "error": "Type: message", "rank": R, "failed_ranks": K}`` (below);
  ``{"state": "stopped", "step": N, "signal": "SIGTERM"}`` after a stop by a signal (``StopRequest``),
  ``{"state": "stopped", "step": N}`` after a stop where the run was asked to stop; ``{"state": "complete",
  "step": N}``. It always takes STATUS_RESERVE bytes (the JSON, then spaces): where the disk is full and its
  atomic rewrite fails (ENOSPC, EDQUOT), it is overwritten in place (``files.overwrite_json_in_place``), so a
  run that fails on a full disk still says ``failed``;
- ``failures/rank{R}.json``: written by every rank that fails, before it re-raises its error (so it is on disk
  before its death breaks the other ranks' collectives): ``{"rank", "host", "pid", "time", "step", "error"}``.
  Rank 0's status.json ``failed`` names the earliest failure it sees there (its own, or the other rank's whose
  death made rank 0's collective fail), its ``rank`` and how many ranks failed (``failed_ranks``); when its own
  error looks like a broken collective it waits up to FAILURE_WAIT_S for another rank's file. Where nodes do not
  share the run folder, rank 0 sees only its own node's files (the others keep theirs on their node): then it
  records the earliest failure on its node. A run that starts or resumes deletes earlier runs' failure files;
- ``metrics.csv`` and ``tensorboard/`` (``gradpower_ds.jobs.metrics.MetricsLog``), each row with the tokens
  per second of the training time so far (the jobs' checkpoints carry tokens and training seconds, so
  a resumed run's figures continue the interrupted one's);
- at completion only, ``loss.png`` and ``summary.json`` (``SUMMARY_KEYS``, the same in both jobs); a
  run that starts or resumes deletes an earlier ``summary.json``.

``summary_line`` is the one line both jobs end with. SIGTERM or SIGINT during training is recorded by
``StopRequest``; the jobs then finish the step on all ranks, save a checkpoint, mark the run stopped and
exit with 128 + the signal number (143, 130).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path

import torch

from .files import is_disk_full, overwrite_json_in_place, write_json
from .metrics import MetricsLog, plot_curves, read_metrics

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SUMMARY_KEYS = ("val_loss", "steps", "resumed_at", "tokens", "train_seconds", "tokens_per_s", "world_size", "run_dir",
                "optimizer", "gpas", "noise_scale")
STATUS_RESERVE = 4096  # bytes status.json always takes, so that it can be rewritten in place on a full disk
FAILURE_WAIT_S = 2.0  # how long rank 0, failing in a collective, waits for the failure file of the rank that broke it
# failure files older than this before the RunDir was made are an earlier run's (the ranks make theirs right after
# the same collectives, within milliseconds; a rank on another node may have its clock a little off)
CLOCK_SLACK_S = 1.0
# what the errors of a collective broken by another rank's death say (gloo, NCCL, the TCP store)
_COLLECTIVE_ERROR = re.compile(r"gloo|nccl|connection|peer|broken pipe|timed out|timeout|socket|process ?group",
                               re.IGNORECASE)
_log = logging.getLogger(__name__)


class RunDirError(ValueError):
    """The run folder cannot be used as asked; raised before anything is written."""


def read_json(path: str | Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing or not JSON (e.g. a folder of another program)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_state(run_dir: str | Path) -> str:
    """The state in the folder's status.json ("running", "failed", "stopped", "complete"), or "unknown"."""
    status = read_json(Path(run_dir) / "status.json")
    return status.get("state", "unknown") if isinstance(status, dict) else "unknown"


class StopRequest:
    """Records SIGTERM/SIGINT during training instead of dying: the loop finishes its step, saves and stops.

    A second SIGINT raises KeyboardInterrupt (stop now, no checkpoint). Every rank reduces ``flags()``
    (a sum) after each step, so all ranks stop after the same step whichever of them got the signal.
    """

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def install(self) -> None:
        """Handles STOP_SIGNALS from now on (in the main thread only; elsewhere the signals are left alone)."""
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the signals alone
                return

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def restore(self) -> None:
        """Puts back the handlers install() replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def flags(self, device) -> torch.Tensor:
        """float32 [this rank got STOP_SIGNALS[0], ... [1]] (1 or 0) on `device`, to all-reduce (sum) over all ranks."""
        return torch.tensor([float(self.signum == s) for s in STOP_SIGNALS], device=device)

    @staticmethod
    def agreed(reduced_flags) -> int:
        """The signal that stops the run, from the all-reduced flags (SIGTERM before SIGINT), or 0."""
        counts = reduced_flags.tolist() if isinstance(reduced_flags, torch.Tensor) else list(reduced_flags)
        return next((int(s) for s, n in zip(STOP_SIGNALS, counts) if n), 0)


def tokens_per_s(tokens: int, seconds: float) -> float | None:
    """Training throughput; None before any training time was measured."""
    return tokens / seconds if seconds else None


def make_summary(*, val_loss: float | None, steps: int, resumed_at: int, tokens: int, train_seconds: float,
                 world_size: int, run_dir: str | Path | None, optimizer: str, gpas: bool,
                 noise_scale: float | None = None) -> dict:
    """summary.json of a completed run (SUMMARY_KEYS, in both jobs): the last validation loss, the run's steps,
    the step this part of it resumed at (0: not resumed), tokens and training seconds over the whole run (all
    parts), tokens/s, ranks, the run folder (None: none), the optimizer and GPAS settings, and the run's gradient
    noise scale in tokens (``gradpower_ds.noise.NoiseMonitor.run_value``; None: not measured)."""
    return {"val_loss": val_loss, "steps": steps, "resumed_at": resumed_at, "tokens": tokens,
            "train_seconds": train_seconds, "tokens_per_s": tokens_per_s(tokens, train_seconds),
            "world_size": world_size, "run_dir": None if run_dir is None else str(run_dir), "optimizer": optimizer,
            "gpas": gpas, "noise_scale": noise_scale}


def summary_line(job: str, summary: dict) -> str:
    """The one line a run of `job` ends with: validation loss, throughput, wall time, where the results are."""
    val_loss = "-" if summary["val_loss"] is None else f"{summary['val_loss']:.4f}"
    rate = "-" if summary["tokens_per_s"] is None else f"{summary['tokens_per_s']:,.0f}"
    where = f"{summary['run_dir']}/ (metrics.csv, loss.png, tensorboard/)" if summary["run_dir"] is not None \
        else "no run folder"
    noise = "" if summary.get("noise_scale") is None else \
        f" | gradient noise scale B_simple {summary['noise_scale']:,.0f} tokens"
    return (f"{job}: done | validation loss {val_loss} | {summary['tokens']:,} tokens in "
            f"{summary['train_seconds']:.1f} s = {rate} tokens/s on {summary['world_size']} ranks | {where}{noise}")


def error_text(error: BaseException) -> str:
    """How status.json and the failure files name an error: "Type: message"."""
    return f"{type(error).__name__}: {error}"


def is_collective_error(error: BaseException) -> bool:
    """Whether `error` looks like a collective or connection that failed (often because another rank died)."""
    return isinstance(error, getattr(torch.distributed, "DistError", ())) or bool(_COLLECTIVE_ERROR.search(str(error)))


class RunDir:
    """The run folder `path` as rank 0 writes it (`writer`); other ranks (writer=False) write only their failure
    file (``failed``); without a folder (path None) every method does nothing. `rank` is this process's global
    rank, named in its failure file."""

    def __init__(self, path: str | Path | None, writer: bool = True, rank: int = 0):
        self.path = None if path is None else Path(path)
        self.writer = writer and self.path is not None
        self.rank = rank
        self.began = time.time()
        self.metrics: MetricsLog | None = None

    def start(self, step: int, config: dict | None = None, tensorboard: bool = True) -> None:
        """A run starts, or resumes, at `step`: creates the folder, deletes an old summary.json, writes
        config.json (if given) and status running, and opens the metrics (rows after `step` dropped)."""
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "summary.json").unlink(missing_ok=True)
        for failure in self._failure_files():
            if failure["time"] < self.began - CLOCK_SLACK_S:  # an earlier run's; keep this run's
                failure["file"].unlink(missing_ok=True)
        if config is not None:
            write_json(self.path / "config.json", config)
        self.running(step)
        self.metrics = MetricsLog(self.path, resume_step=step, tensorboard=tensorboard)

    def log(self, *, step: int, tokens: int, train_loss: float, val_loss: float | None, lr: float,
            elapsed: float, **noise) -> None:
        """One metrics row (and TensorBoard scalars) with tokens/s over the `elapsed` training seconds and the
        noise fields of a measured step (``NoiseMonitor.end_step``)."""
        if self.metrics is not None:
            self.metrics.log(step=step, tokens=tokens, train_loss=train_loss, val_loss=val_loss, lr=lr,
                             tokens_per_s=tokens_per_s(tokens, elapsed), elapsed_s=elapsed, **noise)

    def running(self, step: int) -> None:
        """status.json: running, `step` steps done."""
        self._status(state="running", step=step)

    def failed(self, step: int | None, error: BaseException) -> None:
        """This rank failed after `step` steps (None: the step status.json has, for a failure before training)
        with `error`: writes failures/rank{R}.json, then on rank 0 status.json failed with the earliest failure
        seen (module docstring). Call it before re-raising `error`. Never raises: a file it cannot write is
        logged, and the run's own error goes on."""
        if self.path is None:
            return
        if step is None:
            status = read_json(self.path / "status.json")
            step = status.get("step", 0) if isinstance(status, dict) else 0
        own = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
               "step": step, "error": error_text(error)}
        try:
            (self.path / "failures").mkdir(parents=True, exist_ok=True)
            write_json(self.path / "failures" / f"rank{self.rank}.json", own)
        except OSError as write_error:
            _log.warning("%s: cannot record rank %d's failure: %s", self.path, self.rank, error_text(write_error))
            if is_disk_full(write_error):  # say so: e.g. torch.save on a full disk says only "unexpected pos ..."
                own["error"] += f" [{self.path} is full: {write_error.strerror}]"
        if not self.writer:
            return
        failures = self._failures_of_this_run(wait=FAILURE_WAIT_S if is_collective_error(error) else 0.0)
        failures[self.rank] = own  # also where its file could not be written
        first = min(failures.values(), key=lambda failure: failure["time"])
        try:
            self._status(state="failed", step=step, error=first["error"], rank=first["rank"],
                         failed_ranks=len(failures))
        except OSError as write_error:
            _log.warning("%s: cannot mark the run failed (%s): %s", self.path, own["error"], error_text(write_error))

    def stopped(self, step: int, signum: int = 0) -> None:
        """status.json: stopped after `step` steps, by signal `signum` (0: where the run was asked to stop)."""
        self._status(state="stopped", step=step, **({"signal": signal.Signals(signum).name} if signum else {}))

    def complete(self, summary: dict, label: str) -> None:
        """The run completed: loss.png (the metrics as `label`), summary.json and status complete."""
        if not self.writer:
            return
        plot_curves({label: read_metrics(self.path / "metrics.csv")}, self.path / "loss.png", title=str(self.path))
        write_json(self.path / "summary.json", summary)
        self._status(state="complete", step=summary["steps"])

    def close(self) -> None:
        """Closes the metrics (TensorBoard); the files stay."""
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _failure_files(self) -> list[dict]:
        """The failure files in failures/, each read with its path under "file" (an unreadable one: time 0)."""
        found = []
        for file in sorted((self.path / "failures").glob("rank*.json")):
            failure = read_json(file)
            if not (isinstance(failure, dict) and isinstance(failure.get("time"), (int, float))):
                failure = {"time": 0.0}
            found.append(dict(failure, file=file))
        return found

    def _failures_of_this_run(self, wait: float) -> dict[int, dict]:
        """{rank: failure} of this run's failure files; with `wait` > 0, polls up to `wait` seconds until one of
        another rank is there."""
        deadline = time.monotonic() + wait
        while True:
            failures = {f["rank"]: {k: v for k, v in f.items() if k != "file"} for f in self._failure_files()
                        if f["time"] >= self.began - CLOCK_SLACK_S and isinstance(f.get("rank"), int)}
            if set(failures) - {self.rank} or time.monotonic() >= deadline:
                return failures
            time.sleep(0.05)

    def _status(self, **status) -> None:
        """Writes status.json, padded to STATUS_RESERVE bytes (an "error" too long for that is cut short); where
        the disk is full it overwrites the existing file in place instead."""
        if not self.writer:
            return
        status = _fitted(status, STATUS_RESERVE)
        path = self.path / "status.json"
        try:
            write_json(path, status, STATUS_RESERVE)
        except OSError as error:
            if not is_disk_full(error):
                raise
            try:
                overwrite_json_in_place(path, status, STATUS_RESERVE)
            except OSError:
                raise error
            _log.warning("%s: disk full (%s): status.json rewritten in place", path, error_text(error))


def _fitted(status: dict, size: int) -> dict:
    """`status` with its "error" cut short (ending in "...") where its JSON would not fit in `size` bytes."""
    while len(json.dumps(status, indent=2)) + 1 > size and len(status.get("error", "")) > 3:
        excess = len(json.dumps(status, indent=2)) + 1 - size
        status = dict(status, error=status["error"][:max(0, len(status["error"]) - excess - 3)] + "...")
    return status
