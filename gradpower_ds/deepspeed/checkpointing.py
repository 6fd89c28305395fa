"""Integrity manifests for DeepSpeed's ``save_checkpoint``/``load_checkpoint``, and load errors naming the file.

Installed by ``gradpower_ds.deepspeed.register()`` for every engine (any optimizer), unless
``GRADPOWER_CHECKPOINT_MANIFEST=0`` in every rank's environment:

- ``save_checkpoint(save_dir, tag, ..., save_latest=True)`` saves as DeepSpeed does but with its
  ``latest`` held back; then the ranks hash the tag folder's files (``gradpower_ds.checkpoint_manifest``,
  each rank a share), rank 0 (with ``use_node_local_storage`` the first rank of each node) writes
  the manifest, and only then rank 0 points ``latest`` at the tag (atomically). A crash at any moment
  leaves ``latest`` at a complete, verifiable checkpoint.
- ``load_checkpoint(load_dir, tag=None, ...)`` first checks every file of the tag's folder against
  its manifest, split between the ranks; a mismatch raises CheckpointIntegrityError on every rank,
  naming each damaged file and the previous checkpoint's tag to load instead. A folder without a manifest
  (saved by DeepSpeed alone, or converted by ds_to_universal) is loaded with a warning that it was
  not verified.
- DeepSpeed's file reads (``TorchCheckpointEngine.load``) that fail raise CheckpointLoadError naming
  the rank and the file (torch.load's own errors, e.g. ``OSError: [Errno 22] Invalid argument`` for a
  truncated shard, name neither).

Checkpoint engines other than DeepSpeed's default torch one (Nebula, DataStates, decoupled/async
engines, whose files are written later or elsewhere) are saved and loaded untouched, with a
one-time warning that they get no manifest.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from pathlib import Path

from .. import checkpoint_manifest
from ..atomic_write import atomic_open

SWITCH = "GRADPOWER_CHECKPOINT_MANIFEST"  # "0": DeepSpeed's save and load as they are
_log = logging.getLogger(__name__)
_warned: set[str] = set()


class CheckpointLoadError(RuntimeError):
    """Reading a file of a DeepSpeed checkpoint failed; the message names the rank and the file."""


def enabled() -> bool:
    """Whether manifests are written and verified (SWITCH unset or not "0")."""
    return os.environ.get(SWITCH, "1") != "0"


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned and _rank() == 0:
        _warned.add(key)
        _log.warning(message, *args)


def _manifest_engine(engine) -> bool:
    """Whether this engine's checkpoints get manifests: DeepSpeed's torch checkpoint engine (files written before
    save_checkpoint returns); else a one-time warning saying why not."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if type(checkpoint_engine) is TorchCheckpointEngine:
        return True
    _warn_once("engine", "gradpower_ds: checkpoint engine %s writes its files outside save_checkpoint: its checkpoints "
               "get no integrity manifest (only DeepSpeed's default TorchCheckpointEngine does)",
               type(checkpoint_engine).__name__)
    return False


def earlier_tag_hint(folder: Path, load_dir: str) -> str:
    """What a DeepSpeed user does about a damaged checkpoint `folder`: load the previous checkpoint."""
    previous = checkpoint_manifest.previous_checkpoint(folder)
    check = f"`python -m gradpower_ds verify-checkpoint {load_dir}` lists which are intact"
    if previous is None:
        return f"No earlier checkpoint with a manifest is in {load_dir}; {check}"
    return (f"Load the previous checkpoint instead: engine.load_checkpoint({load_dir!r}, tag={previous.name!r}) "
            f"({check})")


def saving_with_manifest(original):
    """DeepSpeedEngine.save_checkpoint that writes the tag folder's manifest before it moves `latest`."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_checkpoint(engine, *args, **kwargs):
        if not enabled() or not _manifest_engine(engine):
            return original(engine, *args, **kwargs)
        import deepspeed.comm as dist

        call = signature.bind(engine, *args, **kwargs)
        call.apply_defaults()
        save_dir, save_latest = call.arguments["save_dir"], call.arguments["save_latest"]
        tag = call.arguments["tag"]
        call.arguments["tag"] = tag = str(tag if tag is not None else f"global_step{engine.global_steps}")
        call.arguments["save_latest"] = False
        result = original(*call.args, **call.kwargs)  # ends with a barrier: every rank's files are whole
        written = checkpoint_manifest.write_collectively(os.path.join(save_dir, tag),
                                                         node_local=engine.use_node_local_storage())
        if written is not None:
            files, size, seconds = written
            _log.info("gradpower_ds: checkpoint %s: manifest of %d files, %.1f MB, in %.2f s", tag, files,
                      size / 1e6, seconds)
        dist.barrier()  # every node's manifest is written before latest names the tag
        if save_latest and engine.global_rank == 0:
            with atomic_open(os.path.join(save_dir, "latest"), durable=True) as f:
                f.write(tag.encode())
        dist.barrier()
        return result

    return save_checkpoint


def _requested_tag(engine, load_dir: str, tag) -> str | None:
    """The tag load_checkpoint will load, as DeepSpeed resolves it (``latest`` or ``latest_universal``), agreed
    by all ranks (the first rank that can read the pointer; with node-local storage only rank 0's node has it)."""
    if tag is not None:
        return str(tag)
    pointer = Path(load_dir) / ("latest_universal" if engine.load_universal_checkpoint() else "latest")
    seen = pointer.read_text().strip() if pointer.is_file() else None
    return next((t for t in checkpoint_manifest._gather(seen) if t), None)


def loading_verified(original):
    """DeepSpeedEngine.load_checkpoint that first verifies the checkpoint against its manifest on all ranks."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_checkpoint(engine, *args, **kwargs):
        if not enabled() or not _manifest_engine(engine):
            return original(engine, *args, **kwargs)
        call = signature.bind(engine, *args, **kwargs)
        call.apply_defaults()
        load_dir = str(call.arguments["load_dir"])
        tag = _requested_tag(engine, load_dir, call.arguments["tag"])
        if tag is None:  # DeepSpeed warns that there is no latest and loads nothing
            return original(*call.args, **call.kwargs)
        call.arguments["tag"] = tag
        folder = Path(load_dir) / tag
        if folder.is_dir():
            try:
                verified = checkpoint_manifest.verify_collectively(folder, "", engine.use_node_local_storage())
            except checkpoint_manifest.CheckpointIntegrityError as error:
                raise checkpoint_manifest.CheckpointIntegrityError(
                    folder, error.problems, earlier_tag_hint(folder, load_dir)) from None
            if not verified:
                _warn_once(f"unverified:{folder}", "gradpower_ds: checkpoint %s has no %s (saved without "
                           "gradpower_ds, or converted): loaded without an integrity check", folder,
                           checkpoint_manifest.MANIFEST)
        return original(*call.args, **call.kwargs)

    return load_checkpoint


def loading_naming_file(original):
    """TorchCheckpointEngine.load whose errors name the rank and the file (CheckpointLoadError; a missing file stays
    FileNotFoundError, with the rank added)."""

    @functools.wraps(original)
    def load(checkpoint_engine, path, *args, **kwargs):
        try:
            return original(checkpoint_engine, path, *args, **kwargs)
        except FileNotFoundError as error:
            raise FileNotFoundError(error.errno, f"rank {_rank()}: checkpoint file missing", str(path)) from error
        except Exception as error:
            raise CheckpointLoadError(f"rank {_rank()}: cannot load checkpoint file {path}: {type(error).__name__}: "
                                      f"{error} (damaged or truncated? `python -m gradpower_ds verify-checkpoint "
                                      f"{Path(path).parent}` checks it)") from error

    return load
