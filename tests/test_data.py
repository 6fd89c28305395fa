"""The data layer: sources, tokenizers, the document split, the disk cache, and resumable batches."""

from __future__ import annotations

import json
import multiprocessing
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from gradpower_ds.jobs import data
from gradpower_ds.jobs.data import ByteTokenizer, is_val_document, load_corpus, load_corpus_distributed

LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def letter_dir(root: Path, order=range(len(LETTERS))) -> Path:
    """One document per letter (200 copies of it), written in `order`: the stream shows which documents it holds."""
    root.mkdir(parents=True, exist_ok=True)
    for i in order:
        (root / f"doc_{i:02d}.txt").write_text(LETTERS[i] * 200)
    return root


def letters_of(stream) -> set[str]:
    """The document letters in a byte-token stream (EOS left out)."""
    return {chr(t) for t in np.unique(np.asarray(stream)) if t != ByteTokenizer.eos_id}


def expected_split(keys, val_fraction):
    """Keys of the train and the validation documents, by the documented rule (crc32 of salt:key)."""
    val = {k for k in keys if zlib.crc32(f"{data.SPLIT_SALT}:{k}".encode()) < val_fraction * 2**32}
    return set(keys) - val, val


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory):
    """The default corpus, tokenized once per session into a temporary cache."""
    return load_corpus(cache_dir=tmp_path_factory.mktemp("stdlib_cache"))


@pytest.fixture
def letters(tmp_path):
    """A 52-document corpus where 20 % are held out, and its train/val letters."""
    corpus = load_corpus(str(letter_dir(tmp_path / "src")), val_fraction=0.2, cache_dir=tmp_path / "cache")
    train, val = expected_split([f"doc_{i:02d}.txt" for i in range(len(LETTERS))], 0.2)
    return corpus, {LETTERS[int(k[4:6])] for k in train}, {LETTERS[int(k[4:6])] for k in val}


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo wörld ✓ 日本語 \x00\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 257 and tok.eos_id == 256
    assert ids.tolist() == list(text.encode()) and max(ids) < 256
    assert tok.decode(ids) == text and tok.decode(tok.encode(text.encode())) == text
    assert tok.decode([104, 105, 256, 33]) == "hi<|eos|>!"


def test_stdlib_corpus(stdlib_corpus):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        files.update({(Path(folder, n).relative_to(root).as_posix()): Path(folder, n) for n in names
                      if n.endswith(".py") and os.path.getsize(Path(folder, n))})
    files = {k: p for k, p in files.items() if not k.startswith(("_sysconfigdata", "config-"))}  # build-specific
    train, val = expected_split(files, 0.01)
    assert train and val and not train & val
    corpus = stdlib_corpus
    # each non-empty file once, as its bytes, followed by EOS: the split and the order are fully determined
    assert len(corpus.train) == sum(files[k].stat().st_size + 1 for k in train) > 10_000_000
    assert len(corpus.val) == sum(files[k].stat().st_size + 1 for k in val) > 0
    first_train, first_val = files[min(train)].read_bytes(), files[min(val)].read_bytes()
    assert bytes(corpus.train[:len(first_train)].astype(np.uint8)) == first_train
    assert bytes(corpus.val[:len(first_val)].astype(np.uint8)) == first_val and corpus.val[len(first_val)] == 256
    assert corpus.train.dtype == np.uint16 and corpus.vocab_size == 257 and corpus.eos_id == 256
    assert f"{len(train):,} train / {len(val):,} val documents" in corpus.description
    assert not any("site-packages" in k for k in files) and data._resolve("stdlib") == data._resolve("stdlib")


def test_split_independent_of_file_order(tmp_path):
    forward = load_corpus(str(letter_dir(tmp_path / "a")), val_fraction=0.3, cache_dir=tmp_path / "c")
    backward = load_corpus(str(letter_dir(tmp_path / "b", reversed(range(len(LETTERS))))), val_fraction=0.3,
                           cache_dir=tmp_path / "c")
    assert np.array_equal(forward.train, backward.train) and np.array_equal(forward.val, backward.val)
    keys = [f"doc{i}" for i in range(1000)]
    assert [is_val_document(k, 0.1) for k in keys] == [is_val_document(k, 0.1) for k in reversed(keys)][::-1]
    assert 50 < sum(is_val_document(k, 0.1) for k in keys) < 150


def test_directory_source(letters):
    corpus, train_letters, val_letters = letters
    assert letters_of(corpus.train) == train_letters and letters_of(corpus.val) == val_letters
    assert len(corpus.train) == 201 * len(train_letters) and len(corpus.val) == 201 * len(val_letters)
    assert np.all(corpus.train[200::201] == 256)


def test_single_file_and_glob_sources(tmp_path):
    text = "\n\n".join(f"paragraph {i} " + LETTERS[i % 52] * 30 for i in range(60))
    (tmp_path / "book.txt").write_text(text)
    corpus = load_corpus(str(tmp_path / "book.txt"), val_fraction=0.2, cache_dir=tmp_path / "c")
    paragraphs = text.split("\n\n")
    assert len(corpus.train) + len(corpus.val) == sum(len(p) + 1 for p in paragraphs)
    val_text = ByteTokenizer().decode(corpus.val)
    assert val_text.startswith(next(p for i, p in enumerate(paragraphs) if is_val_document(f"book.txt:{i}", 0.2)))
    letter_dir(tmp_path / "g")
    (tmp_path / "g" / "skip.md").write_text("not matched")
    globbed = load_corpus(str(tmp_path / "g" / "*.txt"), val_fraction=0.2, cache_dir=tmp_path / "c")
    assert letters_of(globbed.train) | letters_of(globbed.val) == set(LETTERS)  # skip.md not matched
    assert len(globbed.train) + len(globbed.val) == 52 * 201


def test_jsonl_source(tmp_path):
    rows = [{"body": f"row {i} " + LETTERS[i % 52] * 20, "id": i} for i in range(80)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = load_corpus(str(path), val_fraction=0.25, cache_dir=tmp_path / "c", jsonl_key="body")
    val_rows = [r["body"] for i, r in enumerate(rows) if is_val_document(f"rows.jsonl:{i + 1}", 0.25)]
    assert ByteTokenizer().decode(corpus.val) == "".join(b + "<|eos|>" for b in val_rows)
    assert len(corpus.train) == sum(len(r["body"]) + 1 for r in rows) - len(corpus.val)
    with pytest.raises(ValueError, match=r"rows.jsonl line 1 has no string under key 'text'.*jsonl_key"):
        load_corpus(str(path), val_fraction=0.25, cache_dir=tmp_path / "c")


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data path not found: .*nope; give a text file, a directory, "
                       r"a \.jsonl file, a Megatron prefix with .*nope\.bin/.*nope\.idx, or 'stdlib'"):
        load_corpus(str(tmp_path / "nope"), cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no files"):
        load_corpus(str(tmp_path / "empty"), cache_dir=tmp_path)
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("")
    with pytest.raises(ValueError, match="has no non-empty documents"):
        load_corpus(str(tmp_path / "empty"), cache_dir=tmp_path)
    (tmp_path / "empty" / "a.txt").write_text("only one document")
    with pytest.raises(ValueError, match="1 train / 0 validation documents with val_fraction=0.01"):
        load_corpus(str(tmp_path / "empty"), cache_dir=tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2 has no string under key 'text'"):
        load_corpus(str(tmp_path / "bad.jsonl"), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer path not found: .*missing_tok"):
        load_corpus(str(tmp_path / "empty"), tokenizer=str(tmp_path / "missing_tok"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(str(tmp_path / "empty"), val_fraction=1.0, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.npy"))


def write_indexed_dataset(prefix, documents, vocab_size: int) -> None:
    """Writes token documents as a Megatron indexed dataset prefix.bin/prefix.idx with megatron-core's builder."""
    indexed = data._megatron_indexed()
    builder = indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=indexed.DType.optimal_dtype(vocab_size))
    for doc in documents:
        builder.add_document(np.asarray(doc, dtype=np.int64), [len(doc)])
    builder.finalize(f"{prefix}.idx")


def test_megatron_indexed_dataset(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=int(rng.integers(5, 50))).tolist() for _ in range(60)]
    prefix = tmp_path / "tokens_text_document"
    write_indexed_dataset(prefix, docs, vocab_size=257)
    assert prefix.with_suffix(".bin").exists() and prefix.with_suffix(".idx").exists()
    corpus = load_corpus(str(prefix), val_fraction=0.2, cache_dir=tmp_path / "c")
    join = lambda ids: [t for i in ids for t in docs[i] + [256]]  # noqa: E731
    val = [i for i in range(60) if is_val_document(f"doc{i}", 0.2)]
    assert corpus.val.tolist() == join(val) and val
    assert corpus.train.tolist() == join(i for i in range(60) if i not in val)
    assert load_corpus(f"{prefix}.bin", val_fraction=0.2, cache_dir=tmp_path / "c").cache_path == corpus.cache_path
    write_indexed_dataset(tmp_path / "big", [[1, 2, 3], [300, 4]], vocab_size=1000)
    with pytest.raises(ValueError, match=r"has token id 300 .*outside the tokenizer's vocab 0..256"):
        load_corpus(str(tmp_path / "big"), val_fraction=0.5, cache_dir=tmp_path / "c")


def test_megatron_documents_with_eod_get_no_second_eos(tmp_path):
    docs = [[i % 250 + 1] * 4 + [256] for i in range(40)]  # as made by Megatron's preprocess_data --append-eod
    write_indexed_dataset(tmp_path / "eod", docs, vocab_size=257)
    corpus = load_corpus(str(tmp_path / "eod"), val_fraction=0.3, cache_dir=tmp_path / "c")
    assert len(corpus.train) + len(corpus.val) == 40 * 5


def test_cache_reused_and_invalidated(tmp_path, monkeypatch):
    src = letter_dir(tmp_path / "src")
    first = load_corpus(str(src), val_fraction=0.2, cache_dir=tmp_path / "c")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()}
    assert len(stamps) == 3 and not list((tmp_path / "c").glob("*.tmp"))

    def no_tokenizing(self, text):
        raise AssertionError("tokenized again although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(ByteTokenizer, "encode", no_tokenizing)
        again = load_corpus(str(src), val_fraction=0.2, cache_dir=tmp_path / "c")
        monkeypatch.setenv("GRADPOWER_DATA_CACHE", str(tmp_path / "c"))
        from_env = load_corpus(str(src), val_fraction=0.2)
    assert again.cache_path == first.cache_path == from_env.cache_path and isinstance(again.train, np.memmap)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()} == stamps
    assert np.array_equal(again.train, first.train) and again.description == first.description

    edited = src / "doc_00.txt"
    edited.write_text("Z" * 10)
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))
    changed = load_corpus(str(src), val_fraction=0.2, cache_dir=tmp_path / "c")
    assert changed.cache_path != first.cache_path and len(changed.train) + len(changed.val) == 51 * 201 + 11
    assert load_corpus(str(src), val_fraction=0.3, cache_dir=tmp_path / "c").cache_path != changed.cache_path


def test_train_batches(letters):
    corpus, _, _ = letters
    x, y = corpus.train_batch(step=5, micro_step=1, rank=0, world_size=2, batch_size=4, seq_len=32, seed=7)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(corpus.train, dtype=np.int64), 33)
    for row in torch.cat([x, y[:, -1:]], 1).numpy():
        assert (windows == row).all(1).any()
    same = corpus.train_batch(5, 1, 0, 2, 4, 32, 7)
    assert torch.equal(same[0], x) and torch.equal(same[1], y)
    for other in [(5, 1, 1, 2, 4, 32, 7), (6, 1, 0, 2, 4, 32, 7), (5, 0, 0, 2, 4, 32, 7), (5, 1, 0, 2, 4, 32, 8)]:
        assert not torch.equal(corpus.train_batch(*other)[0], x)
    assert torch.equal(corpus.train_batch(5, 1, 0, 8, 4, 32, 7)[0], x)  # world_size does not move the windows
    with pytest.raises(ValueError, match="rank 2 outside world_size 2"):
        corpus.train_batch(0, 0, 2, 2, 4, 32, 7)


def test_val_batches(letters):
    corpus, train_letters, val_letters = letters
    batches = corpus.val_batches(batch_size=3, seq_len=20, max_batches=4)
    assert [b[0].shape[0] for b in batches] == [3, 3, 3, 3]
    rows = torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in batches])
    assert torch.equal(rows.flatten(), torch.from_numpy(corpus.val[:12 * 21].astype(np.int64)))
    assert letters_of(rows.numpy()) <= val_letters and not letters_of(rows.numpy()) & train_letters
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(batches, corpus.val_batches(3, 20, 4)))
    every = corpus.val_batches(3, 20, 10**6)
    assert sum(len(x) for x, _ in every) == len(corpus.val) // 21 and len(every[-1][0]) <= 3
    with pytest.raises(ValueError, match="validation stream has .* tokens, fewer than seq_len"):
        corpus.val_batches(2, len(corpus.val), 1)


def test_hf_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library builds the local test tokenizer")
    from transformers import PreTrainedTokenizerFast
    words = "the cat sat on a mat and dog ran far".split()
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.train_from_iterator(words, tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "[EOS]"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    hf.save_pretrained(tmp_path / "tok")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"{i}.txt").write_text(" ".join(words[(i + j) % len(words)] for j in range(i % 7 + 1)))
    corpus = load_corpus(str(src), tokenizer=str(tmp_path / "tok"), val_fraction=0.3, cache_dir=tmp_path / "c")
    tok = corpus.tokenizer
    assert corpus.vocab_size == len(words) + 2 and corpus.eos_id == tok.hf.convert_tokens_to_ids("[EOS]")
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat" and tok.encode(b"a zebra")[1] == 0
    assert (corpus.train == corpus.eos_id).sum() + (corpus.val == corpus.eos_id).sum() == 30
    assert str(tmp_path / "tok") in corpus.description
    x, y = corpus.train_batch(0, 0, 0, 1, 2, 3, 0)
    assert x.shape == (2, 3) and int(x.max()) < corpus.vocab_size
    with pytest.raises(ValueError, match="could not load a Hugging Face tokenizer"):
        load_corpus(str(src), tokenizer=str(src), cache_dir=tmp_path / "c")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "no_eos")
    with pytest.raises(ValueError, match="has no eos_token"):
        load_corpus(str(src), tokenizer=str(tmp_path / "no_eos"), cache_dir=tmp_path / "c")


def _rank_main(rank, rendezvous, kwargs, results):
    """One rank of a 2-process gloo job: load_corpus_distributed, report the result or the error."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        results.put((rank, load_corpus_distributed(**kwargs).description))
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        torch.distributed.destroy_process_group()


def run_two_ranks(tmp_path, name, **kwargs) -> dict:
    """Runs _rank_main on 2 forked processes; {rank: description or error}."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, tmp_path / name, kwargs, results)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    return out


def test_distributed_rank0_builds_and_errors_reach_every_rank(tmp_path):
    src = letter_dir(tmp_path / "src")
    out = run_two_ranks(tmp_path, "rdzv1", source=str(src), val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    assert out[0] == out[1] == load_corpus(str(src), val_fraction=0.2, cache_dir=tmp_path / "c").description
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    out = run_two_ranks(tmp_path, "rdzv2", source=str(tmp_path / "bad.jsonl"), cache_dir=str(tmp_path / "c"))
    assert out[0].startswith("ValueError: ") and "bad.jsonl line 1" in out[0]
    assert out[1].startswith("RuntimeError: rank 0 could not build the corpus: ValueError: ") and "line 1" in out[1]
