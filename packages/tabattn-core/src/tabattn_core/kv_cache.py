"""KV-cache layout for shared-context decoding (joint sampling of S paths per dataset)."""

from __future__ import annotations

import torch

from tabattn_core.checks import FLOAT_DTYPES, InputError, check_lengths, check_tensor

__all__ = ["SharedContextKVCache"]


def _check_count(name: str, value: object, *, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InputError(f"{name}: expected an int >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise InputError(f"{name}: expected an int in [{lo}, {hi}], got {value}")
    return value


class SharedContextKVCache:
    """Preallocated K/V of every layer: one context per dataset, one buffer per sample path.

    Storage (one allocation each, zero-initialised, written in place; index 0/1 of the
    second axis is K/V):

        context_kv: [L, 2, G, H_kv, Nc_cap, D]     context of each of G datasets, computed
                                                    once and shared by its S sample paths
        buffer_kv:  [L, 2, G, S, H_kv, T_cap, D]    autoregressive rows of each sample path
        context_lens: int64 [G]                     valid context rows per dataset (<= Nc_cap)
        buffer_len: int                             committed buffer rows, equal for all paths

    Memory is the context once plus S buffers per dataset (see `nbytes`). A decode step
    writes each layer's new rows with `write_buffer` at `buffer_len`, then calls `commit(n)`
    once. The same layout holds one context per sample path: G = B, S = 1.
    """

    def __init__(self, *, context_kv: torch.Tensor, buffer_kv: torch.Tensor) -> None:
        """Wrap existing storage (see the class docstring); `allocate` is the usual entry."""
        check_tensor(
            "context_kv",
            context_kv,
            shape=(None, 2, None, None, None, None),
            dtypes=FLOAT_DTYPES,
            dims="[L, 2, G, H_kv, Nc_cap, D]",
        )
        L, _, G, H, _, D = context_kv.shape
        check_tensor(
            "buffer_kv",
            buffer_kv,
            shape=(L, 2, G, None, H, None, D),
            dtypes=(context_kv.dtype,),
            device=context_kv.device,
            dims="[L, 2, G, S, H_kv, T_cap, D]",
        )
        self.context_kv = context_kv
        self.buffer_kv = buffer_kv
        self.context_lens = torch.zeros(G, dtype=torch.int64, device=context_kv.device)
        self.context_width = 0
        self.buffer_len = 0

    @classmethod
    def allocate(
        cls,
        *,
        num_layers: int,
        num_datasets: int,
        num_samples: int,
        kv_heads: int,
        head_dim: int,
        context_capacity: int,
        buffer_capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> SharedContextKVCache:
        """Zero-filled cache with context [L, 2, G, H_kv, Nc_cap, D] and buffer
        [L, 2, G, S, H_kv, T_cap, D] (L = num_layers, G = num_datasets, S = num_samples,
        Nc_cap = context_capacity, T_cap = buffer_capacity)."""
        L = _check_count("num_layers", num_layers, lo=1)
        G = _check_count("num_datasets", num_datasets, lo=1)
        S = _check_count("num_samples", num_samples, lo=1)
        H = _check_count("kv_heads", kv_heads, lo=1)
        D = _check_count("head_dim", head_dim, lo=1)
        nc = _check_count("context_capacity", context_capacity, lo=0)
        t = _check_count("buffer_capacity", buffer_capacity, lo=0)
        if dtype not in FLOAT_DTYPES:
            raise InputError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
        device = torch.device(device)
        return cls(
            context_kv=torch.zeros(L, 2, G, H, nc, D, dtype=dtype, device=device),
            buffer_kv=torch.zeros(L, 2, G, S, H, t, D, dtype=dtype, device=device),
        )

    @property
    def num_layers(self) -> int:
        """L (layers)."""
        return self.context_kv.shape[0]

    @property
    def num_datasets(self) -> int:
        """G (datasets)."""
        return self.context_kv.shape[2]

    @property
    def num_samples(self) -> int:
        """S (sample paths per dataset)."""
        return self.buffer_kv.shape[3]

    @property
    def kv_heads(self) -> int:
        """H_kv (K/V heads)."""
        return self.context_kv.shape[3]

    @property
    def head_dim(self) -> int:
        """D (head dim)."""
        return self.context_kv.shape[5]

    @property
    def context_capacity(self) -> int:
        """Nc_cap (context rows per dataset)."""
        return self.context_kv.shape[4]

    @property
    def buffer_capacity(self) -> int:
        """T_cap (buffer rows per sample path)."""
        return self.buffer_kv.shape[5]

    @property
    def dtype(self) -> torch.dtype:
        """K/V dtype."""
        return self.context_kv.dtype

    @property
    def device(self) -> torch.device:
        """K/V device."""
        return self.context_kv.device

    @property
    def nbytes(self) -> int:
        """Bytes of K/V storage: L * 2 * G * H_kv * D * (Nc_cap + S * T_cap) * itemsize
        (the [G] lengths tensor excluded)."""
        return self.context_kv.nbytes + self.buffer_kv.nbytes

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(L={self.num_layers}, G={self.num_datasets}, "
            f"S={self.num_samples}, H_kv={self.kv_heads}, D={self.head_dim}, "
            f"context={self.context_width}/{self.context_capacity}, "
            f"buffer={self.buffer_len}/{self.buffer_capacity}, "
            f"{str(self.dtype).removeprefix('torch.')}, {self.device}, "
            f"{self.nbytes / 2**20:.2f} MiB)"
        )

    def _layer(self, layer: object) -> int:
        return _check_count("layer", layer, lo=0, hi=self.num_layers - 1)

    def _check_kv(self, k: object, v: object, shape: tuple[int | None, ...], dims: str) -> None:
        check_tensor("k", k, shape=shape, dtypes=(self.dtype,), device=self.device, dims=dims)
        check_tensor(
            "v", v, shape=tuple(k.shape), dtypes=(self.dtype,), device=self.device, dims=dims
        )

    def write_context(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        context_lens: torch.Tensor | None = None,
    ) -> None:
        """Write one layer's context K/V: k, v [G, H_kv, Nc, D] (Nc <= Nc_cap) into rows
        [0, Nc); context_lens int [G] (each <= Nc, default Nc). Rows at or beyond each
        dataset's length, up to Nc_cap, are zeroed. Sets the cache-wide `context_lens` and
        `context_width` = Nc: write every layer with the same Nc and lengths."""
        layer = self._layer(layer)
        G, H, D = self.num_datasets, self.kv_heads, self.head_dim
        self._check_kv(k, v, (G, H, None, D), "[G, H_kv, Nc, D]")
        nc = k.shape[2]
        if nc > self.context_capacity:
            raise InputError(
                f"k: expected at most context_capacity = {self.context_capacity} context rows "
                f"(dim 2 of [G, H_kv, Nc, D]), got {nc}"
            )
        if context_lens is not None:
            check_lengths("context_lens", context_lens, count=G, max_len=nc, device=self.device)
        store = self.context_kv[layer]  # [2, G, H_kv, Nc_cap, D]
        store[0, :, :, :nc].copy_(k)
        store[1, :, :, :nc].copy_(v)
        rows = torch.arange(self.context_capacity, device=self.device)
        if context_lens is None:
            self.context_lens.fill_(nc)
        else:
            self.context_lens.copy_(context_lens)
        stale = rows[None, :] >= self.context_lens[:, None]  # [G, Nc_cap]
        store.masked_fill_(stale[None, :, None, :, None], 0)
        self.context_width = nc

    def write_buffer(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        start: int | torch.Tensor | None = None,
    ) -> None:
        """Write one layer's new buffer K/V: k, v [G, S, H_kv, n, D] into slots
        [start, start + n) (start defaults to `buffer_len`, at most `buffer_len`).
        A 0-dim int tensor `start` on the cache's device is used on the device without a
        host sync (CUDA-graph capture); it is not checked against `buffer_len`, and slots
        past `buffer_capacity` fail as an index error on the device.
        Does not advance `buffer_len`; call `commit` once all layers are written."""
        layer = self._layer(layer)
        G, S, H, D = self.num_datasets, self.num_samples, self.kv_heads, self.head_dim
        self._check_kv(k, v, (G, S, H, None, D), "[G, S, H_kv, n, D]")
        n = k.shape[3]
        if isinstance(start, torch.Tensor):
            check_tensor(
                "start", start, shape=(), dtypes=(torch.int32, torch.int64), device=self.device
            )
            slots = start + torch.arange(n, device=self.device)
            self.buffer_kv[layer, 0].index_copy_(3, slots, k)
            self.buffer_kv[layer, 1].index_copy_(3, slots, v)
            return
        start = self.buffer_len if start is None else start
        start = _check_count("start", start, lo=0, hi=self.buffer_len)
        if start + n > self.buffer_capacity:
            raise InputError(
                f"k: expected start + n <= buffer_capacity = {self.buffer_capacity} "
                f"(n = dim 3 of [G, S, H_kv, n, D]), got start {start} + n {n} = {start + n}"
            )
        self.buffer_kv[layer, 0, :, :, :, start : start + n].copy_(k)
        self.buffer_kv[layer, 1, :, :, :, start : start + n].copy_(v)

    def commit(self, n: int) -> None:
        """Advance `buffer_len` by n rows (all sample paths together)."""
        n = _check_count("n", n, lo=0, hi=self.buffer_capacity - self.buffer_len)
        self.buffer_len += n

    def reset(self) -> None:
        """Forget the buffer (`buffer_len` = 0); the contexts are kept."""
        self.buffer_len = 0

    def context(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (no copy) of one layer's context: (k [G, H_kv, Nc, D], v, context_lens [G]),
        Nc = `context_width`; rows at or beyond each dataset's length are zero."""
        layer = self._layer(layer)
        kv = self.context_kv[layer, :, :, :, : self.context_width]
        return kv[0], kv[1], self.context_lens

    def buffer(self, layer: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (no copy) of one layer's buffer: (k [G, S, H_kv, length, D], v);
        length defaults to `buffer_len` and is at most `buffer_capacity`."""
        layer = self._layer(layer)
        length = self.buffer_len if length is None else length
        length = _check_count("length", length, lo=0, hi=self.buffer_capacity)
        kv = self.buffer_kv[layer, :, :, :, :, :length]
        return kv[0], kv[1]
