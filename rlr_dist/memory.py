"""Bytes autograd holds for backward: a saved-tensor counter used by the learner's observability, the
planner's calibration and the benchmarks.

Each tensor autograd saves is wrapped (``torch.autograd.graph.saved_tensors_hooks``) in a holder that adds
its storage's bytes to a live counter (views of one storage count once) and subtracts them when autograd
drops it; the peak of that counter is the activation memory of whatever ran inside the context.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

MB = 2**20



class _Held:
    """A saved tensor as autograd keeps it; its storage is counted while any holder of it lives."""

    __slots__ = ("meter", "t", "key")

    def __init__(self, meter: "SavedTensorMeter", t: Tensor, key, nbytes: int) -> None:
        self.meter, self.t, self.key = meter, t, key
        meter._acquire(key, nbytes)

    def __del__(self) -> None:
        self.meter._release(self.key)


def _storage_key(t: Tensor):
    st = t.untyped_storage()
    return (t.device.type, t.device.index, st.data_ptr()), st.nbytes()


class SavedTensorMeter:
    """Live and peak bytes of the storages autograd holds for backward (while the context is active).

    ``exclude``: tensors whose storages are not counted (memory that exists anyway).
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.excluded = set()
        for t in exclude:
            if isinstance(t, Tensor):
                self.excluded.add(_storage_key(t)[0])
        self.live = 0
        self.peak = 0
        self.refs: dict = {}
        self.sizes: dict = {}
        self._ctx = None

    def _acquire(self, key, nbytes: int) -> None:
        n = self.refs.get(key, 0)
        self.refs[key] = n + 1
        if n == 0:
            self.sizes[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def _release(self, key) -> None:
        n = self.refs[key] - 1
        if n:
            self.refs[key] = n
        else:
            del self.refs[key]
            self.live -= self.sizes.pop(key)

    def _pack(self, t: Tensor):
        try:
            key, nbytes = _storage_key(t)
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            return t
        if key in self.excluded or nbytes == 0:
            return t
        return _Held(self, t, key, nbytes)

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Held) else h

    def reset_peak(self) -> None:
        self.peak = self.live

    def __enter__(self) -> "SavedTensorMeter":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        self._ctx = None
