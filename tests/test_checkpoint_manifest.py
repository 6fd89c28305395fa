"""Checkpoint integrity manifests (issue 35, item 1): the library module, its CLI, and DeepSpeed's save/load with them.

The unit tests write folders of random files, damage them in several ways and check that ``verify`` and
``python -m gradpower_ds verify-checkpoint`` name the damaged file. The DeepSpeed test is one 2-rank launch of
tests/jobs/ds_manifest.py (ZeRO-2 and ZeRO-3): every rank refuses a damaged checkpoint with the same message
naming the file and the previous tag, and an intact one loads to the trained params.
"""

import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from gradpower_ds import checkpoint_manifest as cm


def make_checkpoint(folder: Path, sizes=(0, 1, 4096, 3 * (8 << 20) + 17), seed=0) -> dict:
    """A folder of random files (one in a subfolder) with its manifest; returns {name: bytes}."""
    gen = torch.Generator().manual_seed(seed)
    contents = {}
    for i, size in enumerate(sizes):
        name = f"shard_{i}.pt" if i != 1 else "zero/optimizer_state.pt"
        data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen).numpy().tobytes()
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        contents[name] = data
    cm.write_manifest(folder, {name: cm.file_entry(folder / name) for name in cm.checkpoint_files(folder)})
    return contents


@pytest.mark.parametrize("block", [cm.BLOCK, 1 << 20, 3 << 20])
@pytest.mark.parametrize("threads", [1, 3])
def test_entries_are_the_size_and_a_crc32_per_block(tmp_path, monkeypatch, block, threads):
    monkeypatch.setattr(cm, "BLOCK", block)
    monkeypatch.setattr(cm, "hash_threads", lambda: threads)
    contents = make_checkpoint(tmp_path)
    files = cm.read_manifest(tmp_path)
    assert sorted(files) == sorted(contents)  # subfolders included, the manifest itself not
    for name, data in contents.items():  # independent reference: zlib over each block's bytes at once
        blocks = [data[i:i + block] for i in range(0, max(len(data), 1), block)]
        assert files[name] == {"size": len(data), "crc32": [f"{zlib.crc32(b):08x}" for b in blocks]}
    assert cm.verify(tmp_path) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "delete", "swap"])
def test_verify_names_the_damaged_file(tmp_path, damage):
    contents = make_checkpoint(tmp_path)  # one block per file (64 MiB blocks)
    big = "shard_3.pt"
    path = tmp_path / big
    if damage == "flip":  # one bit, deep inside the third chunk: the size stays
        data = bytearray(contents[big])
        data[2 * (8 << 20) + 5] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        os.truncate(path, len(contents[big]) - 1)
    elif damage == "extend":
        with open(path, "ab") as f:
            f.write(b"\0")
    elif damage == "delete":
        path.unlink()
    else:  # another save's file of the same size
        path.write_bytes(bytes(reversed(contents[big])))
    problems = cm.verify(tmp_path)
    assert len(problems) == 1 and problems[0].startswith(big), problems
    if damage == "flip":  # where: the block holding the flipped byte
        assert f"in bytes 0-{3 * (8 << 20) + 17:,})" in problems[0]
    expected = {"flip": "differs from its manifest", "swap": "differs from its manifest", "delete": "is missing",
                "truncate": f"has {len(contents[big]) - 1} bytes", "extend": f"has {len(contents[big]) + 1} bytes"}
    assert expected[damage] in problems[0]


def test_a_flip_is_located_to_its_block(tmp_path, monkeypatch):
    monkeypatch.setattr(cm, "BLOCK", 1 << 20)
    contents = make_checkpoint(tmp_path)
    data = bytearray(contents["shard_3.pt"])
    data[(5 << 20) + 7] ^= 0x80
    (tmp_path / "shard_3.pt").write_bytes(bytes(data))
    problem, = cm.verify(tmp_path)
    assert problem.startswith("shard_3.pt differs") and f"in bytes {5 << 20:,}-{6 << 20:,})" in problem


def test_a_damaged_or_foreign_manifest_is_a_damaged_checkpoint(tmp_path):
    make_checkpoint(tmp_path)
    manifest = tmp_path / cm.MANIFEST
    document = json.loads(manifest.read_text())
    manifest.write_text(manifest.read_text()[:-40])  # cut short
    assert "unreadable" in cm.verify(tmp_path)[0]
    manifest.write_text(json.dumps(dict(document, format="other/1")))
    assert "is not a" in cm.verify(tmp_path)[0]
    manifest.unlink()
    assert cm.verify(tmp_path) is None  # no manifest: cannot be verified, which is not damage


def test_new_files_beside_the_listed_ones_are_not_damage(tmp_path):
    make_checkpoint(tmp_path)
    (tmp_path / ".latest.abc.tmp").write_text("x")  # an atomic write's leftover is not a checkpoint file
    assert ".latest.abc.tmp" not in cm.checkpoint_files(tmp_path)
    assert cm.verify(tmp_path) == []


@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_shares_cover_every_file_once_with_balanced_bytes(count):
    sizes = {f"f{i}": size for i, size in enumerate([100, 7, 50, 50, 3, 0, 99, 1, 60])}
    shares = cm.assign(sizes, count)
    flat = [name for share in shares for name in share]
    assert sorted(flat) == sorted(sizes) and len(shares) == count
    loads = [sum(sizes[n] for n in share) for share in shares]
    assert max(loads) - min(loads) <= max(sizes.values())  # greedy largest-first: within one file's size
    assert shares == cm.assign(dict(reversed(list(sizes.items()))), count)  # the same on every rank


def test_previous_checkpoint_is_the_newest_older_one_with_matching_sizes(tmp_path):
    for i, tag in enumerate(["step2", "step4", "step6"]):
        (tmp_path / tag).mkdir()
        make_checkpoint(tmp_path / tag, sizes=(10, 20), seed=i)
        os.utime(tmp_path / tag, (1000 + i, 1000 + i))
    assert cm.previous_checkpoint(tmp_path / "step6") == tmp_path / "step4"
    os.truncate(tmp_path / "step4" / "shard_0.pt", 3)
    os.utime(tmp_path / "step4", (1001, 1001))
    assert cm.previous_checkpoint(tmp_path / "step6") == tmp_path / "step2"
    assert cm.previous_checkpoint(tmp_path / "step2") is None


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gradpower_ds", "verify-checkpoint", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_verify_checkpoint_command(tmp_path):
    for tag in ("step2", "step4"):
        (tmp_path / tag).mkdir()
        make_checkpoint(tmp_path / tag, sizes=(10, 4096))
    (tmp_path / "latest").write_text("step4")
    ok = run_cli(tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count(": intact (2 files") == 2
    os.truncate(tmp_path / "step4" / "shard_0.pt", 4)
    damaged = run_cli(tmp_path)
    assert damaged.returncode == 1
    assert "step4: DAMAGED: shard_0.pt has 4 bytes, its manifest 10" in damaged.stdout
    assert f"{tmp_path / 'step2'}: intact" in damaged.stdout
    (tmp_path / "step2" / cm.MANIFEST).unlink()
    only = run_cli(tmp_path / "step2")
    assert only.returncode == 3 and "NO MANIFEST" in only.stdout
    assert run_cli(tmp_path / "missing").returncode == 2


# ---- DeepSpeed: engine.save_checkpoint / load_checkpoint, 2 ranks -------------------------------------------------

@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory):
    from conftest import torchrun

    root = tmp_path_factory.mktemp("manifest")
    torchrun(Path(__file__).parent / "jobs" / "ds_manifest.py", root, root / "out.pt")
    return torch.load(root / "out.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_save_writes_the_manifest_before_latest(deepspeed_results, stage):
    case = deepspeed_results[stage]
    assert case["latest"] == "b" and case["latest_after_manifest"]
    listed = set(case["manifest"])
    assert listed == set(case["listing"]) - {cm.MANIFEST}  # every file of the tag folder, from both ranks
    assert any("zero_pp_rank_1" in name for name in listed) and any("zero_pp_rank_0" in name for name in listed)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_deepspeed_load_refuses_a_damaged_checkpoint_on_every_rank(deepspeed_results, stage, damage):
    case = deepspeed_results[stage]["damaged"][damage]
    errors = case["errors"]
    assert errors[0] == errors[1] and errors[0] is not None  # the same refusal on both ranks, not a hang or a crash
    assert errors[0].startswith("CheckpointIntegrityError: checkpoint ") and f"z{stage}/b is damaged" in errors[0]
    assert case["file"] in errors[0]
    assert "engine.load_checkpoint(" in errors[0] and "tag='a'" in errors[0]  # what to do: the previous tag


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_loads_intact_and_unverified_checkpoints(deepspeed_results, stage):
    case = deepspeed_results[stage]
    for how in ("intact", "unverified"):
        assert "error" not in case[how], case[how]
        for name, value in case["trained"].items():
            torch.testing.assert_close(case[how]["params"][name], value, rtol=0, atol=0)
