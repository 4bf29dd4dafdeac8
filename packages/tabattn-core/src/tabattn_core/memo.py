"""`TensorMemo`: values computed from tensors, reused while those tensor objects live on
unchanged (validated offsets, quantised contexts)."""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Hashable
from typing import Any

import torch

__all__ = ["TensorMemo"]


class TensorMemo:
    """Values keyed on the identity of some tensors plus a hashable `extra`.

    An entry holds its tensors by weak references, so it keeps none alive: when one is
    freed, the entry goes, and a new tensor at a freed one's address is a new key. An entry
    answers only while every tensor's `_version` (bumped by each in-place write) is the one
    it was stored at; writes that bypass the counter (through `.data`, DLPack or raw
    pointers) are not seen. Inference tensors have no version counter and are never
    memoised. At most `max_entries` (>= 1) entries, the oldest going first. Thread-safe.
    """

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: dict[tuple, tuple[tuple[weakref.ref, ...], tuple[int, ...], Any]] = {}
        # Reentrant: a weakref callback (`_drop`) may run inside a locked section (gc).
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tensors: tuple[torch.Tensor, ...], extra: Hashable = ()) -> Any | None:
        """The value stored for these very tensors, unchanged, and `extra`; else None."""
        if any(t.is_inference() for t in tensors):
            return None
        with self._lock:
            entry = self._entries.get((*map(id, tensors), extra))
        if (
            entry is not None
            and all(ref() is t for ref, t in zip(entry[0], tensors, strict=True))
            and entry[1] == tuple(t._version for t in tensors)
        ):
            return entry[2]
        return None

    def store(self, tensors: tuple[torch.Tensor, ...], extra: Hashable, value: Any) -> None:
        """Remember `value` for these tensors as they are now, and `extra`."""
        if any(t.is_inference() for t in tensors):
            return
        key = (*map(id, tensors), extra)
        drop = functools.partial(self._drop, key)
        refs = tuple(weakref.ref(t, drop) for t in tensors)
        versions = tuple(t._version for t in tensors)
        with self._lock:
            self._entries.pop(key, None)  # a stale entry goes; the new one is the newest
            self._entries[key] = (refs, versions, value)
            for old in list(self._entries)[: -self.max_entries]:
                self._entries.pop(old, None)

    def _drop(self, key: tuple, ref: weakref.ref) -> None:
        """Weakref callback: a tensor of the entry at `key` was freed."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and any(r is ref for r in entry[0]):
                del self._entries[key]
