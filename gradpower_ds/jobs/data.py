"""Pretraining data: sources, tokenizers, a fixed document-level train/val split, a disk cache, resumable batches.

Sources: "stdlib" (default: the interpreter's standard-library *.py files, the same corpus on every machine with the
same Python, no download), a text file (its paragraphs are the documents), a directory or glob (each file a document,
*.jsonl files one per line), or a Megatron indexed dataset prefix P (P.bin + P.idx, already token ids). A stable hash
of each document's name puts it in train or val; each split is one EOS-joined token stream cached as a .npy file.
Training windows depend only on (seed, step, micro_step, rank), so a resumed run sees an uninterrupted run's batches.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sysconfig
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .files import atomic_open

SPLIT_SALT = "gradpower-split-v1"  # changing it reshuffles which documents are held out
_CACHE_FORMAT = 1
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_SOURCE_HELP = "give a text file, a directory, a .jsonl file, a Megatron prefix with {0}.bin/{0}.idx, or 'stdlib'"


class ByteTokenizer:
    """The default tokenizer: one token per byte (0..255) plus an end-of-document token 256; needs no files."""

    vocab_size, eos_id, name, identity = 257, 256, "byte", "byte"
    _PIECES = [bytes([i]) for i in range(256)] + [b"<|eos|>"]

    def encode(self, text: bytes | str) -> np.ndarray:
        """The bytes of `text` (str is utf-8 encoded) as uint8 token ids."""
        return np.frombuffer(text.encode() if isinstance(text, str) else text, dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (invalid utf-8 replaced); EOS shows as <|eos|>."""
        return b"".join(self._PIECES[int(i)] for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory (never downloads); documents are separated by its EOS."""

    def __init__(self, path: str):
        root = Path(path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"tokenizer path not found: {path}; give 'byte' or a local Hugging Face "
                                    "tokenizer directory (one written by save_pretrained)")
        from transformers import AutoTokenizer
        try:
            self.hf = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"could not load a Hugging Face tokenizer from {path}: {e}") from e
        if self.hf.eos_token_id is None:
            raise ValueError(f"tokenizer {path} has no eos_token; set tokenizer.eos_token and save it again")
        self.vocab_size, self.eos_id, self.name = len(self.hf), self.hf.eos_token_id, str(root)
        self.identity = f"hf:{root.resolve()}:{_file_stats(sorted(p for p in root.rglob('*') if p.is_file()))}"

    def encode(self, text: bytes | str) -> np.ndarray:
        """Token ids of `text` without added special tokens (bytes are decoded as utf-8, errors replaced)."""
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return np.asarray(self.hf.encode(text, add_special_tokens=False, verbose=False), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (special tokens included)."""
        return self.hf.decode([int(i) for i in ids])


def load_tokenizer(spec: str = "byte") -> ByteTokenizer | HFTokenizer:
    """'byte' for the ByteTokenizer, else the path of a local Hugging Face tokenizer."""
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)


def is_val_document(key: str, val_fraction: float) -> bool:
    """Whether the document named `key` is held out: a stable hash, independent of order, machine and rank count."""
    return zlib.crc32(f"{SPLIT_SALT}:{key}".encode()) < val_fraction * 2**32


def _megatron_indexed():
    """megatron.core.datasets.indexed_dataset, imported without its warnings about Transformer Engine and Apex."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _walk(root: Path, suffix: str = "") -> list[tuple[str, Path]]:
    """(relative posix path, path) of the files under `root` ending in `suffix`, sorted; skips hidden and
    site-packages/dist-packages/__pycache__ directories."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        found += [Path(folder, f) for f in files if f.endswith(suffix) and not f.startswith(".")]
    return sorted((p.relative_to(root).as_posix(), p) for p in found)


def _resolve(source: str) -> tuple[str, list[tuple[str, Path]]]:
    """(kind, [(key, path)]) for a source string: kind 'megatron' (one prefix), 'files' (each file a document,
    key = its relative path) or 'paragraphs' (a single text file, cut into documents at blank lines)."""
    if source == "stdlib":  # minus the files generated at build time (install paths, compiler flags)
        files = _walk(Path(sysconfig.get_paths()["stdlib"]), ".py")
        return "files", [(k, p) for k, p in files if not k.startswith(("_sysconfigdata", "config-"))]
    prefix = source.removesuffix(".bin").removesuffix(".idx")
    if Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file():
        return "megatron", [(prefix, Path(prefix))]
    path = Path(source).expanduser()
    if path.is_dir():
        return "files", _walk(path)
    if path.is_file():
        return "paragraphs", [(path.name, path)]
    matches = sorted(m for m in glob.glob(source, recursive=True) if os.path.isfile(m))
    if not matches:
        raise FileNotFoundError(f"data path not found: {source}; {_SOURCE_HELP.format(source)}")
    return "files", [(m, Path(m)) for m in matches]


def _file_stats(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(absolute path, size, mtime) per file: changes whenever a file is edited, added or removed."""
    return [(str(p.resolve()), (s := p.stat()).st_size, s.st_mtime_ns) for p in paths]


def _jsonl_documents(key: str, path: Path, text_key: str) -> Iterator[tuple[str, str]]:
    """(key:line, text) for every non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number} is not valid JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                raise ValueError(f"{path} line {number} has no string under key {text_key!r}; "
                                 "pass jsonl_key=<the key that holds the text>")
            yield f"{key}:{number}", obj[text_key]


def _indexed_documents(prefix: str, vocab_size: int) -> Iterator[tuple[str, np.ndarray]]:
    """(doc index, token ids) for a Megatron indexed dataset, read with megatron-core; ids must fit the vocab."""
    data = _megatron_indexed().IndexedDataset(prefix, mmap=True)
    if len(data) == 0:
        return
    tokens = np.concatenate(data[0:len(data)])
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"indexed dataset {prefix} has token id {tokens.max()} (min {tokens.min()}) outside the "
                         f"tokenizer's vocab 0..{vocab_size - 1}; pass the tokenizer the data was made with")
    bounds = np.concatenate([[0], np.cumsum(data.sequence_lengths)])[data.document_indices]
    for i in range(len(bounds) - 1):
        yield f"doc{i}", tokens[bounds[i]:bounds[i + 1]]


def _documents(kind: str, items: list[tuple[str, Path]], vocab_size: int, jsonl_key: str) -> Iterator[tuple]:
    """(split key, bytes | str | token ids) for every document of a resolved source."""
    if kind == "megatron":
        yield from _indexed_documents(items[0][0], vocab_size)
        return
    for key, path in items:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(key, path, jsonl_key)
        elif kind == "paragraphs":  # a lone text file: its blank-line separated paragraphs, so it can be split
            yield from ((f"{key}:{i}", text) for i, text in enumerate(re.split(rb"\n\s*\n", path.read_bytes())))
        else:
            yield key, path.read_bytes()


def _build(source: str, kind: str, items: list, tok, val_fraction: float, jsonl_key: str) -> tuple:
    """Tokenizes and splits all documents: (train stream, val stream, #train docs, #val docs); empty docs dropped."""
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for key, doc in _documents(kind, items, tok.vocab_size, jsonl_key):
        ids = doc if isinstance(doc, np.ndarray) else tok.encode(doc)
        if len(ids):  # EOS after each document, unless it has one (Megatron data made with --append-eod)
            ids = ids if ids[-1] == tok.eos_id else np.append(ids, tok.eos_id)
            parts[is_val_document(key, val_fraction)].append(ids.astype(dtype, copy=False))
    n_train, n_val = len(parts[False]), len(parts[True])
    if n_train + n_val == 0:
        raise ValueError(f"data source {source} has no non-empty documents; {_SOURCE_HELP.format(source)}")
    if n_train == 0 or n_val == 0:
        raise ValueError(f"data source {source}: {n_train} train / {n_val} validation documents with "
                         f"val_fraction={val_fraction}; both splits need one (add documents or change val_fraction)")
    return np.concatenate(parts[False]), np.concatenate(parts[True]), n_train, n_val


@dataclass
class Corpus:
    """Train and validation token streams (memory-mapped .npy) plus the batch samplers the trainer calls."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: ByteTokenizer | HFTokenizer
    vocab_size: int  # the number of token ids the model must embed
    eos_id: int  # the end-of-document token after each document
    description: str  # one line: source, documents and tokens per split, tokenizer
    cache_path: Path  # the metadata file; the .npy streams sit next to it

    def train_batch(self, step: int, micro_step: int, rank: int, world_size: int, batch_size: int, seq_len: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) int64 [batch_size, seq_len]: random windows of the train stream, targets shifted by one.

        The windows depend only on (seed, step, micro_step, rank): resuming at a step replays the same batches, and
        every rank draws its own. world_size is only checked against rank."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if len(self.train) < seq_len + 1:
            raise ValueError(f"train stream has {len(self.train)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        rng = np.random.default_rng([seed, step, micro_step, rank])
        starts = rng.integers(0, len(self.train) - seq_len, size=batch_size)
        windows = torch.from_numpy(self.train[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
        return windows[:, :-1], windows[:, 1:]

    def val_batches(self, batch_size: int, seq_len: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Up to max_batches (inputs, targets) batches of disjoint seq_len + 1 windows from the start of the val
        stream: the same held-out text on every rank and every call. The last batch may be smaller."""
        count = min(len(self.val) // (seq_len + 1), max_batches * batch_size)
        if count == 0:
            raise ValueError(f"validation stream has {len(self.val)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                             "raise val_fraction, use more data or a shorter seq_len")
        windows = torch.from_numpy(self.val[:count * (seq_len + 1)].astype(np.int64)).view(count, seq_len + 1)
        return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


def load_corpus(source: str = "stdlib", tokenizer: str = "byte", val_fraction: float = 0.01,
                cache_dir: str | Path | None = None, jsonl_key: str = "text") -> Corpus:
    """The corpus of `source` tokenized with `tokenizer` ('byte' or a local HF tokenizer directory), split into
    train/val by document and cached under cache_dir (default $GRADPOWER_DATA_CACHE or ~/.cache/gradpower_ds/data).

    The cache key covers the files (paths, sizes, mtimes), the tokenizer and the split, so a later call with the
    same inputs loads the .npy files memory-mapped instead of tokenizing again, and an edited file rebuilds."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tok = load_tokenizer(tokenizer)
    kind, items = _resolve(source)
    if not items:
        raise ValueError(f"data source {source} has no files; {_SOURCE_HELP.format(source)}")
    files = [Path(f"{items[0][1]}.bin"), Path(f"{items[0][1]}.idx")] if kind == "megatron" else [p for _, p in items]
    identity = [_CACHE_FORMAT, SPLIT_SALT, kind, [k for k, _ in items], _file_stats(files), tok.identity,
                val_fraction, jsonl_key]  # everything the streams depend on, not how the source was spelled
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]
    root = Path(cache_dir or os.environ.get("GRADPOWER_DATA_CACHE") or "~/.cache/gradpower_ds/data").expanduser()
    meta, train_path, val_path = (root / f"{digest}{ext}" for ext in (".json", ".train.npy", ".val.npy"))
    if not (meta.exists() and train_path.exists() and val_path.exists()):
        train, val, n_train, n_val = _build(source, kind, items, tok, val_fraction, jsonl_key)
        root.mkdir(parents=True, exist_ok=True)
        for path, stream in ((train_path, train), (val_path, val)):
            with atomic_open(path) as f:
                np.save(f, stream)
        summary = (f"{source}: {n_train:,} train / {n_val:,} val documents, {len(train):,} / {len(val):,} tokens, "
                   f"tokenizer {tok.name} (vocab {tok.vocab_size})")
        with atomic_open(meta) as f:
            f.write(json.dumps({"description": summary, "identity": identity}).encode())
    description = json.loads(meta.read_text())["description"]
    return Corpus(np.load(train_path, mmap_mode="r"), np.load(val_path, mmap_mode="r"), tok, tok.vocab_size,
                  tok.eos_id, description, meta)


def load_corpus_distributed(source: str = "stdlib", tokenizer: str = "byte", val_fraction: float = 0.01,
                            cache_dir: str | Path | None = None, jsonl_key: str = "text") -> Corpus:
    """load_corpus for a torch.distributed job: rank 0 builds the cache while the others wait, then all load it.

    A build error on rank 0 is raised on every rank (no hang). Ranks that cannot see rank 0's cache (a cache dir not
    shared between nodes) build their own identical copy. Without torch.distributed it is just load_corpus."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return load_corpus(source, tokenizer, val_fraction, cache_dir, jsonl_key)
    group = dist.new_group(backend="gloo")  # CPU collective, whatever the default backend (NCCL included)
    error, message = None, [None]
    if dist.get_rank() == 0:
        try:
            load_corpus(source, tokenizer, val_fraction, cache_dir, jsonl_key)
        except Exception as e:  # noqa: BLE001 - sent to the other ranks, re-raised below
            error, message = e, [f"{type(e).__name__}: {e}"]
    dist.broadcast_object_list(message, src=0, group=group)
    dist.destroy_process_group(group)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(f"rank 0 could not build the corpus: {message[0]}")
    return load_corpus(source, tokenizer, val_fraction, cache_dir, jsonl_key)
