"""Shared-context attention as a context part and a buffer part merged by LSE.

Every row of `shared_context_attention` and `teacher_forcing_attention` sees its dataset's
first M_g context keys, whatever its row rule; only the buffer keys differ between rows.
So either op is a *context op* (the rows over the context alone) and a *buffer op* (the
rows over their buffer alone: the op itself with an empty context), combined by
`merge_states`. `context_buffer_op` builds the op from the two parts; a backend supplies
its own context part (tabattn-fp8: FP8; the predictor: the top-k block selection).

Gradients flow through `merge_states` by autograd, so a part merged with the other must
return a differentiable LSE; a part whose LSE is not (a flash kernel's, marked
non-differentiable) raises rather than give wrong gradients.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from tabattn_core import reference
from tabattn_core.checks import InputError
from tabattn_core.contracts import shared_context_args, teacher_forcing_args

__all__ = ["CONTRACTS", "ContextOp", "context_buffer_op"]

# context(q [G, S, H, L, D], k_ctx, v_ctx [G, H_kv, Nc, D], *, context_lens, scale)
#   -> (out [G, S, H, L, D], lse [G, S, H, L]): every row over its dataset's first M_g keys;
# context_lens the checked M (an int) or int64 M_g [G] on q's device, scale a float.
# `reference.shared_context_attention` without buffers is one.
ContextOp = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# The ops this combinator implements, with the contract each checks first.
CONTRACTS: dict[str, Callable] = {
    "shared_context_attention": shared_context_args,
    "teacher_forcing_attention": teacher_forcing_args,
}
_SIGNATURES = {name: inspect.signature(getattr(reference, name)) for name in CONTRACTS}


def context_buffer_op(
    name: str, context: ContextOp, buffer: Callable, *, check: Callable | None = None
) -> Callable:
    """The registry op `name` (a key of CONTRACTS, with its signature) as `context` merged
    with `buffer` by `merge_states`.

    context: a `ContextOp`, called only when some row sees a context key (M > 0);
    buffer: an implementation of op `name`, called with the context sliced to Nc = 0 and
    the call's other keyword arguments (the scale resolved), only when there is a buffer
    (decode: k_buf given and buffer_len > 0 or a tensor);
    check: `(q, k_ctx, v_ctx, k_buf, v_buf, **options) -> args`, run before either part:
    the op's contract (the default) or a backend's checks that call it.
    With neither part, out is 0 and lse -inf. Returns the op (q, k_ctx, v_ctx, k_buf,
    v_buf, **options) -> (out [G, S, H, L, D], lse [G, S, H, L]).
    """
    if name not in CONTRACTS:
        raise InputError(f"name: expected one of {sorted(CONTRACTS)}, got {name!r}")
    check = check or CONTRACTS[name]
    decode = name == "shared_context_attention"

    def op(q, k_ctx, v_ctx, k_buf=None, v_buf=None, **options):
        args = check(q, k_ctx, v_ctx, k_buf, v_buf, **options)
        parts = []
        if args.ctx_len > 0:  # Nc = 0 or context_lens = 0: no row sees a context key
            lens = args.ctx_len if args.ctx_lens is None else args.ctx_lens
            parts.append(context(q, k_ctx, v_ctx, context_lens=lens, scale=args.scale))
        if not decode or (
            k_buf is not None and (args.buffer_len_tensor is not None or args.buffer_len > 0)
        ):
            options = {k: v for k, v in options.items() if k not in ("context_lens", "scale")}
            empty = k_ctx[:, :, :0], v_ctx[:, :, :0]
            parts.append(buffer(q, *empty, k_buf, v_buf, scale=args.scale, **options))
        if not parts:
            lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            return torch.zeros_like(q), q.new_full(q.shape[:4], float("-inf"), dtype=lse_dtype)
        if len(parts) == 1:
            return parts[0]
        for part, (out, lse) in zip(("context", "buffer"), parts, strict=True):
            # (an lse of -inf only, from no key, is constant: its gradient term is 0)
            if out.requires_grad and not lse.requires_grad and not torch.isneginf(lse).all():
                raise InputError(
                    f"{part}: expected a differentiable lse with its out (the merge's "
                    "gradient flows through both), got an lse that is not"
                )
        return reference.merge_states(*parts[0], *parts[1])

    op.__name__ = op.__qualname__ = name
    op.__signature__ = _SIGNATURES[name]
    op.__doc__ = (
        f"`tabattn_core.reference.{name}` (its contract and docstring) as a context part "
        "and a buffer part merged by LSE (`tabattn_core.context_buffer`)."
    )
    return op
