"""Counting host-device synchronisations in Python: on a GPU every Tensor.item, .tolist,
bool(t), a tensor built from a Python list or boolean-mask indexing stalls the launch queue. The
same calls are counted on the CPU, where they are the same Python calls."""
from __future__ import annotations

import torch

SYNCING_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
                   "nonzero")


class SyncCounter:
    """Counts calls that need a tensor's value on the host while `active` is set."""

    def __init__(self, monkeypatch):
        self.active, self.calls = False, []
        for name in SYNCING_METHODS:
            self._wrap(monkeypatch, torch.Tensor, name, name)
        for name in ("tensor", "as_tensor"):
            self._wrap(monkeypatch, torch, name, f"torch.{name}")
        for name in ("__getitem__", "__setitem__"):
            original = getattr(torch.Tensor, name)

            def indexed(tensor, index, *rest, _original=original, _name=name):
                parts = index if isinstance(index, tuple) else (index,)
                if self.active and any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                    self.calls.append(f"boolean mask {_name}")
                return _original(tensor, index, *rest)

            monkeypatch.setattr(torch.Tensor, name, indexed)

    def _wrap(self, monkeypatch, owner, name, label):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if self.active:
                self.calls.append(label)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
