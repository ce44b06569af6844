"""Counting the host syncs of a piece of work, on any device (tests and tools/bench_gpu.py).

A host sync is the CPU waiting for a tensor's value: `.item()`, `float(t)`, `if t.any():`, a boolean
mask (its output size depends on the values), `nonzero`. On a GPU each one drains the launch queue,
so a training step or a sampling loop should have none. CUDA can report
them itself (`torch.cuda.set_sync_debug_mode`); the dispatch-level count below also works on the CPU,
where tests run. `.tolist()` of a CPU tensor reads memory without dispatching and is not seen.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators whose result the host must wait for, whatever the device.
SYNCING_OPS = {
    torch.ops.aten._local_scalar_dense.default,  # item(), float(), int(), bool(), if tensor:
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_consecutive.default,
}


def _is_host_sync(func, args: tuple, kwargs: dict) -> bool:
    if func in SYNCING_OPS:
        return True
    if func is torch.ops.aten.index.Tensor:  # x[mask]: the output size is the number of True values
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
        # A device tensor copied to the host (t.cpu(), t.tolist() of a GPU tensor).
        source = args[1] if func is torch.ops.aten.copy_.default else args[0]
        target = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
        return source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"
    return False


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter() as syncs: ...` then `syncs.count` (and `syncs.ops`, their names)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    @property
    def count(self) -> int:
        return len(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_host_sync(func, args, kwargs):
            self.ops.append(str(func))
        return func(*args, **kwargs)
