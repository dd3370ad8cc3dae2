"""Sharded token layouts and the single all-to-all that moves the stream between them (SSP).

Layouts of the residual stream on SP rank w = s*U + u (S = skiparse_sp, U = ulysses_sp):

* ``"full"``: raster tokens, rank w holds the contiguous chunk w of N / (S*U) tokens: [B, N/(S U), C];
* ``"token"`` / ``"group"``: the Skiparse folded layout (pad slots included); rank (s, u) holds the G = P^2/S
  sub-sequences s*G .. s*G + G - 1 and, within each, the chunk u of L/U positions: [G*B, L/U, C], the
  folded batch slot-major like the unsharded layout.

Every layout change (entering the sparse region, token <-> group, leaving it) is ONE ``all_to_all_single``
over the SP group, planned from the global token ids each rank holds; the switch under pure SSP (U = 1) sends
N*C/S elements per rank, where Ulysses needs four all-to-alls of that size per block.  Pad slots travel with
the folded stream like any token (so results equal the single-process model exactly); entering creates them
as zeros and leaving drops them.  Planning is cached per (grid, ratio, layouts, S, U, rank).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ospfn.parallel.comm import _a2a

__all__ = ["layout_ids", "relayout", "local_rows_of", "to_token_major", "from_token_major"]

LAYOUTS = ("full", "token", "group")


@functools.lru_cache(maxsize=64)
def _folded_ids(T: int, H: int, W: int, P: int, kind: str) -> torch.Tensor:
    from ospfn.ops.skiparse import fold_padded_grid, skiparse_layout

    lay = skiparse_layout((T, H, W), P)
    ids = torch.arange(T * lay.Hp * lay.Wp, dtype=torch.int64).view(1, T, lay.Hp, lay.Wp, 1)
    return fold_padded_grid(ids, lay, kind)[:, :, 0]  # [P^2, L] padded-grid ids


@functools.lru_cache(maxsize=256)
def layout_ids(grid: tuple[int, int, int], P: int, kind: str, S: int, U: int, w: int) -> torch.Tensor:
    """Padded-grid token ids held by SP rank ``w`` in ``kind`` layout, in local (token-major) order."""
    from ospfn.ops.skiparse import skiparse_layout

    T, H, W = grid
    lay = skiparse_layout(grid, P)
    if kind == "full":
        t, h, x = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
        ids = ((t * lay.Hp + h) * lay.Wp + x).flatten()
        if ids.numel() % (S * U):
            raise ValueError(f"layout_ids: {ids.numel()} tokens of grid {grid} cannot be split into {S * U} equal shards")
        n = ids.numel() // (S * U)
        return ids[w * n : (w + 1) * n]
    if kind not in ("token", "group"):
        raise ValueError(f"layout_ids: kind must be one of {LAYOUTS}, got {kind!r}")
    s, u = divmod(w, U)
    G = P * P // S
    L = lay.seq // U
    return _folded_ids(T, H, W, P, kind)[s * G : (s + 1) * G, u * L : (u + 1) * L].reshape(-1)


@dataclass(frozen=True)
class _Plan:
    send_idx: torch.Tensor  # local rows to send, grouped by destination rank
    send_counts: tuple
    recv_counts: tuple
    recv_pos: torch.Tensor  # destination positions of the received rows, grouped by source rank
    n_dst: int
    local_only: bool  # no rank sends anything to another rank: skip the collective


@functools.lru_cache(maxsize=256)
def _plan(grid, P: int, src: str, dst: str, S: int, U: int, me: int) -> _Plan:
    Wsp = S * U
    from ospfn.ops.skiparse import skiparse_layout

    lay = skiparse_layout(grid, P)
    n_ids = grid[0] * lay.Hp * lay.Wp
    owner = torch.full((n_ids,), -1, dtype=torch.int64)
    pos = torch.full((n_ids,), -1, dtype=torch.int64)
    for r in range(Wsp):
        ids = layout_ids(grid, P, src, S, U, r)
        owner[ids] = r
        pos[ids] = torch.arange(ids.numel())
    cross = False
    send_idx, send_counts = [], []
    for d in range(Wsp):
        ids = layout_ids(grid, P, dst, S, U, d)
        held_by = owner[ids]
        cross = cross or bool(((held_by >= 0) & (held_by != d)).any())
        mine = ids[held_by == me]
        send_idx.append(pos[mine])
        send_counts.append(mine.numel())
    my_ids = layout_ids(grid, P, dst, S, U, me)
    held_by = owner[my_ids]
    recv_pos, recv_counts = [], []
    for r in range(Wsp):
        where = (held_by == r).nonzero().flatten()
        recv_pos.append(where)
        recv_counts.append(where.numel())
    return _Plan(torch.cat(send_idx), tuple(send_counts), tuple(recv_counts), torch.cat(recv_pos), my_ids.numel(), not cross)


def _apply(x: torch.Tensor, plan: _Plan, group, kind: str) -> torch.Tensor:
    """[B, n_src, C] token-major -> [B, n_dst, C] (rows nobody sends stay zero)."""
    xt = x.transpose(0, 1)
    idx = plan.send_idx.to(x.device)
    send = xt.index_select(0, idx)
    if plan.local_only:
        me = _my_rank(group)
        start = sum(plan.send_counts[:me])
        recv = send[start : start + plan.send_counts[me]]
    else:
        recv = _a2a(send, plan.send_counts, plan.recv_counts, group, kind)
    out = xt.new_zeros((plan.n_dst, *xt.shape[1:]))
    out.index_copy_(0, plan.recv_pos.to(x.device), recv)
    return out.transpose(0, 1)


def _my_rank(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if group is not None else 0


class _Relayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid, P, src, dst, S, U, me, group, kind):
        ctx.args = (grid, P, src, dst, S, U, me, group, kind)
        return _apply(x, _plan(grid, P, src, dst, S, U, me), group, kind)

    @staticmethod
    def backward(ctx, g):
        grid, P, src, dst, S, U, me, group, kind = ctx.args
        return (_apply(g.contiguous(), _plan(grid, P, dst, src, S, U, me), group, kind + "_bwd"),) + (None,) * 9


def to_token_major(x: torch.Tensor, kind: str, batch: int) -> torch.Tensor:
    """Local stream -> [B, n_local, C] (folded layouts: [G*B, L/U, C] slot-major -> [B, G*L/U, C])."""
    if kind == "full":
        return x
    G = x.shape[0] // batch
    return x.view(G, batch, x.shape[1], x.shape[2]).permute(1, 0, 2, 3).reshape(batch, -1, x.shape[2])


def from_token_major(x: torch.Tensor, kind: str, G: int) -> torch.Tensor:
    """Inverse of ``to_token_major``."""
    if kind == "full":
        return x
    B, n, C = x.shape
    return x.view(B, G, n // G, C).permute(1, 0, 2, 3).reshape(G * B, n // G, C)


def relayout(x: torch.Tensor, grid, P: int, src: str, dst: str, state, *, batch: int) -> torch.Tensor:
    """Move the local stream of ``state``'s SP rank from layout ``src`` to ``dst`` with at most one
    all-to-all over the SP group (none when every row stays on its rank).  On the trivial mesh of one
    process this is the local Skiparse fold / switch / unfold."""
    if src == dst:
        return x
    if state.sp_size == 1:
        from ospfn.ops.skiparse import skiparse_fold, skiparse_switch, skiparse_unfold

        if src == "full":
            return skiparse_fold(x, grid, P, dst)
        if dst == "full":
            return skiparse_unfold(x, grid, P, src)
        return skiparse_switch(x, grid, P)
    S, U = state.S, state.U
    kind = "ssp_switch" if {src, dst} == {"token", "group"} else ("ssp_enter" if src == "full" else "ssp_leave")
    xt = to_token_major(x, src, batch)
    y = _Relayout.apply(xt, tuple(grid), P, src, dst, S, U, state.sp_rank, state.sp_group, kind)
    return from_token_major(y, dst, (P * P) // S)


def local_rows_of(table: torch.Tensor, grid, P: int, kind: str, state) -> torch.Tensor:
    """The rows of a per-token table [N or G_tot x L, ...] that this rank holds (positions / masks).

    ``table`` for "full": [N, ...] raster; for folded kinds: [P^2, L, ...]; returns [n_local, ...] /
    [G, L/U, ...].
    """
    S, U = state.S, state.U
    if kind == "full":
        n = table.shape[0] // (S * U)
        return table[state.sp_rank * n : (state.sp_rank + 1) * n]
    G = P * P // S
    L = table.shape[1] // U
    return table[state.s_rank * G : (state.s_rank + 1) * G, state.u_rank * L : (state.u_rank + 1) * L]
