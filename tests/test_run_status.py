"""status.json tells the truth about a failed run (issue 35, items 6a, 6b).

- The first failure, not a follow-on one: every rank that fails writes run_dir/failures/rank{R}.json before it
  re-raises; rank 0's status.json names the earliest failure it sees (e.g. rank 1's damaged checkpoint shard,
  not the "Connection closed by peer" that rank 1's death then gave rank 0), its rank and how many ranks failed.
- A full disk: status.json always takes STATUS_RESERVE bytes, and where its atomic rewrite fails with ENOSPC it
  is overwritten in place, so a run that filled its disk still says "failed".
Unit tests of gradpower_ds.jobs.run_dir / files, then launched runs of the main job (`slow`).
"""

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from gradpower_ds.jobs import run_dir as run_dir_module
from gradpower_ds.jobs.files import json_bytes, overwrite_json_in_place, write_json
from gradpower_ds.jobs.run_dir import CLOCK_SLACK_S, STATUS_RESERVE, RunDir, is_collective_error, read_json
from test_train import deepspeed_train

GLOO_ERROR = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                          "[127.0.0.1]:4321")


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


# ---- the first failure ------------------------------------------------------------------------------------------

def test_rank0_records_the_earliest_failure_of_any_rank(tmp_path):
    """Rank 1 fails first (its file, no status.json); rank 0's follow-on collective error then marks the run
    failed with rank 1's error, rank 1, 2 ranks failed; both failure files say who, where and when."""
    rank0, rank1 = RunDir(tmp_path, writer=True, rank=0), RunDir(tmp_path, writer=False, rank=1)
    rank0.start(0, tensorboard=False)
    rank1.failed(3, OSError("checkpoint shard truncated"))
    assert status(tmp_path) == {"state": "running", "step": 0}  # rank 1 never writes status.json
    rank0.failed(3, GLOO_ERROR)
    assert status(tmp_path) == {"state": "failed", "step": 3, "error": "OSError: checkpoint shard truncated",
                                "rank": 1, "failed_ranks": 2}
    first, second = (read_json(tmp_path / "failures" / f"rank{r}.json") for r in (0, 1))
    assert set(first) == set(second) == {"rank", "host", "pid", "time", "step", "error"}
    assert (second["rank"], second["pid"], second["step"]) == (1, os.getpid(), 3) and second["host"]
    assert first["error"] == f"RuntimeError: {GLOO_ERROR}" and first["time"] >= second["time"]


def test_rank0_own_error_first_and_no_wait_for_others(tmp_path):
    """Rank 0 failing on its own (not a collective) records its error at once; failed(None) keeps the step
    status.json had (a failure before training, e.g. while loading the checkpoint of a run stopped at step 4)."""
    run = RunDir(tmp_path)
    run.start(4, tensorboard=False)
    began = time.monotonic()
    run.failed(None, ValueError("bad batch"))
    assert time.monotonic() - began < run_dir_module.FAILURE_WAIT_S  # did not wait for other ranks' files
    assert status(tmp_path) == {"state": "failed", "step": 4, "error": "ValueError: bad batch", "rank": 0,
                                "failed_ranks": 1}


def test_collective_error_waits_for_the_rank_that_broke_it(tmp_path, monkeypatch):
    """Rank 0's collective error arrives before rank 1's file of its earlier failure shows (e.g. on a slow shared
    filesystem): rank 0 polls for it. Time is the test's: time.sleep makes rank 1's file show on the first poll."""
    run = RunDir(tmp_path)
    run.start(2, tensorboard=False)
    naps = []

    def nap(seconds):
        if not naps:
            write_json(tmp_path / "failures" / "rank1.json", {"rank": 1, "host": "h1", "pid": 7, "step": 2,
                                                              "time": run.began, "error": "MemoryError: out of memory"})
        naps.append(seconds)

    monkeypatch.setattr(run_dir_module.time, "sleep", nap)
    run.failed(2, GLOO_ERROR)
    assert len(naps) == 1
    assert status(tmp_path)["error"] == "MemoryError: out of memory" and status(tmp_path)["rank"] == 1


def test_collective_errors_are_recognised():
    import torch.distributed as dist

    assert is_collective_error(GLOO_ERROR)
    assert is_collective_error(RuntimeError("NCCL communicator was aborted on rank 0"))
    assert is_collective_error(dist.DistBackendError("anything"))
    assert not is_collective_error(ValueError("steps='5' must be an integer"))


def test_a_new_run_part_deletes_earlier_failures_only(tmp_path):
    """start() deletes the failure files of earlier runs (and unreadable ones) but keeps one a rank of this run
    wrote already; rank 0 ignores an earlier run's file that start() has not deleted yet."""
    (tmp_path / "failures").mkdir()
    old = {"rank": 1, "host": "h", "pid": 1, "time": time.time() - 10 * CLOCK_SLACK_S - 60, "step": 2,
           "error": "OSError: an earlier run's"}
    (tmp_path / "failures" / "rank1.json").write_text(json.dumps(old))
    (tmp_path / "failures" / "rank2.json").write_text("{half")
    run = RunDir(tmp_path)
    run.failed(None, ValueError("bad"))  # before start(): the earlier run's rank 1 is not this failure
    assert status(tmp_path)["rank"] == 0 and status(tmp_path)["failed_ranks"] == 1
    RunDir(tmp_path, writer=False, rank=3).failed(0, OSError("this run's"))
    RunDir(tmp_path).start(0, tensorboard=False)
    assert sorted(p.name for p in (tmp_path / "failures").iterdir()) == ["rank0.json", "rank3.json"]


# ---- a full disk ----------------------------------------------------------------------------------------------------

def test_status_takes_its_reserve_and_long_errors_are_cut(tmp_path):
    run = RunDir(tmp_path)
    run.start(0, tensorboard=False)
    assert (tmp_path / "status.json").stat().st_size == STATUS_RESERVE
    run.failed(1, RuntimeError("x" * 10_000 + " ü"))
    assert (tmp_path / "status.json").stat().st_size == STATUS_RESERVE
    error = status(tmp_path)["error"]
    assert error.startswith("RuntimeError: xxx") and error.endswith("x...") and len(error) > STATUS_RESERVE - 200
    assert read_json(tmp_path / "failures" / "rank0.json")["error"].endswith(" ü")  # the failure file has it all


def test_disk_full_rewrites_status_in_place(tmp_path, monkeypatch, caplog):
    """Where write_json fails with ENOSPC (its temp file needs blocks the disk lacks), status.json is overwritten
    in place: same file, same size, the new state; another OSError is raised as it is."""
    run = RunDir(tmp_path)
    run.start(3, tensorboard=False)
    inode = (tmp_path / "status.json").stat().st_ino

    def full(path, value, size=0):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(run_dir_module, "write_json", full)
    run.failed(3, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert status(tmp_path) == {"state": "failed", "step": 3, "error": "OSError: [Errno 28] No space left on device "
                                f"[{tmp_path} is full: No space left on device]", "rank": 0, "failed_ranks": 1}
    assert (tmp_path / "status.json").stat().st_ino == inode
    assert (tmp_path / "status.json").stat().st_size == STATUS_RESERVE
    assert "status.json rewritten in place" in caplog.text and "cannot record rank 0's failure" in caplog.text

    def broken(path, value, size=0):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(run_dir_module, "write_json", broken)
    with pytest.raises(OSError, match="Input/output error"):
        run.running(3)
    run.failed(3, ValueError("x"))  # never raises: the run's own error goes on
    assert status(tmp_path)["state"] == "failed" and "cannot mark the run failed (ValueError: x)" in caplog.text


def test_overwrite_in_place_pads_to_a_larger_file(tmp_path):
    """An older status.json larger than the reserve: the new JSON is padded to its size (no stale bytes)."""
    path = tmp_path / "status.json"
    path.write_bytes(json_bytes({"state": "running", "error": "y" * 5000}))
    size = path.stat().st_size
    overwrite_json_in_place(path, {"state": "failed"}, 64)
    assert path.stat().st_size == size and json.loads(path.read_text()) == {"state": "failed"}


# ---- launched runs of the main job ------------------------------------------------------------------------------

@pytest.mark.slow
def test_rank1_damaged_shard_is_the_recorded_failure(tmp_path):
    """A 2-rank run stopped at step 4, its rank-1 optimizer shard then cut to half (the checkpoint's integrity
    manifest removed, so the damaged file reaches torch.load on rank 1 only): the resume fails, and status.json
    records rank 1's load error, not rank 0's follow-on collective error."""
    run_dir = tmp_path / "run"
    deepspeed_train(run_dir, "--stop_at", "4")
    checkpoint = run_dir / "checkpoints" / "step4"
    (checkpoint / "gradpower_manifest.json").unlink(missing_ok=True)
    shard, = checkpoint.glob("zero_pp_rank_1_*optim_states.pt")
    os.truncate(shard, shard.stat().st_size // 2)
    proc = deepspeed_train(run_dir, "--resume", "true", check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-6000:]
    recorded = status(run_dir)
    rank1 = read_json(run_dir / "failures" / "rank1.json")
    assert rank1 is not None, log[-6000:]
    assert recorded["state"] == "failed" and recorded["step"] == 4 and recorded["rank"] == 1, (recorded, log[-6000:])
    assert recorded["error"] == rank1["error"] and not is_collective_error(RuntimeError(rank1["error"]))
    assert recorded["failed_ranks"] in (1, 2)  # rank 0 too, where its collective failed before the launcher's SIGTERM
    rank0 = read_json(run_dir / "failures" / "rank0.json")
    assert rank0 is None or rank0["time"] > rank1["time"]


def _mount_tmpfs(where: Path, size: int) -> None:
    """Mounts a tmpfs of `size` bytes at `where`, or skips saying why it cannot."""
    where.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a small filesystem to fill")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")


def _bytes_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_run_that_fills_its_disk_is_marked_failed(tmp_path):
    """A 1-rank run on a tmpfs with room for its run files but half its first checkpoint: the checkpoint save
    fills the disk, the run fails, and status.json says failed with that error (rewritten in place)."""
    reference = tmp_path / "reference"
    deepspeed_train(reference, "--stop_at", "4", nproc=1)
    checkpoint = _bytes_of(reference / "checkpoints")
    others = _bytes_of(reference) - checkpoint
    mount = tmp_path / "small"
    _mount_tmpfs(mount, others + 256 * 1024 + checkpoint // 2)
    try:
        assert checkpoint > 2 * 256 * 1024, checkpoint  # the half checkpoint, not the slack, decides where it fails
        proc = deepspeed_train(mount / "run", "--stop_at", "4", nproc=1, check=False)
        log = proc.stdout + proc.stderr
        assert proc.returncode != 0, log[-6000:]
        recorded = status(mount / "run")
        assert (recorded["state"], recorded["step"], recorded["rank"]) == ("failed", 4, 0), (recorded, log[-6000:])
        # torch.save's own error does not say why ("unexpected pos ..."): the failure notes the full disk
        assert recorded["error"].endswith(f"[{mount / 'run'} is full: No space left on device]"), recorded
        assert "status.json rewritten in place" in log
        assert (mount / "run" / "status.json").stat().st_size == STATUS_RESERVE
    finally:
        subprocess.run(["umount", str(mount)], check=True, timeout=60)
