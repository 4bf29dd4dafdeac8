"""KV-cache layout for shared-context decoding (joint sampling of S paths per dataset): the
per-path buffers; the shared context K/V stay with the caller."""

from __future__ import annotations

import torch

from tabattn_core.checks import FLOAT_DTYPES, InputError, check_tensor

__all__ = ["SharedContextKVCache"]


def _check_count(name: str, value: object, *, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InputError(f"{name}: expected an int >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise InputError(f"{name}: expected an int in [{lo}, {hi}], got {value}")
    return value


class SharedContextKVCache:
    """Preallocated buffer K/V of every layer for shared-context decoding: one buffer per
    sample path. The context K/V, computed once per dataset and shared by its S sample
    paths, are not copied here: the caller keeps them and passes them to the decode op.

    Storage (one allocation, zero-initialised, written in place; index 0/1 of the second
    axis is K/V):

        buffer_kv:  [L, 2, G, S, H_kv, T_cap, D]    autoregressive rows of each sample path
        buffer_len: int                             committed buffer rows, equal for all paths

    A decode step writes each layer's new rows with `write_buffer` at `buffer_len`, then
    calls `commit(n)` once.
    """

    def __init__(self, *, buffer_kv: torch.Tensor) -> None:
        """Wrap existing storage (see the class docstring); `allocate` is the usual entry."""
        check_tensor(
            "buffer_kv",
            buffer_kv,
            shape=(None, 2, None, None, None, None, None),
            dtypes=FLOAT_DTYPES,
            dims="[L, 2, G, S, H_kv, T_cap, D]",
        )
        self.buffer_kv = buffer_kv
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
        buffer_capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> SharedContextKVCache:
        """Zero-filled cache with buffer [L, 2, G, S, H_kv, T_cap, D] (L = num_layers,
        G = num_datasets, S = num_samples, T_cap = buffer_capacity)."""
        L = _check_count("num_layers", num_layers, lo=1)
        G = _check_count("num_datasets", num_datasets, lo=1)
        S = _check_count("num_samples", num_samples, lo=1)
        H = _check_count("kv_heads", kv_heads, lo=1)
        D = _check_count("head_dim", head_dim, lo=1)
        t = _check_count("buffer_capacity", buffer_capacity, lo=0)
        if dtype not in FLOAT_DTYPES:
            raise InputError(f"dtype: expected one of {FLOAT_DTYPES}, got {dtype}")
        return cls(buffer_kv=torch.zeros(L, 2, G, S, H, t, D, dtype=dtype, device=device))

    @property
    def num_layers(self) -> int:
        """L (layers)."""
        return self.buffer_kv.shape[0]

    @property
    def num_datasets(self) -> int:
        """G (datasets)."""
        return self.buffer_kv.shape[2]

    @property
    def num_samples(self) -> int:
        """S (sample paths per dataset)."""
        return self.buffer_kv.shape[3]

    @property
    def kv_heads(self) -> int:
        """H_kv (K/V heads)."""
        return self.buffer_kv.shape[4]

    @property
    def head_dim(self) -> int:
        """D (head dim)."""
        return self.buffer_kv.shape[6]

    @property
    def buffer_capacity(self) -> int:
        """T_cap (buffer rows per sample path)."""
        return self.buffer_kv.shape[5]

    @property
    def dtype(self) -> torch.dtype:
        """K/V dtype."""
        return self.buffer_kv.dtype

    @property
    def device(self) -> torch.device:
        """K/V device."""
        return self.buffer_kv.device

    @property
    def nbytes(self) -> int:
        """Bytes of K/V storage: L * 2 * G * S * H_kv * T_cap * D * itemsize."""
        return self.buffer_kv.nbytes

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(L={self.num_layers}, G={self.num_datasets}, "
            f"S={self.num_samples}, H_kv={self.kv_heads}, D={self.head_dim}, "
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
        """Forget the buffer (`buffer_len` = 0)."""
        self.buffer_len = 0

    def buffer(self, layer: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (no copy) of one layer's buffer: (k [G, S, H_kv, length, D], v);
        length defaults to `buffer_len` and is at most `buffer_capacity`."""
        layer = self._layer(layer)
        length = self.buffer_len if length is None else length
        length = _check_count("length", length, lo=0, hi=self.buffer_capacity)
        kv = self.buffer_kv[layer, :, :, :, :, :length]
        return kv[0], kv[1]
