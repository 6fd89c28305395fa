"""Integrity manifests of checkpoint folders: the size and CRC-32 of every file, written last, verified before a load.

DeepSpeed and Megatron write checkpoints without any check of what lands on disk: a shard with a few
bytes changed loads without an error and training continues from the damaged state. A checkpoint
folder (DeepSpeed's ``SAVE_DIR/TAG``, Megatron's ``ROOT/iter_NNNNNNN``) therefore gets MANIFEST, a
JSON object naming each of its files with its size and CRC-32, written atomically after every file
is whole; the folder's pointer (DeepSpeed's ``latest``, Megatron's ``latest_checkpointed_iteration.txt``)
is moved only after the manifest. A load first checks every file against it.

CRC-32 (zlib, in the standard library) because it is the fastest hash Python has (1.5x sha256, 4x md5
on the CPU measured; benchmarks/bench_checkpoint_manifest.py, docs/performance.md), one per 64 MiB
block so that a rank's threads hash a file's blocks in parallel: it finds accidental damage (flipped
bytes, truncation, a file from another save), which is the threat here; it is no defence against a
deliberate forgery.

``write_collectively`` and ``verify_collectively`` split the hashing between the ranks of
torch.distributed (each rank hashes a share of the files, balanced by size) and agree on one
result, so a damaged file is refused on every rank with the same message. ``main`` is
``python -m gradpower_ds verify-checkpoint DIR``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .atomic_write import atomic_open

MANIFEST = "gradpower_manifest.json"
FORMAT = "gradpower_ds.checkpoint_manifest/1"  # files: {name: {"size": bytes, "crc32": [hex per BLOCK]}}
HASH = "crc32"
_CHUNK = 8 << 20  # bytes read at a time: large enough that zlib's C loop dominates, small enough to stay in cache
BLOCK = 64 << 20  # one CRC per block of a file: a file's blocks are hashed in parallel, and an error says where
SHOWN_PROBLEMS = 5  # problems an error lists before "... and N more"


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint folder does not match its manifest (or the manifest is unreadable); `problems` says how, per
    file, and the message ends with what to do (`remedy`)."""

    def __init__(self, folder: str | Path, problems: list[str], remedy: str):
        self.folder, self.problems, self.remedy = Path(folder), list(problems), remedy
        shown = "; ".join(self.problems[:SHOWN_PROBLEMS])
        more = f"; ... and {len(self.problems) - SHOWN_PROBLEMS} more" if len(self.problems) > SHOWN_PROBLEMS else ""
        super().__init__(f"checkpoint {self.folder} is damaged, refusing to load it: {shown}{more}. {remedy}")


def checkpoint_files(folder: str | Path) -> list[str]:
    """The files of a checkpoint folder, as sorted paths relative to it (subfolders included), without the manifest
    and without the temporary files of an atomic write."""
    folder = Path(folder)
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            if name == MANIFEST or (name.startswith(".") and name.endswith(".tmp")):
                continue
            found.append((Path(root) / name).relative_to(folder).as_posix())
    return sorted(found)


def crc32_of(path: str | Path, offset: int = 0, length: int | None = None) -> str:
    """CRC-32 (8 hex digits) of `length` bytes of the file at `path` from `offset` (None: to its end), read in
    chunks into one buffer (zlib and the reads release the GIL, so threads hash in parallel)."""
    crc = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        left = float("inf") if length is None else length
        while left > 0:
            n = f.readinto(view[:int(min(_CHUNK, left))])
            if not n:
                break
            crc = zlib.crc32(view[:n], crc)
            left -= n
    return f"{crc:08x}"


def hash_threads() -> int:
    """Threads each rank hashes with: this machine's cores shared by the ranks on it (LOCAL_WORLD_SIZE), 1 to 8."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(8, (os.cpu_count() or 1) // max(ranks, 1)))


def hash_files(folder: str | Path, names: list[str], threads: int | None = None) -> dict[str, dict]:
    """{name: {"size": bytes, "crc32": [one CRC per BLOCK]}} of the files `names` of `folder`, their blocks hashed
    by `threads` threads (default hash_threads()); an empty file has one block."""
    folder = Path(folder)
    sizes = {name: (folder / name).stat().st_size for name in names}
    blocks = [(name, offset) for name in names for offset in range(0, max(sizes[name], 1), BLOCK)]
    with ThreadPoolExecutor(threads or hash_threads()) as pool:
        crcs = list(pool.map(lambda block: crc32_of(folder / block[0], block[1], BLOCK), blocks))
    entries = {name: {"size": sizes[name], HASH: []} for name in names}
    for (name, _), crc in zip(blocks, crcs):
        entries[name][HASH].append(crc)
    return entries


def file_entry(path: str | Path) -> dict:
    """{"size": bytes, "crc32": [one CRC per BLOCK]} of the file at `path` (hash_files of one file)."""
    path = Path(path)
    return hash_files(path.parent, [path.name])[path.name]


def assign(sizes: dict[str, int], count: int) -> list[list[str]]:
    """`count` shares of the files named by `sizes` (name -> bytes) with about equal bytes each (largest first to the
    lightest share); the same on every rank that has the same listing."""
    shares: list[list[str]] = [[] for _ in range(count)]
    load = [0] * count
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        lightest = load.index(min(load))
        shares[lightest].append(name)
        load[lightest] += sizes[name]
    return shares


def problems_of(folder: Path, files: dict[str, dict], names: list[str]) -> list[str]:
    """What is wrong with the files `names` of `folder` against their manifest entries `files` (one line each)."""
    problems, same_size = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != files[name]["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, its manifest {files[name]['size']} "
                            "(truncated or rewritten)")
        else:
            same_size.append(name)
    for name, entry in hash_files(folder, same_size).items():
        differing = [i for i, (a, b) in enumerate(zip(entry[HASH], files[name][HASH])) if a != b]
        if differing or len(entry[HASH]) != len(files[name][HASH]):
            i = differing[0] if differing else 0
            problems.append(f"{name} differs from its manifest (crc32 {entry[HASH][i]}, manifest {files[name][HASH][i]}"
                            f", in bytes {i * BLOCK:,}-{min((i + 1) * BLOCK, entry['size']):,})")
    return problems


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of `folder` ({file: entry}); None when it has none. An unreadable or malformed manifest raises
    CheckpointIntegrityError (a damaged manifest is a damaged checkpoint)."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise CheckpointIntegrityError(folder, [f"{MANIFEST} is unreadable ({error})"],
                                       "Resume from an earlier checkpoint") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get(HASH), list)
            for e in files.values()):
        raise CheckpointIntegrityError(folder, [f"{MANIFEST} is not a {FORMAT} manifest"],
                                       "Resume from an earlier checkpoint")
    return files


def write_manifest(folder: str | Path, files: dict[str, dict]) -> Path:
    """Writes `folder`/MANIFEST listing `files` ({name: file_entry}) atomically and durably (fsync before the rename);
    returns its path."""
    path = Path(folder) / MANIFEST
    document = {"format": FORMAT, "hash": HASH, "created": time.time(), "files": dict(sorted(files.items()))}
    with atomic_open(path, durable=True) as f:
        f.write((json.dumps(document, indent=1) + "\n").encode())
    return path


def verify(folder: str | Path) -> list[str] | None:
    """The problems of checkpoint `folder` against its manifest, in this one process ([]: intact; None: it has no
    manifest, so it cannot be verified)."""
    folder = Path(folder)
    try:
        files = read_manifest(folder)
    except CheckpointIntegrityError as error:
        return error.problems
    if files is None:
        return None
    return problems_of(folder, files, sorted(files))


def _process_group():
    """(rank, world size, torch.distributed or None) of this process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist
    return 0, 1, None


def _share(sizes: dict[str, int], node_local: bool) -> tuple[list[str], bool]:
    """The files of `sizes` (name -> bytes) this rank hashes, and whether it writes the manifest. On a shared folder
    the ranks split the files (``assign``) and rank 0 writes; with node-local storage each node's folder differs, so
    its LOCAL_RANK 0 hashes all of it and writes (hostnames are no guide: containers may share one)."""
    rank, world, _ = _process_group()
    if node_local:
        writer = int(os.environ.get("LOCAL_RANK", "0")) == 0
        return (sorted(sizes) if writer else []), writer
    return assign(sizes, world)[rank], rank == 0


def _gather(payload) -> list:
    """`payload` of every rank, in rank order (one all_gather_object; [payload] without a process group)."""
    _, world, dist = _process_group()
    if dist is None:
        return [payload]
    gathered = [None] * world
    dist.all_gather_object(gathered, payload)
    return gathered


def write_collectively(folder: str | Path, node_local: bool = False) -> tuple[int, int, float] | None:
    """Every rank: hashes its share of `folder`'s files (``_share``), then rank 0 (with node-local storage the first
    rank of each node) writes the manifest. Call it on all ranks after every rank's files are whole (after a
    barrier). Returns (files, bytes, seconds) on a writer, None elsewhere."""
    began = time.perf_counter()
    folder = Path(folder)
    mine, writer = _share({name: (folder / name).stat().st_size for name in checkpoint_files(folder)}, node_local)
    entries = hash_files(folder, mine)
    gathered = _gather(entries)
    if not writer:
        return None
    files = entries if node_local else {name: entry for part in gathered for name, entry in part.items()}
    write_manifest(folder, files)
    return len(files), sum(e["size"] for e in files.values()), time.perf_counter() - began


def verify_collectively(folder: str | Path, remedy: str, node_local: bool = False) -> bool:
    """Every rank: checks its share of `folder` (``_share``) against the manifest it sees; all ranks then raise the
    same CheckpointIntegrityError (ending with `remedy`) if any rank found a problem. Returns whether every rank's
    view had a manifest (False: saved without one, by DeepSpeed alone or an earlier gradpower_ds: not verified).
    Call it on all ranks."""
    folder = Path(folder)
    try:
        files = read_manifest(folder)
        mine = [] if files is None else _share({n: e["size"] for n, e in files.items()}, node_local)[0]
        problems = problems_of(folder, files, mine)
    except CheckpointIntegrityError as error:
        files, problems = {}, error.problems
    reports = _gather((files is not None, problems))
    found = sorted({p for _, ps in reports for p in ps})
    if found:
        raise CheckpointIntegrityError(folder, found, remedy)
    return all(has for has, _ in reports)


def checkpoint_folders(directory: str | Path) -> list[Path]:
    """The checkpoint folders `directory` stands for: itself when it holds a manifest or no subfolder, else its
    subfolders that hold a manifest or checkpoint files (a DeepSpeed save_dir, a Megatron --save), newest first."""
    directory = Path(directory)
    subfolders = [p for p in directory.iterdir() if p.is_dir()] if directory.is_dir() else []
    if (directory / MANIFEST).exists() or not subfolders:
        return [directory]
    candidates = [p for p in subfolders if (p / MANIFEST).exists() or any(
        f.suffix in (".pt", ".distcp", ".bin", ".safetensors") for f in p.iterdir())]
    return sorted(candidates, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)


def previous_checkpoint(folder: str | Path) -> Path | None:
    """The newest sibling of checkpoint `folder`, older than it, whose manifest reads and whose files have the sizes
    it records (None: none). A quick check, without hashing: the load verifies it in full."""
    folder = Path(folder)
    for candidate in checkpoint_folders(folder.parent):
        if candidate == folder or candidate.stat().st_mtime > folder.stat().st_mtime:
            continue
        try:
            files = read_manifest(candidate)
        except CheckpointIntegrityError:
            continue
        if files and all((candidate / n).is_file() and (candidate / n).stat().st_size == e["size"]
                         for n, e in files.items()):
            return candidate
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m gradpower_ds verify-checkpoint DIR [DIR ...]``: checks each checkpoint folder (or each one in a
    save folder) against its manifest, one line each; exit status 0 when all are intact, 1 when one is damaged,
    3 when none is damaged but some have no manifest."""
    args = sys.argv[1:] if argv is None else argv
    if not args or any(a in ("-h", "--help") for a in args):
        print("usage: python -m gradpower_ds verify-checkpoint DIR [DIR ...]\n\nChecks every file of each checkpoint "
              f"folder (a DeepSpeed save_dir/TAG, a Megatron iter_NNNNNNN, or a folder of them) against its {MANIFEST}"
              ".\nExit status: 0 all intact, 1 one is damaged, 3 some have no manifest (not verifiable).")
        return 0 if args else 2
    worst = 0
    for directory in args:
        if not Path(directory).is_dir():
            print(f"{directory}: not a folder", file=sys.stderr)
            return 2
        for folder in checkpoint_folders(directory):
            began = time.perf_counter()
            problems = verify(folder)
            if problems is None:
                print(f"{folder}: NO MANIFEST (saved without gradpower_ds's manifests; cannot be verified)")
                worst = max(worst, 3) if worst != 1 else 1
            elif problems:
                print(f"{folder}: DAMAGED: " + "; ".join(problems))
                worst = 1
            else:
                files = read_manifest(folder)
                size = sum(e["size"] for e in files.values())
                print(f"{folder}: intact ({len(files)} files, {size / 1e6:,.1f} MB, "
                      f"{time.perf_counter() - began:.2f} s)")
    return worst
