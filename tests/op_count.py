"""Counting which aten ops execute (e.g. attention kernels, matmuls) while inside a `with OpCount(ops)` block."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OpCount(TorchDispatchMode):
    """Counts executed calls of `ops` (a result served from a checkpoint's store is not an execution)."""

    def __init__(self, ops):
        super().__init__()
        self.ops = frozenset(ops)
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.ops
        return func(*args, **(kwargs or {}))
