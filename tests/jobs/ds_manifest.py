"""Launched job: DeepSpeed checkpoints with gradpower_ds's integrity manifests (issue 35, item 1).

``ds_manifest.py ROOT OUT`` (2 ranks): for each ZeRO stage of STAGES, an AdamPower run saves tag "a" after one
step and "b" after two (``engine.save_checkpoint(ROOT/zN, tag=...)``). Then rank 0 damages "b" in each way of
DAMAGES (restoring it between them) and a fresh engine on every rank tries ``load_checkpoint(ROOT/zN)`` (the tag
``latest`` names): the error each rank got is recorded. Last, the intact "b" is loaded (its params must be the
trained ones), and "b" without its manifest (loaded, unverified). Rank 0 writes the results to OUT.
"""

import os
import shutil
import sys
from pathlib import Path

import deepspeed
import torch.distributed as dist

from gradpower_ds import checkpoint_manifest
from gradpower_ds import deepspeed as gds
from gradpower_ds.jobs.processes import exit_when_done

try:
    import ds_toy  # launched: tests/jobs is sys.path[0]
except ImportError:  # imported by the tests as jobs.ds_manifest
    from jobs import ds_toy

STAGES = (2, 3)
OPTIM_SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's optimizer shard, at every ZeRO stage


def flip_bytes(folder: Path) -> str:
    """Changes 8 bytes in the middle of rank 1's optimizer shard (same size)."""
    path = folder / OPTIM_SHARD
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(255 - b for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))
    return OPTIM_SHARD


def truncate(folder: Path) -> str:
    """Cuts rank 1's optimizer shard to half its size."""
    path = folder / OPTIM_SHARD
    os.truncate(path, path.stat().st_size // 2)
    return OPTIM_SHARD


def delete(folder: Path) -> str:
    """Removes the model-states file."""
    name = sorted(p.name for p in folder.iterdir() if "model_states" in p.name)[0]
    (folder / name).unlink()
    return name


def garble_manifest(folder: Path) -> str:
    """Overwrites the manifest with something that is not JSON."""
    (folder / checkpoint_manifest.MANIFEST).write_text("{not json")
    return checkpoint_manifest.MANIFEST


DAMAGES = {"flip": flip_bytes, "truncate": truncate, "delete": delete, "manifest": garble_manifest}


def try_load(stage: int, root: str) -> dict:
    """load_checkpoint(root) on a fresh engine: {"error": "Type: message"} or {"params": full fp32 params}."""
    engine = ds_toy.adam_power_engine(stage, power=1.2)
    try:
        path, _ = engine.load_checkpoint(root)
        result = {"path": path, "params": ds_toy.full_fp32_params(engine)}
    except Exception as error:  # recorded for the test to check, on every rank
        result = {"error": f"{type(error).__name__}: {error}"}
    engine.destroy()
    return result


def main() -> None:
    root, out = Path(sys.argv[1]), sys.argv[2]
    gds.register()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    results = {}
    for stage in STAGES:
        folder = root / f"z{stage}"
        engine = ds_toy.adam_power_engine(stage, power=1.2)
        ds_toy.train(engine, rank, 1)
        engine.save_checkpoint(str(folder), tag="a")
        ds_toy.train(engine, rank, 1, first_step=1)
        engine.save_checkpoint(str(folder), tag="b")
        case = results[stage] = {"trained": ds_toy.full_fp32_params(engine), "damaged": {}}
        engine.destroy()
        if rank == 0:
            case["latest"] = (folder / "latest").read_text()
            case["listing"] = sorted(p.name for p in (folder / "b").iterdir())
            case["manifest"] = checkpoint_manifest.read_manifest(folder / "b")
            case["latest_after_manifest"] = (folder / "latest").stat().st_mtime_ns >= \
                (folder / "b" / checkpoint_manifest.MANIFEST).stat().st_mtime_ns
            shutil.copytree(folder / "b", root / f"b{stage}-intact")
        for damage, do in DAMAGES.items():
            if rank == 0:
                case["damaged"][damage] = {"file": do(folder / "b")}
            dist.barrier()
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, try_load(stage, str(folder)).get("error"))
            if rank == 0:
                case["damaged"][damage]["errors"] = errors
                shutil.rmtree(folder / "b")
                shutil.copytree(root / f"b{stage}-intact", folder / "b")
            dist.barrier()
        case["intact"] = try_load(stage, str(folder))
        if rank == 0:
            (folder / "b" / checkpoint_manifest.MANIFEST).unlink()
        dist.barrier()
        case["unverified"] = try_load(stage, str(folder))
    ds_toy.save_and_finish(results, out)


if __name__ == "__main__":
    exit_when_done(main)
