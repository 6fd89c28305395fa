"""DeepSpeed's process groups keep the timeout given to ``deepspeed.init_distributed``.

DeepSpeed (0.16.0 through 0.19.8) passes ``init_distributed(timeout=...)`` to the world group only: every
group it makes later (expert and expert-data-parallel groups for MoE, ZeRO's, pipeline's) comes from
``torch.distributed.new_group(ranks)`` without a timeout, so torch gives it its default (30 minutes on gloo).
A collective of such a group that waits on a host cut off from the network then waits half an hour, whatever
the run asked for. Two of register()'s patches: ``TorchBackend.__init__`` keeps the timeout it was given, and
``TorchBackend.new_group`` passes it on. A backend built before register() (init_distributed called first)
keeps torch's default for its groups, as DeepSpeed does.
"""

from __future__ import annotations

import functools


def keeping_timeout(original):
    """TorchBackend.__init__ that records its `timeout` as ``gradpower_timeout`` before initialising."""

    @functools.wraps(original)
    def __init__(backend, dist_backend, timeout, *args, **kwargs):
        backend.gradpower_timeout = timeout
        original(backend, dist_backend, timeout, *args, **kwargs)
    return __init__


def new_group_with_timeout(original):
    """TorchBackend.new_group(ranks) making the group with the backend's recorded timeout (torch's default when
    none was recorded). DeepSpeed's own method is ``torch.distributed.new_group(ranks)`` and nothing more."""

    @functools.wraps(original)
    def new_group(backend, ranks):
        import torch.distributed

        return torch.distributed.new_group(ranks, timeout=getattr(backend, "gradpower_timeout", None))
    return new_group
