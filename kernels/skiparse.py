"""Triton permutation kernels for Skiparse-2D (installed as ``ospfn.kernels.skiparse``).

fold, unfold and switch are gathers: every output row (one token, C channels) is copied from one input
row computed by base-P digit arithmetic, or zero-filled for a pad slot.  Padding and cropping are fused:
each is a single pass over the data with no intermediate tensor.  Index conventions are those of
``ospfn.ops.skiparse`` (docs/skiparse.md); the ``ref`` backend there is the source of truth.

Each permutation is a ``torch.library`` custom op (``torch.ops.ospfn_triton.skiparse_{fold,unfold,switch}``)
taking the layout as plain ints, with a fake implementation and an autograd formula (the gradient of a
permutation is the inverse permutation: fold <-> unfold, switch is its own inverse), so ``torch.compile``
traces forward and backward without a graph break.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ospfn.kernels.common import interpreting

FOLD_TOKEN, FOLD_GROUP, UNFOLD_TOKEN, UNFOLD_GROUP, SWITCH = 0, 1, 2, 3, 4


@triton.jit
def _permute_rows_kernel(
    src_ptr, dst_ptr, n_rows, C,
    s_b, s_n, s_c,  # source strides: batch row, token, channel
    d_b, d_n, d_c,  # destination strides
    B, T, H, W, Hp, Wp,
    dst_seq,  # tokens per destination batch row
    P: tl.constexpr, MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    db = rows // dst_seq  # destination batch row
    dn = rows % dst_seq  # destination token
    PP: tl.constexpr = P * P
    HA = Hp // PP  # number of top digits a (h = a P^2 + b P + c)
    WA = Wp // PP
    valid = row_ok
    if MODE == 0:  # fold, token layout: (p, q, b) x (t, h'', w'') with h = h'' P + p
        slot = db // B
        sb = db % B
        w2 = dn % (Wp // P)
        tmp = dn // (Wp // P)
        h2 = tmp % (Hp // P)
        t = tmp // (Hp // P)
        h = h2 * P + slot // P
        w = w2 * P + slot % P
        valid = valid & (h < H) & (w < W)
        sn = (t * H + h) * W + w
    elif MODE == 1:  # fold, group layout: (p1, q1, b) x (t, a, p2, a', q2) with h = a P^2 + p1 P + p2
        slot = db // B
        sb = db % B
        q2 = dn % P
        r1 = dn // P
        a2 = r1 % WA
        r2 = r1 // WA
        p2 = r2 % P
        r3 = r2 // P
        a1 = r3 % HA
        t = r3 // HA
        h = a1 * PP + (slot // P) * P + p2
        w = a2 * PP + (slot % P) * P + q2
        valid = valid & (h < H) & (w < W)
        sn = (t * H + h) * W + w
    elif MODE == 2:  # unfold, token layout
        t = dn // (H * W)
        h = (dn // W) % H
        w = dn % W
        sb = ((h % P) * P + (w % P)) * B + db
        sn = (t * (Hp // P) + h // P) * (Wp // P) + w // P
    elif MODE == 3:  # unfold, group layout
        t = dn // (H * W)
        h = (dn // W) % H
        w = dn % W
        sb = (((h // P) % P) * P + (w // P) % P) * B + db
        sn = (((t * HA + h // PP) * P + h % P) * WA + w // PP) * P + w % P
    else:  # switch: batch digits (d0, d1) and sequence digits (e0, e1) trade places (an involution)
        d0 = db // (P * B)
        d1 = (db // B) % P
        bb = db % B
        e1 = dn % P
        r1 = dn // P
        a2 = r1 % WA
        r2 = r1 // WA
        e0 = r2 % P
        r3 = r2 // P
        a1 = r3 % HA
        t = r3 // HA
        sb = (e0 * P + e1) * B + bb
        sn = (((t * HA + a1) * P + d0) * WA + a2) * P + d1
    col_ok = cols < C
    src = src_ptr + (sb * s_b + sn * s_n)[:, None] + (cols * s_c)[None, :]
    vals = tl.load(src, mask=valid[:, None] & col_ok[None, :], other=0)
    dst = dst_ptr + (db * d_b + dn * d_n)[:, None] + (cols * d_c)[None, :]
    tl.store(dst, vals, mask=row_ok[:, None] & col_ok[None, :])


class _Layout(NamedTuple):
    """The sizes of an ``ospfn.ops.SkiparseLayout`` (grid T, H, W; ratio P; H, W padded to multiples of P^2)."""

    T: int
    H: int
    W: int
    P: int
    Hp: int
    Wp: int

    @property
    def groups(self) -> int:
        return self.P * self.P

    @property
    def n(self) -> int:
        return self.T * self.H * self.W

    @property
    def seq(self) -> int:
        return self.T * self.Hp * self.Wp // self.groups


def _launch(src: torch.Tensor, dst: torch.Tensor, lay: _Layout, mode: int, B: int) -> torch.Tensor:
    n_rows = dst.shape[0] * dst.shape[1]
    C = dst.shape[2]
    if n_rows == 0 or C == 0:
        return dst
    if interpreting():
        BLOCK_R = min(1024, triton.next_power_of_2(n_rows))
        BLOCK_C = triton.next_power_of_2(C)
        num_warps = 1
    else:
        BLOCK_C = min(256, triton.next_power_of_2(C))
        BLOCK_R = max(1, 2048 // BLOCK_C)
        num_warps = 4
    grid = (triton.cdiv(n_rows, BLOCK_R), triton.cdiv(C, BLOCK_C))
    _permute_rows_kernel[grid](
        src, dst, n_rows, C,
        src.stride(0), src.stride(1), src.stride(2),
        dst.stride(0), dst.stride(1), dst.stride(2),
        B, lay.T, lay.H, lay.W, lay.Hp, lay.Wp, dst.shape[1],
        P=lay.P, MODE=mode, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=num_warps,
    )  # fmt: skip
    return dst


def _fold_shape(x: torch.Tensor, lay: _Layout) -> tuple:
    return (lay.groups * x.shape[0], lay.seq, x.shape[2])


def _unfold_shape(y: torch.Tensor, lay: _Layout) -> tuple:
    return (y.shape[0] // lay.groups, lay.n, y.shape[2])


# ----------------------------------------------------------------------------------------------------------
# custom ops: the layout travels as six ints (T, H, W, P, Hp, Wp), the layout kind as a string


@torch.library.custom_op("ospfn_triton::skiparse_fold", mutates_args=())
def fold_op(x: torch.Tensor, T: int, H: int, W: int, P: int, Hp: int, Wp: int, kind: str) -> torch.Tensor:
    """[B, T*H*W, C] -> [P^2 B, T*Hp*Wp / P^2, C] in the ``kind`` layout ("token" or "group"); pads are 0."""
    lay = _Layout(T, H, W, P, Hp, Wp)
    out = torch.empty(_fold_shape(x, lay), dtype=x.dtype, device=x.device)
    return _launch(x, out, lay, FOLD_TOKEN if kind == "token" else FOLD_GROUP, x.shape[0])


@torch.library.custom_op("ospfn_triton::skiparse_unfold", mutates_args=())
def unfold_op(y: torch.Tensor, T: int, H: int, W: int, P: int, Hp: int, Wp: int, kind: str) -> torch.Tensor:
    """The inverse of ``fold_op``, cropping the padding."""
    lay = _Layout(T, H, W, P, Hp, Wp)
    out = torch.empty(_unfold_shape(y, lay), dtype=y.dtype, device=y.device)
    return _launch(y, out, lay, UNFOLD_TOKEN if kind == "token" else UNFOLD_GROUP, y.shape[0] // lay.groups)


@torch.library.custom_op("ospfn_triton::skiparse_switch", mutates_args=())
def switch_op(y: torch.Tensor, T: int, H: int, W: int, P: int, Hp: int, Wp: int) -> torch.Tensor:
    """Token <-> group layout of folded data (an involution)."""
    lay = _Layout(T, H, W, P, Hp, Wp)
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    return _launch(y, out, lay, SWITCH, y.shape[0] // lay.groups)


@fold_op.register_fake
def _(x, T, H, W, P, Hp, Wp, kind):
    return x.new_empty(_fold_shape(x, _Layout(T, H, W, P, Hp, Wp)))


@unfold_op.register_fake
def _(y, T, H, W, P, Hp, Wp, kind):
    return y.new_empty(_unfold_shape(y, _Layout(T, H, W, P, Hp, Wp)))


@switch_op.register_fake
def _(y, T, H, W, P, Hp, Wp):
    return y.new_empty(y.shape)


def _save_layout(ctx, inputs, output):
    ctx.layout = inputs[1:]  # (T, H, W, P, Hp, Wp[, kind])


def _fold_backward(ctx, g):
    return (unfold_op(g, *ctx.layout),) + (None,) * 7  # pad slots are cropped: their grads vanish


def _unfold_backward(ctx, g):
    return (fold_op(g, *ctx.layout),) + (None,) * 7  # zero gradient for pad slots


def _switch_backward(ctx, g):
    return (switch_op(g, *ctx.layout),) + (None,) * 6


fold_op.register_autograd(_fold_backward, setup_context=_save_layout)
unfold_op.register_autograd(_unfold_backward, setup_context=_save_layout)
switch_op.register_autograd(_switch_backward, setup_context=_save_layout)


# ----------------------------------------------------------------------------------------------------------
# the triton backend of ospfn.ops.skiparse_* (``lay``: a SkiparseLayout; arguments validated there)


def _ints(lay) -> tuple[int, int, int, int, int, int]:
    return (int(lay.T), int(lay.H), int(lay.W), int(lay.P), int(lay.Hp), int(lay.Wp))


def fold(x: torch.Tensor, lay, kind: str) -> torch.Tensor:
    return fold_op(x, *_ints(lay), kind)


def unfold(y: torch.Tensor, lay, kind: str) -> torch.Tensor:
    return unfold_op(y, *_ints(lay), kind)


def switch(y: torch.Tensor, lay) -> torch.Tensor:
    return switch_op(y, *_ints(lay))
