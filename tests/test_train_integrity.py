"""The main job refuses a damaged checkpoint and resumes from the previous one with --resume_tag (issue 35, item 1).

A 2-rank run (the deepspeed launcher, the tiny model of test_train) saves step4 and step8, each with its
integrity manifest. Damaged in different ways, the newest is refused by ``--resume true`` on every rank with one
line naming the file and ``--resume_tag step4``; status.json says failed; ``verify-checkpoint`` agrees; and
``--resume_tag step4`` trains steps 5-8 again to the same end as the uninterrupted run.
"""

import json
import os
import subprocess
import sys

import pytest

from gradpower_ds import checkpoint_manifest
from gradpower_ds.jobs.metrics import read_metrics
from gradpower_ds.jobs.train_config import ConfigError, TrainConfig
from test_train import deepspeed_train

pytestmark = pytest.mark.slow


def verify_cli(folder):
    return subprocess.run([sys.executable, "-m", "gradpower_ds", "verify-checkpoint", str(folder)],
                          capture_output=True, text=True, timeout=120)


def test_resume_tag_needs_resume():
    with pytest.raises(ConfigError, match="resume_tag='step4' needs --resume true"):
        TrainConfig(resume_tag="step4")


def test_damaged_checkpoint_is_refused_and_the_previous_one_resumes(tmp_path):
    run_dir = tmp_path / "run"
    deepspeed_train(run_dir)
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step8"
    assert verify_cli(checkpoints).returncode == 0
    finished = read_metrics(run_dir / "metrics.csv")
    summary = json.loads((run_dir / "summary.json").read_text())

    shard, = (checkpoints / "step8").glob("zero_pp_rank_1_*optim_states.pt")  # rank 1's: rank 0 reads it only to hash
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit: the file keeps its size and still unpickles
    shard.write_bytes(bytes(data))
    refused = deepspeed_train(run_dir, "--resume", "true", check=False)
    log = refused.stdout + refused.stderr
    assert refused.returncode == 2, log[-6000:]
    line = next(line for line in log.splitlines() if "is damaged, refusing to load it" in line)
    assert f"{shard.name} differs from its manifest" in line and "--resume_tag step4" in line, line
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "CheckpointIntegrityError" in status["error"], status
    cli = verify_cli(checkpoints)
    assert cli.returncode == 1 and f"step8: DAMAGED: {shard.name} differs" in cli.stdout
    assert f"{checkpoints / 'step4'}: intact" in cli.stdout

    os.truncate(checkpoints / "step8" / "mp_rank_00_model_states.pt", 100)  # and another file, another way
    assert "mp_rank_00_model_states.pt has 100 bytes" in verify_cli(checkpoints / "step8").stdout

    missing = deepspeed_train(run_dir, "--resume", "true", "--resume_tag", "step5", check=False)
    assert missing.returncode == 2 and "--resume_tag step5: no such checkpoint" in missing.stdout + missing.stderr

    deepspeed_train(run_dir, "--resume", "true", "--resume_tag", "step4")
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["resumed_at"] == 4 and resumed["steps"] == 8
    assert resumed["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)  # steps 5-8 trained again, alike
    again = read_metrics(run_dir / "metrics.csv")
    assert [r["step"] for r in again] == [r["step"] for r in finished]
    assert checkpoint_manifest.verify(checkpoints / "step8") == []  # saved again, whole, with a new manifest
