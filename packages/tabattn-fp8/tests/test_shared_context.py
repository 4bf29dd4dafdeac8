"""FP8 shared-context decode and teacher forcing. Every case is checked three ways against
references:

- the context part alone (`fp8_context_fwd`, P·V unquantised) against the FP8-emulated
  reference on the folded rows [G, H, S*Lq, D] at fp32 rounding (1e-5). This catches a
  wrong scale, fold, GQA map or context length;
- the public op against that same FP8 context part merged with the fp64 buffer reference
  (1e-5 on CPU). This catches the buffer part's wiring (buffer_len, row_rule, GQA) and the
  merge;
- the public op against fp64 attention (`tabattn_core.reference`) under the FP8 bounds of
  test_attention.py, and against the FP8-emulated split (P's E4M3 rounding left, 0.05).

CPU: the Triton interpreter with fp32 inputs and tiny, awkward shapes: odd lengths,
D = 48/80, G = 1, S = 1, Nc = 0, T = 0, one query row, GQA, per-dataset lengths, a fold
that spans two Q scale blocks. NaN-poisoned `torch.empty` comes from conftest. GPU (`-m
gpu`, Hopper): bf16 at the shapes of the triton tests and the bench.

The context cache (`QuantizedContextCache`): a context is quantised once for many calls,
and again after an in-place write, for a new tensor at a freed one's address, another
length or other options; it keeps no context alive. A cached call equals the same call on
copies of the context (new tensors, quantised anew). GPU: the predictor's two CUDA graphs,
and a graph replayed after its context is refilled in place.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import weakref

import pytest
import torch

from tabattn_core import masks
from tabattn_core import reference as core_reference
from tabattn_core.checks import InputError
from tabattn_core.registry import OPS, Registry
from tabattn_core.testing import assert_rel_close, rel_error
from tabattn_fp8 import backend, reference
from tabattn_fp8.attention import fp8_attention, fp8_context_target_attention
from tabattn_fp8.attention import interface as fp8_interface
from tabattn_fp8.attention.interface import P_FP8_DEFAULT
from tabattn_fp8.quantize.kernel import MEAN_SUBTRACT
from tabattn_fp8.shared_context import (
    fp8_shared_context_attention,
    fp8_teacher_forcing_attention,
)
from tabattn_fp8.shared_context import interface as sc_interface
from tabattn_fp8.shared_context.interface import QuantizedContextCache, fp8_context_fwd
from tabattn_triton.building_blocks import check_context_buffer_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The bounds of test_attention.py: FP8 against fp64 on Gaussian inputs (measured ~0.03-0.06;
# a 2x scale error gives > 0.3), its cosine, and the LSE.
FP8_REL_TOL = 0.08
FP8_COSINE = 0.996
LSE_REL_TOL = 1e-2
EMULATED_TOL = 1e-5  # P·V unquantised: the kernel is the emulation up to fp32 rounding
EMULATED_P_FP8_TOL = 0.05  # P in E4M3: rounding on the kernel's running max, not bit for bit
# bf16 on the GPU: P·V in bf16 and a bf16 out (test_attention.py's bound), fp32 LSEs of the
# same E4M3 scores summed in another order.
EMULATED_TOL_BF16, EMULATED_LSE_TOL_BF16 = 1e-2, 1e-3


def inputs(g, s, h, h_kv, lq, nc, t_cap, d, dtype=torch.float32):
    def r(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype)

    return (
        r(g, s, h, lq, d),
        r(g, h_kv, nc, d),
        r(g, h_kv, nc, d),
        r(g, s, h_kv, t_cap, d),
        r(g, s, h_kv, t_cap, d),
    )


def as64(args):
    return [None if t is None else t.double() for t in args]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten().to(a.device)
    return float(a @ b / (a.norm() * b.norm()))


def lens_arg(lens):
    return torch.tensor(lens, device=DEVICE) if isinstance(lens, list) else lens


def buffer_reference(q, k_ctx, v_ctx, k_buf, v_buf, *, teacher_forcing, **kw):
    """fp64 attention over the buffer alone (the core reference with Nc = 0); None without
    a buffer."""
    if k_buf is None:
        return None
    q, kc, vc, kb, vb = as64((q, k_ctx[:, :, :0], v_ctx[:, :, :0], k_buf, v_buf))
    if teacher_forcing:
        return core_reference.teacher_forcing_attention(q, kc, vc, kb, vb)
    return core_reference.shared_context_attention(q, kc, vc, kb, vb, **kw)


def unfold(out, lse, s, lq):
    """[G, H, S*Lq, ...] -> [G, S, H, Lq, ...]."""
    return out.unflatten(2, (s, lq)).transpose(1, 2), lse.unflatten(2, (s, lq)).transpose(1, 2)


def emulated_context(q, k_ctx, v_ctx, context_lens, *, p_fp8):
    """FP8-emulated context part (`tabattn_fp8.reference.attention`) on the rows
    [G, H, S*Lq, D], fp64; None when no row sees a context key. An int length slices the
    keys, as the op does; per-dataset lengths use the context-target mask over all Nc."""
    g, s, h, lq, d = q.shape
    nc = k_ctx.shape[2]
    lens = nc if context_lens is None else context_lens
    mask = None
    if isinstance(lens, int):
        k_ctx, v_ctx = k_ctx[:, :, :lens], v_ctx[:, :, :lens]
    else:
        mask = masks.ContextTargetMask(s * lq, nc, lens.cpu())
    if k_ctx.shape[2] == 0:
        return None
    rows = q.transpose(1, 2).reshape(g, h, s * lq, d)
    return unfold(*reference.attention(rows, k_ctx, v_ctx, mask=mask, quantize_v=p_fp8), s, lq)


def merged(context, buffer, q):
    """The two parts merged by LSE (fp64); neither: out 0, LSE -inf."""
    if context is None and buffer is None:
        lse = torch.full(q.shape[:4], float("-inf"), dtype=torch.float64, device=q.device)
        return torch.zeros(q.shape, dtype=torch.float64, device=q.device), lse
    if context is None or buffer is None:
        return context if buffer is None else buffer
    return core_reference.merge_states(*(t.double() for t in context), *buffer)


def context_part(args, context_lens, need_buffer, *, p_fp8):
    """The op's FP8 context part alone (its launcher layer, P·V as asked)."""
    q, k_ctx, v_ctx, k_buf, v_buf = args
    group, ctx_len, ctx_lens = check_context_buffer_inputs(
        q, k_ctx, v_ctx, k_buf, v_buf, context_lens, need_buffer=need_buffer, q_dims="q"
    )
    if ctx_len == 0:
        return None
    scale = q.shape[-1] ** -0.5
    return fp8_context_fwd(q, k_ctx, v_ctx, ctx_len, ctx_lens, group, scale, p_fp8=p_fp8)


def check_against_references(got, args, context_lens, need_buffer, *, teacher_forcing, **kw):
    """The three checks of the module docstring for one call of an op (`got`)."""
    out, lse = got
    q, k_ctx, v_ctx = args[:3]
    assert out.shape == q.shape and lse.shape == q.shape[:4]
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    exact_fn = (
        core_reference.teacher_forcing_attention
        if teacher_forcing
        else core_reference.shared_context_attention
    )
    ref_out, ref_lse = exact_fn(*as64(args), context_lens=context_lens, **kw)
    buffer = buffer_reference(*args, teacher_forcing=teacher_forcing, **kw)
    fp32 = q.dtype == torch.float32
    emu_tol = EMULATED_TOL if fp32 else EMULATED_TOL_BF16
    emu_lse_tol = EMULATED_TOL if fp32 else EMULATED_LSE_TOL_BF16
    # 1. the context part against its emulation at fp32 rounding
    ctx = context_part(args, context_lens, need_buffer, p_fp8=False)
    emu = emulated_context(q, k_ctx, v_ctx, context_lens, p_fp8=False)
    assert (ctx is None) == (emu is None)
    if ctx is not None:
        assert_rel_close(ctx[0], emu[0], tol=emu_tol, name="context out vs emulated")
        assert_rel_close(ctx[1], emu[1], tol=emu_lse_tol, name="context lse vs emulated")
    # 2. the op = its FP8 context part (the same kernel) merged with the exact buffer part
    if DEVICE == "cpu":
        same_ctx = context_part(args, context_lens, need_buffer, p_fp8=P_FP8_DEFAULT)
        want_out, want_lse = merged(same_ctx, buffer, q)
        assert_rel_close(out, want_out, tol=EMULATED_TOL, name="out vs fp8 context + buffer")
        assert_rel_close(lse, want_lse, tol=EMULATED_TOL, name="lse vs fp8 context + buffer")
    # 3. against fp64 attention and the FP8-emulated split
    assert_rel_close(out, ref_out, tol=FP8_REL_TOL, name="out vs fp64")
    assert_rel_close(lse, ref_lse, tol=LSE_REL_TOL, name="lse vs fp64")
    if torch.isfinite(ref_lse).any():
        assert cosine(out, ref_out) >= FP8_COSINE
    emu_out, emu_lse = merged(
        emulated_context(q, k_ctx, v_ctx, context_lens, p_fp8=P_FP8_DEFAULT), buffer, q
    )
    emu_out_tol = EMULATED_P_FP8_TOL if P_FP8_DEFAULT else emu_tol
    assert_rel_close(out, emu_out, tol=emu_out_tol, name="out vs emulated")
    assert_rel_close(lse, emu_lse, tol=emu_lse_tol, name="lse vs emulated")


DECODE_CASES = [
    # (G, S, H, H_kv, Lq, Nc, T, T_cap, D, rule, lens)
    (1, 5, 2, 2, 1, 37, 4, 6, 32, "causal", None),
    (2, 3, 4, 2, 2, 45, 3, 5, 48, ("causal", "strict"), [45, 7]),  # GQA, per-dataset M
    (2, 3, 2, 1, 1, 29, 5, 7, 16, "causal", [0, 29]),  # dataset 0 sees its buffer only
    (1, 4, 4, 2, 1, 33, 5, 5, 48, "causal", 20),  # one M < Nc: keys sliced
    (1, 3, 2, 1, 1, 0, 0, 2, 32, "causal", None),  # empty context, empty buffer
    (1, 7, 2, 1, 1, 0, 2, 2, 32, "strict", None),  # empty context
    (2, 3, 2, 2, 2, 21, 0, 3, 32, "causal", None),  # T = 0: the context alone
    (1, 1, 2, 2, 1, 33, 1, 1, 80, "strict", None),  # S = 1, one query row, D = 80
    (1, 2, 8, 1, 3, 40, 6, 8, 80, ("causal", "strict", "causal"), None),  # GQA 8:1
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c[:9])))
def test_decode_matches_references(case):
    g, s, h, h_kv, lq, nc, t, t_cap, d, rule, lens = case
    args = inputs(g, s, h, h_kv, lq, nc, t_cap, d)
    lens = lens_arg(lens)
    got = fp8_shared_context_attention(*args, buffer_len=t, context_lens=lens, row_rule=rule)
    check_against_references(got, args, lens, t, teacher_forcing=False, buffer_len=t, row_rule=rule)


TF_CASES = [
    # (G, S, H, H_kv, Nt, Nc, D, lens)
    (1, 3, 2, 2, 9, 17, 32, None),
    (2, 2, 4, 2, 5, 30, 48, [0, 30]),  # GQA, dataset 0 without context (tgt_0: no key)
    (1, 2, 2, 2, 1, 0, 32, None),  # empty context: the buffer part alone
    (1, 3, 2, 1, 3, 25, 80, 11),  # one M < Nc, D = 80
    (1, 1, 2, 2, 1, 19, 48, None),  # S = 1, Nt = 1
    (1, 3, 2, 1, 25, 40, 32, None),  # S*2*Nt = 150 rows: two Q scale blocks across samples
]


@pytest.mark.parametrize("case", TF_CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_teacher_forcing_matches_references(case):
    g, s, h, h_kv, nt, nc, d, lens = case
    args = inputs(g, s, h, h_kv, 2 * nt, nc, nt, d)
    lens = lens_arg(lens)
    got = fp8_teacher_forcing_attention(*args, context_lens=lens)
    check_against_references(got, args, lens, nt, teacher_forcing=True)


def test_decode_without_buffer_tensors():
    # k_buf = v_buf = None: the context part alone; with Nc = 0 as well, out 0 and LSE -inf.
    q, kc, vc, _, _ = inputs(2, 3, 4, 2, 2, 27, 1, 48)
    got = fp8_shared_context_attention(q, kc, vc)
    check_against_references(got, (q, kc, vc, None, None), None, 0, teacher_forcing=False)
    out, lse = fp8_shared_context_attention(q, kc[:, :, :0], vc[:, :, :0])
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
    out, lse = fp8_shared_context_attention(q, kc, vc, context_lens=0)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()


def test_decode_buffer_len_on_device():
    """A 0-dim device tensor buffer_len (the CUDA-graph decode) gives the int's result."""
    args = inputs(2, 3, 2, 1, 2, 19, 7, 32)
    rule = ("causal", "strict")
    for t in (2, 7):
        want = fp8_shared_context_attention(*args, buffer_len=t, row_rule=rule)
        got = fp8_shared_context_attention(
            *args, buffer_len=torch.tensor(t, device=DEVICE), row_rule=rule
        )
        assert_rel_close(got[0], want[0], tol=1e-6, name="out")
        assert_rel_close(got[1], want[1], tol=1e-6, name="lse")


def test_strided_q_in_the_models_layout():
    # The model's q is [G, S, Lq, H, D] transposed: the fold to [G, H, S*Lq, D] is a view.
    q, kc, vc, kb, vb = inputs(2, 3, 4, 2, 2, 31, 4, 32)
    q_model = q.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(q_model, q) and not q_model.is_contiguous()
    assert q_model.transpose(1, 2).reshape(2, 4, 6, 32).data_ptr() == q_model.data_ptr()
    want = fp8_shared_context_attention(q, kc, vc, kb, vb, buffer_len=4)
    got = fp8_shared_context_attention(q_model, kc, vc, kb, vb, buffer_len=4)
    assert_rel_close(got[0], want[0], tol=1e-6, name="out")
    assert_rel_close(got[1], want[1], tol=1e-6, name="lse")


def test_keys_past_one_context_length_are_never_read():
    # With one M the keys are sliced, so rows past M may hold anything (here NaN and huge
    # values, which would otherwise enter the K smoothing and the block scales).
    args = inputs(1, 3, 2, 2, 1, 40, 3, 32)
    q, kc, vc, kb, vb = args
    dirty_k, dirty_v = kc.clone(), vc.clone()
    dirty_k[:, :, 25:] = float("nan")
    dirty_v[:, :, 25:] = 1e4
    got = fp8_shared_context_attention(q, dirty_k, dirty_v, kb, vb, buffer_len=3, context_lens=25)
    want = fp8_shared_context_attention(*args, buffer_len=3, context_lens=25)
    assert torch.isfinite(got[0]).all()
    assert_rel_close(got[0], want[0], tol=1e-6, name="out")
    assert_rel_close(got[1], want[1], tol=1e-6, name="lse")


@pytest.mark.parametrize("factor", [2.0, 1.1])
def test_bounds_catch_a_wrong_k_scale(monkeypatch, factor):
    # The K block scales off by `factor` (scores scaled by it): the fp64 bounds above fail,
    # for the op's out and LSE alike.
    real = fp8_interface.quantize_fp8_launch

    def wrong_k_scale(x, **kwargs):
        quantized, row_dot = real(x, **kwargs)
        if kwargs.get("mean_mode") == MEAN_SUBTRACT:  # K (smoothed)
            quantized = dataclasses.replace(quantized, scales=quantized.scales * factor)
        return quantized, row_dot

    monkeypatch.setattr(fp8_interface, "quantize_fp8_launch", wrong_k_scale)
    args = inputs(1, 4, 2, 2, 1, 60, 3, 32)
    out, lse = fp8_shared_context_attention(*args, buffer_len=3)
    ref_out, ref_lse = core_reference.shared_context_attention(*as64(args), buffer_len=3)
    assert rel_error(out, ref_out) > FP8_REL_TOL
    assert rel_error(lse, ref_lse) > LSE_REL_TOL


def test_bad_input_named(monkeypatch):
    q, kc, vc, kb, vb = inputs(2, 3, 4, 2, 1, 5, 3, 32)
    q4 = torch.randn(2, 3, 4, 4, 32, device=DEVICE)
    decode, tf = fp8_shared_context_attention, fp8_teacher_forcing_attention
    cases = [
        (lambda: decode(q[0], kc, vc), "q"),
        (lambda: decode(q, kc[:1], vc[:1]), "k_ctx"),
        (lambda: decode(q, kc, vc[..., :16]), "v_ctx"),
        (lambda: decode(q, kc[:, :1].expand(2, 3, 5, 32), vc[:, :1].expand(2, 3, 5, 32)), "k_ctx"),
        (lambda: decode(q, kc, vc, buffer_len=2), "k_buf"),
        (lambda: decode(q, kc, vc, kb, vb, buffer_len=4), "k_buf"),
        (lambda: decode(q, kc, vc, kb, vb[:, :1]), "v_buf"),
        (lambda: decode(q, kc, vc, kb, vb, buffer_len=-1), "buffer_len"),
        (lambda: decode(q, kc, vc, kb, vb, buffer_len=torch.tensor([2])), "buffer_len"),
        (lambda: decode(q, kc, vc, kb, vb, buffer_len=1, row_rule="up"), "row_rule"),
        (lambda: decode(q, kc, vc, row_rule=("causal", "strict")), "row_rule"),
        (lambda: decode(q, kc, vc, context_lens=torch.tensor([9, 1], device=DEVICE)), "context_lens"),
        (lambda: decode(q, kc, vc, context_lens=6), "context_lens"),
        (lambda: decode(q.double(), kc.double(), vc.double()), "q"),
        (lambda: decode(q, kc.half(), vc.half()), "k_ctx"),
        (lambda: decode(q4.transpose(3, 4).contiguous().transpose(3, 4), kc, vc), "q: .*stride"),
        (lambda: decode(q.clone().requires_grad_(), kc, vc), "forward-only"),
        (lambda: tf(q, kc, vc, kb, vb), "q"),
        (lambda: tf(q4, kc, vc, kb, vb), "k_buf"),
        (lambda: tf(q4, kc, vc, None, None), "k_buf"),
        (lambda: tf(q4, kc, vc, kb[..., :2, :], vb[..., :2, :].clone().requires_grad_()), "forward-only"),
    ]  # fmt: skip
    for call, arg in cases:
        with pytest.raises(InputError, match=arg):
            call()
    # Under no_grad, tensors that require grad are fine (the predictor's sampling).
    with torch.no_grad():
        decode(q.clone().requires_grad_(), kc, vc)
    # Outside the interpreter a CPU tensor is not a Hopper GPU: require_sm90's error.
    monkeypatch.setattr("tabattn_fp8.attention.interface.interpreting", lambda: False)
    with pytest.raises(RuntimeError, match=r"sm90.*'cpu'"):
        decode(q, kc, vc)


def test_registered_in_the_fp8_backend():
    registry = Registry()
    backend.register(registry)
    fp8 = next(b for b in registry.backends() if b.name == "fp8")
    assert fp8.ops["shared_context_attention"] is fp8_shared_context_attention
    assert fp8.ops["teacher_forcing_attention"] is fp8_teacher_forcing_attention
    assert fp8.priority < 0 and not fp8.available(torch.device("cpu"))[0]
    # the registry's signatures: same parameters, names and defaults as the references
    for name, fn in (
        ("shared_context_attention", fp8_shared_context_attention),
        ("teacher_forcing_attention", fp8_teacher_forcing_attention),
    ):
        ref = inspect.signature(getattr(core_reference, name))
        got = inspect.signature(fn)
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == [
            (p.name, p.kind, p.default) for p in ref.parameters.values()
        ], (name, OPS[name])


# ---------------------------------------------------------------------------------------
# The context cache: quantise a context once for many calls


@pytest.fixture
def cache(monkeypatch):
    """The ops' context cache, fresh for the test, with `cache.quantised`: how many times
    it has quantised a context (calls of `fp8_quantize_kv`)."""
    fresh = QuantizedContextCache()
    fresh.quantised = 0
    real = sc_interface.fp8_quantize_kv

    def counting(*args, **kwargs):
        fresh.quantised += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(sc_interface, "QUANTIZED_CONTEXTS", fresh)
    monkeypatch.setattr(sc_interface, "fp8_quantize_kv", counting)
    return fresh


def uncached(op, q, k_ctx, v_ctx, *rest, **kwargs):
    """`op` on copies of the context: new tensors, quantised anew."""
    return op(q, k_ctx.clone(), v_ctx.clone(), *rest, **kwargs)


def assert_same(got, want, name):
    assert_rel_close(got[0], want[0], tol=1e-6, name=f"{name}: out")
    assert_rel_close(got[1], want[1], tol=1e-6, name=f"{name}: lse")


def alias(t):
    """A new tensor object over t's memory (same data_ptr), with a version counter of its own."""
    return torch.empty(0, device=t.device, dtype=t.dtype).set_(
        t.untyped_storage(), t.storage_offset(), t.shape, t.stride()
    )


def test_decode_steps_quantise_the_context_once(cache):
    q, kc, vc, kb, vb = inputs(1, 3, 2, 1, 1, 37, 5, 32)
    steps = [(torch.randn_like(q), t) for t in (1, 3, 5)]  # a new q every step
    got = [fp8_shared_context_attention(qt, kc, vc, kb, vb, buffer_len=t) for qt, t in steps]
    assert cache.quantised == 1 and len(cache) == 1
    for (qt, t), step in zip(steps, got, strict=True):
        want = uncached(fp8_shared_context_attention, qt, kc, vc, kb, vb, buffer_len=t)
        assert_same(step, want, f"T={t}")
    qt, t = steps[-1]
    check_against_references(
        got[-1], (qt, kc, vc, kb, vb), None, t, teacher_forcing=False, buffer_len=t
    )


def test_teacher_forcing_reuses_the_context(cache):
    q, kc, vc, kb, vb = inputs(1, 2, 2, 1, 6, 23, 3, 32)
    calls = [(torch.randn_like(q), torch.randn_like(kb), torch.randn_like(vb)) for _ in range(2)]
    got = [fp8_teacher_forcing_attention(qt, kc, vc, kbt, vbt) for qt, kbt, vbt in calls]
    assert cache.quantised == 1
    for (qt, kbt, vbt), one in zip(calls, got, strict=True):
        assert_same(one, uncached(fp8_teacher_forcing_attention, qt, kc, vc, kbt, vbt), "tf")


def test_in_place_write_requantises(cache):
    q, kc, vc, kb, vb = inputs(1, 3, 2, 2, 1, 29, 3, 32)
    first = fp8_shared_context_attention(q, kc, vc, kb, vb, buffer_len=3)
    kc.mul_(2)
    second = fp8_shared_context_attention(q, kc, vc, kb, vb, buffer_len=3)
    assert cache.quantised == 2 and len(cache) == 1  # the stale entry replaced
    assert rel_error(second[0], first[0]) > 0.05
    assert_same(
        second, uncached(fp8_shared_context_attention, q, kc, vc, kb, vb, buffer_len=3), "k"
    )
    vc[:, :, :5].add_(1)  # through a view: the same version counter
    third = fp8_shared_context_attention(q, kc, vc, kb, vb, buffer_len=3)
    assert cache.quantised == 4
    assert rel_error(third[0], second[0]) > 0.05
    assert_same(third, uncached(fp8_shared_context_attention, q, kc, vc, kb, vb, buffer_len=3), "v")


def test_new_context_at_the_same_address_misses(cache):
    # New tensor objects over the context's memory, each with the same data_ptr and _version
    # and new values (written through another object): only identity tells them apart,
    # while the old one lives and after it is freed.
    q, kc, vc, kb, vb = inputs(1, 3, 2, 1, 1, 31, 2, 32)

    def new_context():
        alias(kc).copy_(torch.randn_like(kc))
        return alias(kc)

    def decode(k_ctx):
        return fp8_shared_context_attention(q, k_ctx, vc, kb, vb, buffer_len=2)

    first = alias(kc)
    address = (first.data_ptr(), first._version)
    got = [decode(first)]
    second = new_context()  # the first still alive
    got.append(decode(second))
    assert cache.quantised == 2 and len(cache) == 2
    del first, second
    assert len(cache) == 0
    third = new_context()  # both freed
    got.append(decode(third))
    assert cache.quantised == 3
    assert (third.data_ptr(), third._version) == address
    assert rel_error(got[1][0], got[0][0]) > 0.05 and rel_error(got[2][0], got[1][0]) > 0.05
    assert_same(
        got[2], uncached(fp8_shared_context_attention, q, third, vc, kb, vb, buffer_len=2), "new"
    )


def test_cache_keeps_no_context_alive(cache):
    q, kc, vc, kb, vb = inputs(1, 2, 2, 1, 1, 19, 2, 32)
    fp8_shared_context_attention(q, kc, vc, kb, vb, buffer_len=2)
    assert len(cache) == 1
    refs = weakref.ref(kc), weakref.ref(vc)
    del kc, vc
    gc.collect()
    assert all(ref() is None for ref in refs) and len(cache) == 0


def test_context_lengths_key_the_rows_quantised(cache):
    # One length M slices the keys: each M is its own entry. Per-dataset lengths quantise
    # all Nc rows (the entry of M = Nc) and enter only the mask, per call.
    q, kc, vc, _, _ = inputs(2, 3, 2, 1, 1, 29, 1, 32)
    lengths = [20, 25, 20, None, [7, 29], [29, 3]]
    quantised = [1, 2, 2, 3, 3, 3]
    got = []
    for lens, count in zip(lengths, quantised, strict=True):
        lens = lens_arg(lens)
        got.append(fp8_shared_context_attention(q, kc, vc, context_lens=lens))
        assert cache.quantised == count, lens
    assert rel_error(got[-1][0], got[-2][0]) > 0.05
    for lens, one in zip(lengths, got, strict=True):
        lens = lens_arg(lens)
        want = uncached(fp8_shared_context_attention, q, kc, vc, context_lens=lens)
        assert_same(one, want, f"context_lens={lens}")


def test_options_key_the_quantisation(cache):
    q, kc, vc, _, _ = inputs(1, 2, 4, 2, 1, 27, 1, 32)
    scale = 32**-0.5
    options = [{}, {"p_fp8": not P_FP8_DEFAULT}, {"rotate": False}, {"smooth_k": False}, {}]
    got = [fp8_context_fwd(q, kc, vc, 27, None, 2, scale, **o) for o in options]
    assert cache.quantised == 4 and len(cache) == 4
    for o, one in zip(options, got, strict=True):
        assert_same(one, fp8_context_fwd(q, kc.clone(), vc.clone(), 27, None, 2, scale, **o), o)


def test_capture_and_eager_calls_keep_separate_entries(cache, monkeypatch):
    # A capture never reads an eager entry (its graph would not requantise a context
    # refilled in place), nor an eager call a captured one (empty until a replay).
    q, kc, vc, _, _ = inputs(1, 2, 2, 2, 1, 17, 1, 32)
    for is_capturing, count in ((False, 1), (True, 2), (True, 2), (False, 2)):
        monkeypatch.setattr(sc_interface, "capturing", lambda c=is_capturing: c)
        fp8_shared_context_attention(q, kc, vc)
        assert cache.quantised == count
    assert len(cache) == 2


def test_inference_tensors_are_not_cached(cache):
    # No version counter, so an in-place write could not be seen: quantised every call.
    with torch.inference_mode():
        q, kc, vc, kb, vb = inputs(1, 2, 2, 1, 1, 21, 2, 32)
        fp8_shared_context_attention(q, kc, vc, kb, vb, buffer_len=2)
        kc.mul_(2)
        got = fp8_shared_context_attention(q, kc, vc, kb, vb, buffer_len=2)
        want = uncached(fp8_shared_context_attention, q, kc, vc, kb, vb, buffer_len=2)
    assert cache.quantised == 3 and len(cache) == 0
    assert_same(got, want, "inference")


def test_cache_bounded(cache):
    cache.max_entries = 2
    contexts = [inputs(1, 2, 2, 2, 1, 17, 1, 32)[:3] for _ in range(3)]
    for q, kc, vc in contexts:
        fp8_shared_context_attention(q, kc, vc)
    assert cache.quantised == 3 and len(cache) == 2
    fp8_shared_context_attention(*contexts[2])  # the newest: kept
    assert cache.quantised == 3
    fp8_shared_context_attention(*contexts[0])  # the oldest: dropped
    assert cache.quantised == 4 and len(cache) == 2


def test_training_path_bypasses_the_cache(cache):
    q, k, v = (torch.randn(1, 2, 9, 32, device=DEVICE) for _ in range(3))
    for _ in range(2):
        fp8_attention(q, k, v)
        fp8_context_target_attention(q, k, v, context_lens=5)
    assert cache.quantised == 0 and len(cache) == 0


# ---------------------------------------------------------------------------------------
# GPU (Hopper): bf16 at real sizes


def gpu_lens(g, nc):
    return torch.randint(0, nc + 1, (g,), device="cuda") if g > 1 and nc else None


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize(
    "g, s, h, h_kv, lq, nc, t, d, rule",
    [
        (1, 512, 8, 8, 1, 1024, 16, 64, "causal"),  # the bench's decode step
        (1, 64, 8, 8, 2, 16384, 32, 64, ("causal", "strict")),  # few rows, long context
        (4, 129, 8, 2, 2, 1000, 17, 80, ("causal", "strict")),  # GQA, per-dataset M
        (2, 33, 4, 4, 1, 0, 9, 48, "strict"),  # empty context
        (1, 16, 4, 1, 8, 3000, 40, 128, "causal"),
    ],
)
def test_gpu_decode(g, s, h, h_kv, lq, nc, t, d, rule):
    args = inputs(g, s, h, h_kv, lq, nc, t + 3, d, dtype=torch.bfloat16)
    lens = gpu_lens(g, nc)
    got = fp8_shared_context_attention(*args, buffer_len=t, context_lens=lens, row_rule=rule)
    check_against_references(got, args, lens, t, teacher_forcing=False, buffer_len=t, row_rule=rule)


@pytest.mark.gpu
@pytest.mark.sm90
@pytest.mark.parametrize(
    "g, s, h_kv, nc, nt, d",
    [(1, 64, 8, 1024, 64, 64), (1, 8, 4, 4096, 256, 64), (3, 5, 8, 777, 33, 80)],
)
def test_gpu_teacher_forcing(g, s, h_kv, nc, nt, d):
    args = inputs(g, s, 8, h_kv, 2 * nt, nc, nt, d, dtype=torch.bfloat16)
    lens = gpu_lens(g, nc)
    got = fp8_teacher_forcing_attention(*args, context_lens=lens)
    check_against_references(got, args, lens, nt, teacher_forcing=True)


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_decode_model_layout_and_cuda_graph():
    # q in the model's layout ([G, S, Lq, H, D] transposed), buffer_len on the device, the
    # step captured in a CUDA graph (as the predictor decodes) and replayed for new T.
    g, s, h, lq, nc, t_cap, d = 1, 256, 8, 2, 2048, 24, 64
    q, kc, vc, kb, vb = inputs(g, s, h, h, lq, nc, t_cap, d, dtype=torch.bfloat16)
    q = q.transpose(2, 3).contiguous().transpose(2, 3)
    t_dev = torch.tensor(5, device="cuda")
    rule = ("causal", "strict")

    def step():
        return fp8_shared_context_attention(q, kc, vc, kb, vb, buffer_len=t_dev, row_rule=rule)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_lse = step()
    for t in (5, 17):
        t_dev.fill_(t)
        graph.replay()
        torch.cuda.synchronize()
        want_out, want_lse = fp8_shared_context_attention(
            q, kc, vc, kb, vb, buffer_len=t, row_rule=rule
        )
        # the same math; the buffer kernel's tiles may differ (T on the device vs an int)
        assert_rel_close(static_out, want_out, dtype=torch.bfloat16, name=f"graph out T={t}")
        assert_rel_close(static_lse, want_lse, tol=1e-4, name=f"graph lse T={t}")
        ref_out, _ = core_reference.shared_context_attention(
            *as64((q, kc, vc, kb, vb)), buffer_len=t, row_rule=rule
        )
        assert_rel_close(static_out, ref_out, tol=FP8_REL_TOL, name=f"out vs fp64 T={t}")


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_cached_context_in_two_graphs(monkeypatch):
    # The predictor's graphs: "prefill + step 0" makes the context and quantises it (a miss
    # while capturing), "step t" only reads the cached buffers (a hit while capturing). On
    # replay the first graph rewrites them in place, for every new context written into the
    # static source.
    quantised = []
    real = sc_interface.fp8_quantize_kv
    monkeypatch.setattr(sc_interface, "QUANTIZED_CONTEXTS", QuantizedContextCache())
    monkeypatch.setattr(
        sc_interface, "fp8_quantize_kv", lambda *a, **kw: quantised.append(1) or real(*a, **kw)
    )
    g, s, h, lq, nc, t_cap, d = 1, 128, 8, 2, 1500, 12, 64
    q, src_k, src_v, kb, vb = inputs(g, s, h, h, lq, nc, t_cap, d, dtype=torch.bfloat16)
    t_dev = torch.tensor(7, device="cuda")
    rule = ("causal", "strict")
    state = {}

    def prefill_and_first_step():
        state["ctx"] = (src_k * 1, src_v * 1)  # new tensors, as a prefill makes them
        fp8_shared_context_attention(q, *state["ctx"], kb, vb, buffer_len=1)

    def next_step():
        state["out"] = fp8_shared_context_attention(
            q, *state["ctx"], kb, vb, buffer_len=t_dev, row_rule=rule
        )

    side = torch.cuda.Stream()
    graphs = []
    for run in (prefill_and_first_step, next_step):
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        before = len(quantised)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graphs.append(graph)
        assert len(quantised) - before == (1 if run is prefill_and_first_step else 0)
    for _ in range(2):
        src_k.copy_(torch.randn_like(src_k))
        src_v.copy_(torch.randn_like(src_v))
        for graph in graphs:
            graph.replay()
        torch.cuda.synchronize()
        want_out, want_lse = fp8_shared_context_attention(
            q, src_k.clone(), src_v.clone(), kb, vb, buffer_len=t_dev, row_rule=rule
        )
        assert_rel_close(state["out"][0], want_out, dtype=torch.bfloat16, name="graph out")
        assert_rel_close(state["out"][1], want_lse, tol=1e-4, name="graph lse")


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_graph_requantises_a_context_refilled_in_place():
    # A context quantised eagerly (the warm-up), then a graph captured over it and the
    # context refilled in place (copy_) before each replay: the graph quantises it itself.
    q, kc, vc, kb, vb = inputs(1, 64, 8, 8, 1, 1000, 8, 64, dtype=torch.bfloat16)

    def step():
        return fp8_shared_context_attention(q, kc, vc, kb, vb, buffer_len=8)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_lse = step()
    for _ in range(2):
        kc.copy_(torch.randn_like(kc))
        vc.copy_(torch.randn_like(vc))
        graph.replay()
        torch.cuda.synchronize()
        want_out, want_lse = uncached(fp8_shared_context_attention, q, kc, vc, kb, vb, buffer_len=8)
        assert_rel_close(static_out, want_out, dtype=torch.bfloat16, name="graph out")
        assert_rel_close(static_lse, want_lse, tol=1e-4, name="graph lse")


@pytest.mark.gpu
@pytest.mark.sm90
def test_gpu_registry_backend_by_name():
    from tabattn_core.registry import get_op

    args = inputs(2, 64, 8, 4, 1, 700, 12, 64, dtype=torch.bfloat16)
    op = get_op("shared_context_attention", "fp8", device="cuda")
    out, _ = op(*args, buffer_len=12, context_lens=500)
    ref_out, _ = core_reference.shared_context_attention(
        *as64(args), buffer_len=12, context_lens=500
    )
    assert_rel_close(out, ref_out, tol=FP8_REL_TOL)
    q, kc, vc, kb, vb = inputs(1, 16, 8, 4, 2 * 40, 900, 40, 64, dtype=torch.bfloat16)
    op = get_op("teacher_forcing_attention", "fp8", device="cuda")
    out, _ = op(q, kc, vc, kb, vb)
    ref_out, _ = core_reference.teacher_forcing_attention(*as64((q, kc, vc, kb, vb)))
    assert_rel_close(out, ref_out, tol=FP8_REL_TOL)
