"""The Megatron job's checkpoints carry integrity manifests (issue 35, item 1): a damaged one is refused on resume.

One 2-rank run (tests/megatron_cpu_site's CPU shim) saves iterations 2 and 4 with dist_checkpointing; every
checkpoint folder gets its manifest before latest_checkpointed_iteration.txt names it. A byte changed in one
of iteration 4's files makes ``--load`` fail on every rank with one line naming the file and ``--ckpt-step 2``,
and the new run's status.json says failed.
"""

import json

import pytest

from conftest import MEGATRON_CPU_ENV, torchrun
from gradpower_ds import checkpoint_manifest
from test_megatron_pretrain import TINY

pytest.importorskip("megatron.core", reason="megatron-core is not installed")
pytestmark = pytest.mark.slow


def test_damaged_megatron_checkpoint_is_refused_naming_the_file_and_the_previous_one(tmp_path):
    common = ["-m", "gradpower_ds.jobs.train_megatron", *TINY, "--optimizer", "adampower", "--train-iters", "4"]
    full = tmp_path / "full"
    torchrun(*common, "--save", full, "--save-interval", "2", env=MEGATRON_CPU_ENV, timeout=600)
    assert (full / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    for step in (2, 4):
        files = checkpoint_manifest.read_manifest(full / f"iter_{step:07d}")
        assert files and checkpoint_manifest.verify(full / f"iter_{step:07d}") == []
        assert set(files) == set(checkpoint_manifest.checkpoint_files(full / f"iter_{step:07d}"))

    folder = full / "iter_0000004"
    name = max(checkpoint_manifest.read_manifest(folder).items(), key=lambda item: item[1]["size"])[0]
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 3] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    resumed = tmp_path / "resumed"
    proc = torchrun(*common, "--save", resumed, "--load", full, env=MEGATRON_CPU_ENV, timeout=600, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-6000:]
    line = next(line for line in log.splitlines() if "is damaged, refusing to load it" in line)
    assert f"{name} differs from its manifest" in line and "--ckpt-step 2" in line, line
    status = json.loads((resumed / "status.json").read_text())
    assert status["state"] == "failed" and "CheckpointIntegrityError" in status["error"], status
