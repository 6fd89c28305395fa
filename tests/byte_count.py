"""ByteCount: the bytes every aten op under it reads and writes, counted at the dispatcher (a test utility).

A step's memory traffic, as its launch plan implies it: each op reads its tensor arguments (each
distinct tensor once) and writes the arguments its schema marks as mutated plus the new tensors it
returns; views and scalar reads move nothing. It counts what torch's eager ops are asked to move,
not what a device's caches save, so it is exact and the same on every machine.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


class ByteCount(TorchDispatchMode):
    """Records (op name, bytes read, bytes written) for every op dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func._schema.name == "aten::_local_scalar_dense":
            return out
        read, written = {}, {}
        for i, argument in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            for t in _tensors(value):
                key = (t.data_ptr(), t.numel(), t.dtype)
                if t.dim():  # 0-d tensors (step counts, scalars) are not the traffic of a step
                    read[key] = t.nbytes
                    if argument.alias_info is not None and argument.alias_info.is_write:
                        written[key] = t.nbytes
        for t in _tensors(out):
            key = (t.data_ptr(), t.numel(), t.dtype)
            if t.dim() and key not in read:
                written[key] = t.nbytes
        self.ops.append((func._schema.name, sum(read.values()), sum(written.values())))
        return out

    def total_bytes(self) -> int:
        """Bytes read plus bytes written by every op recorded."""
        return sum(r + w for _, r, w in self.ops)
