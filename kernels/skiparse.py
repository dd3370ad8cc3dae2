"""Triton permutation kernels for Skiparse-2D (installed as ``ospfn.kernels.skiparse``).

fold, unfold and switch are gathers: every output row (one token, C channels) is copied from one input
row computed by base-P digit arithmetic, or zero-filled for a pad slot.  Padding and cropping are fused:
each is a single pass over the data with no intermediate tensor.  Index conventions are those of
``ospfn.ops.skiparse`` (spec-skiparse-ssp.md section 1); the ``ref`` backend there is the source of truth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ospfn.backends import interpreting

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


def _launch(src: torch.Tensor, dst: torch.Tensor, lay, mode: int, B: int) -> torch.Tensor:
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


def _fold(x: torch.Tensor, lay, kind: str) -> torch.Tensor:
    B, _, C = x.shape
    out = torch.empty(lay.groups * B, lay.seq, C, dtype=x.dtype, device=x.device)
    return _launch(x, out, lay, FOLD_TOKEN if kind == "token" else FOLD_GROUP, B)


def _unfold(y: torch.Tensor, lay, kind: str) -> torch.Tensor:
    B = y.shape[0] // lay.groups
    out = torch.empty(B, lay.n, y.shape[2], dtype=y.dtype, device=y.device)
    return _launch(y, out, lay, UNFOLD_TOKEN if kind == "token" else UNFOLD_GROUP, B)


def _switch(y: torch.Tensor, lay) -> torch.Tensor:
    B = y.shape[0] // lay.groups
    out = torch.empty(y.shape[0], lay.seq, y.shape[2], dtype=y.dtype, device=y.device)
    return _launch(y, out, lay, SWITCH, B)


class _Fold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lay, kind):
        ctx.lay, ctx.kind = lay, kind
        return _fold(x, lay, kind)

    @staticmethod
    def backward(ctx, g):
        return _unfold(g, ctx.lay, ctx.kind), None, None  # pad slots are cropped: their grads vanish


class _Unfold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, lay, kind):
        ctx.lay, ctx.kind = lay, kind
        return _unfold(y, lay, kind)

    @staticmethod
    def backward(ctx, g):
        return _fold(g, ctx.lay, ctx.kind), None, None  # zero gradient for pad slots


class _Switch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, lay):
        ctx.lay = lay
        return _switch(y, lay)

    @staticmethod
    def backward(ctx, g):
        return _switch(g, ctx.lay), None


def fold(x: torch.Tensor, lay, kind: str) -> torch.Tensor:
    return _Fold.apply(x, lay, kind)


def unfold(y: torch.Tensor, lay, kind: str) -> torch.Tensor:
    return _Unfold.apply(y, lay, kind)


def switch(y: torch.Tensor, lay) -> torch.Tensor:
    return _Switch.apply(y, lay)
