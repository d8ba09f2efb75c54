"""A CPU stand-in for torch.cuda.CUDAGraph with its semantics, for testing infinitystar.cuda_graphs without a GPU.

Capture records every aten op with the very tensors it read and wrote. Replay runs the recorded ops again on
those tensors and writes each result into the recorded output, so a replay sees new data only where it was
written into a tensor the capture read (static inputs, K/V homes), as a CUDA graph sees memory at fixed
addresses. What capture computed is poisoned (NaN), since a real capture runs no kernel; an op that needs the
host to read device data (``.item()``, ``nonzero``) fails, as it would break a real capture.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_SYNCS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero"}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SYNCS:
            raise RuntimeError(f"aten.{name} reads device data on the host: not allowed inside a CUDA graph capture")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class EmulatedGraphBackend:
    device_type = "cpu"

    def __init__(self):
        self.pool = None
        self.captures = 0
        self.replays = 0

    def capture(self, fn, device):
        with _Recorder() as rec:
            out = fn()
        external, made, made_ids = set(), [], set()
        for _, args, kwargs, produced in rec.ops:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and id(t) not in made_ids:
                    external.add(id(t))  # read before any recorded op made it: a static input, weight or home
            for t in tree_flatten(produced)[0]:
                if isinstance(t, torch.Tensor):
                    made.append(t)
                    made_ids.add(id(t))
        for t in made:  # a capture runs nothing: its results are not there yet
            if id(t) not in external and t.is_floating_point() and t._base is None:
                t.fill_(float("nan"))
        self.captures += 1
        return rec.ops, out

    def replay(self, ops) -> None:
        self.replays += 1
        for func, args, kwargs, recorded in ops:
            fresh = func(*args, **kwargs)
            for old, new in zip(tree_flatten(recorded)[0], tree_flatten(fresh)[0]):
                if (isinstance(old, torch.Tensor) and old is not new
                        and old.untyped_storage().data_ptr() != new.untyped_storage().data_ptr()):
                    old.copy_(new)
