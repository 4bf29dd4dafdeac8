"""SharedContextKVCache: in-place buffer writes, aliasing views, errors."""

from __future__ import annotations

import pytest
import torch

from tabattn_core.checks import InputError
from tabattn_core.kv_cache import SharedContextKVCache

L, G, S, H, D, T = 2, 3, 4, 2, 48, 6


def make_cache(**overrides):
    sizes = dict(
        num_layers=L,
        num_datasets=G,
        num_samples=S,
        kv_heads=H,
        head_dim=D,
        buffer_capacity=T,
        dtype=torch.float32,
        device="cpu",
    )
    return SharedContextKVCache.allocate(**(sizes | overrides))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def shares_storage(view, base):
    """`view` is a view into `base`'s memory (no copy)."""
    start, end = base.data_ptr(), base.data_ptr() + base.nbytes
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() and (
        view.numel() == 0 or start <= view.data_ptr() < end
    )


def test_allocate_shapes_and_repr():
    cache = make_cache()
    assert cache.buffer_kv.shape == (L, 2, G, S, H, T, D)
    assert cache.buffer_len == 0
    assert (cache.num_layers, cache.num_datasets, cache.num_samples) == (L, G, S)
    assert (cache.kv_heads, cache.head_dim) == (H, D)
    assert cache.buffer_capacity == T
    assert cache.dtype == torch.float32 and cache.device == torch.device("cpu")
    assert not cache.buffer_kv.any()
    text = repr(cache)
    assert text.startswith("SharedContextKVCache(") and f"S={S}" in text and "float32" in text


def test_round_trip_write_commit_reset():
    cache = make_cache()
    steps = [randn(2, G, S, H, 1, D, seed=10 + i) for i in range(3)] + [
        randn(2, G, S, H, 3, D, seed=20)
    ]
    for step in steps:
        for layer in range(L):
            cache.write_buffer(layer, step[0] + layer, step[1] - layer)
        cache.commit(step.shape[4])
    assert cache.buffer_len == T
    expect = torch.cat(steps, dim=4)
    for layer in range(L):
        kb, vb = cache.buffer(layer)
        assert kb.shape == (G, S, H, T, D)
        assert torch.equal(kb, expect[0] + layer) and torch.equal(vb, expect[1] - layer)
        assert cache.buffer(layer, length=2)[0].shape == (G, S, H, 2, D)
    cache.reset()
    assert cache.buffer_len == 0 and cache.buffer(0)[0].shape == (G, S, H, 0, D)
    # Overwriting at an earlier slot (start < buffer_len) is allowed.
    cache.commit(2)
    new = randn(G, S, H, 1, D, seed=30)
    cache.write_buffer(0, new, new, start=1)
    assert torch.equal(cache.buffer(0)[0][:, :, :, 1:2], new)
    # A device tensor start (CUDA-graph decode) writes the same slots without a host sync.
    two = randn(2, G, S, H, 2, D, seed=31)
    cache.write_buffer(1, two[0], two[1], start=torch.tensor(2))
    kb, vb = cache.buffer(1, length=4)
    assert torch.equal(kb[:, :, :, 2:4], two[0]) and torch.equal(vb[:, :, :, 2:4], two[1])
    with pytest.raises(InputError, match="start"):
        cache.write_buffer(1, two[0], two[1], start=torch.tensor([2]))


def test_views_alias_storage():
    cache = make_cache()
    cache.commit(3)
    kb, vb = cache.buffer(1)
    for view in (kb, vb):
        assert shares_storage(view, cache.buffer_kv[1])
    assert kb.data_ptr() == cache.buffer_kv[1, 0].data_ptr()
    assert vb.data_ptr() == cache.buffer_kv[1, 1].data_ptr()
    # Writes through the storage are visible in the views and vice versa (no copy).
    cache.buffer_kv[1, 0, 2, 1, 1, 2, 7] = 123.0
    assert kb[2, 1, 1, 2, 7] == 123.0
    vb[0, 3, 1, 2, 5] = -7.0
    assert cache.buffer_kv[1, 1, 0, 3, 1, 2, 5] == -7.0
    # The writes themselves reuse the one allocation.
    buf_ptr = cache.buffer_kv.data_ptr()
    cache.write_buffer(0, randn(G, S, H, 2, D), randn(G, S, H, 2, D))
    assert cache.buffer_kv.data_ptr() == buf_ptr


def test_one_context_per_path_layout():
    cache = make_cache(num_datasets=5, num_samples=1)
    cache.write_buffer(0, randn(5, 1, H, 1, D), randn(5, 1, H, 1, D))
    cache.commit(1)
    assert cache.buffer(0)[0].shape == (5, 1, H, 1, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("samples", [1, 4, 64])
def test_nbytes_shares_context_once(dtype, samples):
    cache = make_cache(num_samples=samples, dtype=dtype)
    item = torch.empty((), dtype=dtype).element_size()
    buffer_bytes_per_path = L * 2 * G * H * T * D * item
    assert cache.nbytes == samples * buffer_bytes_per_path
    assert cache.nbytes == cache.buffer_kv.nbytes


def test_empty_buffer_capacity():
    cache = make_cache(buffer_capacity=0)
    assert cache.buffer(0)[0].shape == (G, S, H, 0, D)
    cache.commit(0)
    with pytest.raises(InputError, match=r"^n: expected an int in \[0, 0\], got 1"):
        cache.commit(1)


def kv(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


BUF = (G, S, H, 1, D)
ALLOC = dict(
    num_layers=L,
    num_datasets=G,
    num_samples=S,
    kv_heads=H,
    head_dim=D,
    buffer_capacity=T,
)


@pytest.mark.parametrize(
    ("call", "arg"),
    [
        (lambda c: c.write_buffer(L, *kv(*BUF)), "layer"),
        (lambda c: c.write_buffer(-1, *kv(*BUF)), "layer"),
        (lambda c: c.buffer(L), "layer"),
        (lambda c: c.buffer(1.0), "layer"),
        (lambda c: c.write_buffer(0, *kv(G, S + 1, H, 1, D)), "k"),
        (lambda c: c.write_buffer(0, *kv(G, S, H + 1, 1, D)), "k"),
        (lambda c: c.write_buffer(0, *kv(G, S, H, 1, D - 1)), "k"),
        (lambda c: c.write_buffer(0, *kv(G, H, 1, D)), "k"),
        (lambda c: c.write_buffer(0, *kv(*BUF, dtype=torch.float64)), "k"),
        (lambda c: c.write_buffer(0, *kv(G, S, H, T + 1, D)), "k"),
        (lambda c: c.write_buffer(0, torch.zeros(BUF), torch.zeros(G, S, H, 2, D)), "v"),
        (lambda c: c.write_buffer(0, *kv(*BUF), start=1), "start"),
        (lambda c: c.write_buffer(0, *kv(*BUF), start=-1), "start"),
        (lambda c: c.commit(T + 1), "n"),
        (lambda c: c.commit(-1), "n"),
        (lambda c: c.buffer(0, length=T + 1), "length"),
    ],
)
def test_bad_input_names_argument(call, arg):
    cache = make_cache()
    before = (cache.buffer_kv.clone(), cache.buffer_len)
    with pytest.raises(InputError, match=rf"^{arg}: expected .* got"):
        call(cache)
    # Nothing was written before the error.
    assert torch.equal(cache.buffer_kv, before[0]) and cache.buffer_len == before[1]


def test_buffer_overflow_after_commits():
    cache = make_cache()
    cache.commit(T - 1)
    cache.write_buffer(0, *kv(*BUF))  # the last slot fits
    with pytest.raises(InputError, match=r"^k: expected start \+ n <= buffer_capacity = 6.*got"):
        cache.write_buffer(0, *kv(G, S, H, 2, D))
    with pytest.raises(InputError, match=r"^n: expected an int in \[0, 1\], got 2"):
        cache.commit(2)
    cache.commit(1)
    assert cache.buffer_len == T


def test_device_mismatch_names_argument():
    cache = make_cache()
    k, v = (torch.zeros(BUF, device="meta") for _ in range(2))
    with pytest.raises(InputError, match=r"^k: expected device cpu, got meta"):
        cache.write_buffer(0, k, v)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("num_layers", 0),
        ("num_datasets", 0),
        ("num_samples", 0),
        ("kv_heads", 0),
        ("head_dim", 0),
        ("buffer_capacity", -1),
        ("num_samples", 2.0),
        ("dtype", torch.int64),
    ],
)
def test_allocate_bad_sizes(name, value):
    with pytest.raises(InputError, match=rf"^{name}: expected .* got"):
        SharedContextKVCache.allocate(**(ALLOC | {name: value}))


def test_wrapping_storage_checks_layout():
    with pytest.raises(InputError, match=r"^buffer_kv: expected shape"):
        SharedContextKVCache(buffer_kv=torch.zeros(L, 3, G, S, H, T, D))
    with pytest.raises(InputError, match=r"^buffer_kv: expected"):
        SharedContextKVCache(buffer_kv=torch.zeros(L, 2, G, S, H, T))
    with pytest.raises(InputError, match=r"^buffer_kv: expected dtype"):
        SharedContextKVCache(buffer_kv=torch.zeros(L, 2, G, S, H, T, D, dtype=torch.int64))
