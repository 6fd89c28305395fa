"""The jobs wing: the main job and what it is built from, apart from the library they use.

``train`` (the main job: DeepSpeed pretraining of the demo model, ``train_config`` its
settings), ``compare`` (several optimizers and seeds), ``advise`` (p from a run's measured
gradient noise), ``train_megatron`` (the Megatron-core demo job), ``run`` (the
zero-code-change runner for a user's own DeepSpeed script), and their parts: ``model`` (the
demo CausalLM), ``data``, ``metrics``, ``run_dir``, ``files``, ``processes``,
``precision``, ``schedules``. The library (``gradpower_ds``) never imports this wing. The
training jobs' own dependencies (a progress bar, plots, event files, numpy for the data)
are the ``jobs`` extra, ``pip install "gradpower-ds[jobs]"``; ``require_extra`` says so
before a job starts.
"""

from __future__ import annotations

import importlib.util

EXTRA = ("numpy", "tqdm", "matplotlib", "tensorboard")  # setup.py's extras_require["jobs"]


def require_extra(job: str) -> None:
    """SystemExit naming what to install when a module of the jobs extra is missing, before `job` starts."""
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"{job} needs the jobs extra, which is not installed here (missing: {', '.join(missing)}): "
                         "pip install \"gradpower-ds[jobs]\" (or, from a checkout, pip install \".[jobs]\")")
