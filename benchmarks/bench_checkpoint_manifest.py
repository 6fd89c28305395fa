"""What the checkpoint integrity manifests (gradpower_ds/checkpoint_manifest.py) cost: hash throughput, and their
share of a checkpoint's save and resume.

Three measurements, in ONE run, on the machine it names (lscpu's model name and the CPU flags hashes use):

  hashes       GB/s of each hash over a --size file (page-cached: read once before), read through the same loop
               as the manifest (8 MiB readinto chunks): zlib.crc32 as the manifest computes it
               (checkpoint_manifest.file_entry itself, the anchor), hashlib's sha256, blake2b, md5 and sha1, and
               xxhash / crc32c when they are importable (nothing is installed); each also as a ratio to crc32
  checkpoint   a --size checkpoint like a ZeRO shard (torch.save of a dict of fp32 tensors, in a temp folder):
               torch.save's time vs the manifest's (file_entry) = "% of save"; torch.load's vs the verification's
               (problems_of: stat + hash + compare) = "% of resume". The file was just written, so it is in the
               page cache: the hash reads memory, not the disk (a resume after a reboot reads the disk for both
               the verification and torch.load)
  main job     ``python -m gradpower_ds train`` (configs/quickstart.json, one process) for a few steps with
               --save_every, then once more with --resume true: its "manifest of N files" log lines; then, in this
               process, the same config's DeepSpeed engine (world of one) loads and saves that checkpoint with
               GRADPOWER_CHECKPOINT_MANIFEST=0 and with manifests, in turns (ABAB), the same-run anchor of
               "% of save" and "% of resume" (skipped with --skip-job)

Every time is the median of --repeats. Lines to grep: ``HASH <name> <GB/s> <ratio to crc32>``,
``CHECKPOINT save ... % of save``, ``CHECKPOINT load ... % of resume``, ``JOB save ...``, ``JOB load ...``.

    python benchmarks/bench_checkpoint_manifest.py             # 1 GB, 3 repeats, the main job: ~2 minutes on 2 cores
    python benchmarks/bench_checkpoint_manifest.py --quick     # 64 MB, 1 repeat, no main job (the test's run)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradpower_ds import checkpoint_manifest  # noqa: E402

HASH_FLAGS = ("sse4_2", "pclmulqdq", "vpclmulqdq", "avx2", "avx512f", "avx512vl", "sha_ni", "aes")  # what hashes use
OPTIONAL = {"xxh3_64": ("xxhash", "xxh3_64"), "crc32c": ("crc32c", None)}  # name: (module, constructor)
JOB_FLAGS = ["--config", str(ROOT / "configs" / "quickstart.json"), "--steps", "6", "--save_every", "2",
             "--warmup_steps", "1", "--eval_every", "1000", "--eval_batches", "1"]  # 2 checkpoints, then a resume
LOG_LINE = re.compile(r"gradpower_ds: checkpoint (\S+): manifest of (\d+) files, ([\d.]+) MB, in ([\d.]+) s")


def cpu_description() -> str:
    """lscpu's model name and which of the CPU flags that hashes use it has (every figure is named with them)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        lscpu = ""
    field = lambda name: next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()  # noqa: E731
                               if line.startswith(name + ":")), "")
    flags = set(field("Flags").split())
    have = [f for f in HASH_FLAGS if f in flags]
    lacks = [f for f in HASH_FLAGS if f not in flags]
    return (f"{field('Model name') or 'unknown CPU'} ({os.cpu_count()} CPUs); flags: {' '.join(have) or 'none'}"
            f"{'; lacks ' + ' '.join(lacks) if lacks else ''}")


def chunked(path: Path, update) -> None:
    """Reads `path` as checkpoint_manifest.crc32_of does (unbuffered readinto of its chunk size) into `update`."""
    buffer = bytearray(checkpoint_manifest._CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            update(view[:n])


def hashers() -> dict:
    """name -> function hashing a file in one thread (crc32: checkpoint_manifest.crc32_of, the others the same loop
    with their update), and crc32xN: the manifest's file_entry, a CRC per block in hash_threads() threads."""
    def hashlib_hash(name):
        def run(path):
            h = hashlib.new(name)
            chunked(path, h.update)
            return h.hexdigest()
        return run

    threads = checkpoint_manifest.hash_threads()
    found = {"crc32": checkpoint_manifest.crc32_of, f"crc32x{threads}": checkpoint_manifest.file_entry,
             **{n: hashlib_hash(n) for n in ("sha256", "blake2b", "md5", "sha1")}}
    for name, (module, constructor) in OPTIONAL.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if constructor:
            def run(path, make=getattr(mod, constructor)):
                h = make()
                chunked(path, h.update)
                return h.hexdigest()
        else:
            def run(path, value=mod.crc32c):
                crc = [0]
                chunked(path, lambda chunk: crc.__setitem__(0, value(chunk, crc[0])))
                return crc[0]
        found[name] = run
    return found


def timed(function, *args) -> float:
    """Seconds `function(*args)` takes."""
    began = time.perf_counter()
    function(*args)
    return time.perf_counter() - began


def bench_hashes(folder: Path, size: int, repeats: int) -> None:
    """HASH lines: each hash's GB/s over a page-cached `size`-byte file, and its ratio to crc32's (same run)."""
    path = folder / "random.bin"
    with open(path, "wb") as f:
        for left in range(size, 0, -(64 << 20)):
            f.write(os.urandom(min(left, 64 << 20)))
    chunked(path, lambda chunk: None)  # into the page cache
    read = statistics.median(timed(chunked, path, lambda chunk: None) for _ in range(repeats))
    functions = hashers()
    seconds = {name: [] for name in functions}
    for _ in range(repeats):  # round-robin, so a slow moment of the machine is shared out
        for name, function in functions.items():
            seconds[name].append(timed(function, path))
    path.unlink()
    print(f"\nhash throughput over a {size / 1e9:.3f} GB file in the page cache, {checkpoint_manifest._CHUNK >> 20} MiB "
          f"chunks, median of {repeats} (reading alone: {size / read / 1e9:.2f} GB/s)")
    anchor = statistics.median(seconds["crc32"])
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"HASH {name:8s} {size / median / 1e9:6.2f} GB/s  {anchor / median:5.2f}x crc32's speed"
              f"{'  (what the manifest uses: checkpoint_manifest.file_entry)' if name.startswith('crc32x') else ''}")
    missing = [m for m, _ in OPTIONAL.values() if importlib.util.find_spec(m) is None]
    if missing:
        print(f"(not importable here, so not measured: {', '.join(missing)})")


def bench_checkpoint(folder: Path, size: int, repeats: int) -> None:
    """CHECKPOINT lines: torch.save / torch.load of a `size`-byte dict of fp32 tensors vs its manifest and check."""
    import torch

    torch.set_num_threads(1)
    per_tensor = 64 << 20  # bytes: a few dozen tensors, like the flat fp32 groups of a ZeRO optimizer shard
    state = {f"group{i}": torch.randn(min(per_tensor, size - i * per_tensor) // 4)
             for i in range(-(-size // per_tensor))}
    path = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    saves, syncs, manifests, loads, checks, written = [], [], [], [], [], 0
    for _ in range(repeats):
        saves.append(timed(torch.save, state, path))
        with open(path, "rb") as f:  # DeepSpeed's save does not fsync; this is when its bytes are on the disk
            syncs.append(timed(os.fsync, f.fileno()))
        began = time.perf_counter()
        entry = checkpoint_manifest.file_entry(path)
        manifests.append(time.perf_counter() - began)
        loads.append(timed(torch.load, path, "cpu"))
        began = time.perf_counter()
        problems = checkpoint_manifest.problems_of(folder, {path.name: entry}, [path.name])
        checks.append(time.perf_counter() - began)
        assert not problems, problems
        written = entry["size"]
        path.unlink()
    save, sync, manifest, load, check = map(statistics.median, (saves, syncs, manifests, loads, checks))
    print(f"\na {written / 1e9:.3f} GB checkpoint (torch.save of "
          f"{len(state)} fp32 tensors), median of {repeats}; the file was just written, so the manifest and the "
          "verification read it from the page cache")
    print(f"CHECKPOINT save {save:.2f} s, manifest {manifest:.2f} s = {100 * manifest / save:.1f} % of save "
          f"(torch.save into the page cache)")
    print(f"CHECKPOINT save+fsync {save + sync:.2f} s, manifest {manifest:.2f} s = "
          f"{100 * manifest / (save + sync):.1f} % of a save that is on the disk")
    print(f"CHECKPOINT load {load:.2f} s, verification {check:.2f} s = {100 * check / load:.1f} % of resume")


def bench_job(folder: Path, repeats: int) -> None:
    """JOB lines: the main job's manifest log lines, then its engine's save/load with and without manifests."""
    run_dir = folder / "run"
    flags = JOB_FLAGS + ["--run_dir", str(run_dir)]
    job = [sys.executable, "-m", "gradpower_ds", "train", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MASTER_PORT", None)
    print(f"\nthe main job: {' '.join(job[1:])} --stop_at 4, then the same with --resume true")
    for extra in (["--stop_at", "4"], ["--resume", "true"]):
        began = time.perf_counter()
        out = subprocess.run(job + extra, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
        if out.returncode:
            raise SystemExit(f"the main job failed:\n{out.stderr[-3000:]}")
        for tag, files, mb, seconds in LOG_LINE.findall(out.stdout + out.stderr):
            print(f"JOB log: checkpoint {tag}: manifest of {files} files, {mb} MB, in {seconds} s")
        print(f"({' '.join(extra)}: {time.perf_counter() - began:.1f} s in all, start-up and data included)")
    engine_save_load(flags, run_dir, repeats)


def engine_save_load(flags: list[str], run_dir: Path, repeats: int) -> None:
    """The main job's engine (its config, world of one) loads the job's newest checkpoint, then saves and loads it
    again with GRADPOWER_CHECKPOINT_MANIFEST=0 and =1 in turns: the manifest's share of save and of resume."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from gradpower_ds.deepspeed import register
    from gradpower_ds.deepspeed.checkpointing import SWITCH
    from gradpower_ds.jobs.data import load_tokenizer
    from gradpower_ds.jobs.processes import default_to_world_of_one
    from gradpower_ds.jobs.train import build_engine
    from gradpower_ds.jobs.train_config import load_config

    cfg = load_config(flags)
    register()
    default_to_world_of_one()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    vocab_size = load_tokenizer(cfg.tokenizer).vocab_size
    engine = build_engine(cfg, vocab_size)
    engine.load_checkpoint(str(run_dir / "checkpoints"))  # the job's newest: the optimizer state a resume has
    target = run_dir / "bench_checkpoints"
    times = {(op, on): [] for op in ("save", "load") for on in (False, True)}
    turns = [(i, on) for i in range(repeats) for on in ((False, True) if i % 2 == 0 else (True, False))]
    for i, on in turns:
        os.environ[SWITCH] = "1" if on else "0"
        times["save", on].append(timed(engine.save_checkpoint, str(target), f"r{i}_{int(on)}"))
    for i, on in turns:  # each load by a fresh engine, as a resume: a second load_checkpoint on one engine fails
        os.environ[SWITCH] = "1" if on else "0"   # in AdamPower's load_state_dict (KeyError 'differentiable')
        fresh = build_engine(cfg, vocab_size)
        times["load", on].append(timed(fresh.load_checkpoint, str(target), f"r{i}_{int(on)}"))
        del fresh
    os.environ.pop(SWITCH)
    tag = f"r{i}_{int(on)}"
    size = sum(p.stat().st_size for p in (target / tag).iterdir())
    files = len(checkpoint_manifest.checkpoint_files(target / tag))
    print(f"the main job's engine (configs/quickstart.json, ZeRO-{cfg.zero_stage}, world of one) saving and loading "
          f"its checkpoint ({files} files, {size / 1e6:.1f} MB), {SWITCH}=0 vs manifests, ABAB, median of {repeats}:")
    for op, what in (("save", "save"), ("load", "resume")):
        off, on = statistics.median(times[op, False]), statistics.median(times[op, True])
        print(f"JOB {op} {off:.3f} s without manifest, {on:.3f} s with: +{on - off:.3f} s = "
              f"{100 * (on - off) / off:.1f} % of {what}")
    torch.distributed.destroy_process_group()


def main() -> None:
    """Parses the flags and runs the measurements (each in a temporary folder under --dir)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=float, default=1.0, help="GB of the hashed file and of the checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-job", action="store_true", help="leave out the main job (DeepSpeed, ~1 minute)")
    parser.add_argument("--quick", action="store_true", help="64 MB, 1 repeat, no main job: a smoke run")
    parser.add_argument("--dir", default=None, help="where the temporary files go (default: the system's temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats, args.skip_job = 0.064, 1, True
    size = int(args.size * 1e9)
    import torch

    print(f"CPU: {cpu_description()}")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, zlib {__import__('zlib').ZLIB_RUNTIME_VERSION}"
          f", {sys.executable} {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_manifest_") as temp:
        bench_hashes(Path(temp), size, args.repeats)
        bench_checkpoint(Path(temp), size, args.repeats)
        if not args.skip_job:
            bench_job(Path(temp), args.repeats)


if __name__ == "__main__":
    main()
