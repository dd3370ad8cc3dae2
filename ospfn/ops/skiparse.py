"""Skiparse-2D: the fixed-rule sparse layouts of OSP-Next (docs/skiparse.md).

A sparse self-attention block runs on P^2 disjoint sub-sequences (P = ``ratio``) of the token grid
(T, H, W).  Write h = P^2 a + P b + c and w = P^2 a' + P b' + c' (base-P digits, after padding H and W at
the bottom/right to multiples of P^2):

* ``"token"`` layout: tokens with the same (c, c') = (h mod P, w mod P) form a sub-sequence.
  ``b (t h p w q) c -> (p q b) (t h w) c`` with h = h''P + p, w = w''P + q.
* ``"group"`` layout: tokens with the same middle digits (b, b') form a sub-sequence.
  ``b (th p1 p2 w q1 q2) c -> (p1 q1 b) (th p2 w q2) c``.

The folded batch axis is ordered (slot, batch) with the sub-sequence slot major -- sequence parallelism
(SSP) shards that axis.  Switching token <-> group is one permutation of the folded tensor, an involution.

Functions (each a pure permutation with padding/cropping; differentiable):

* :func:`skiparse_fold` ``[B, T*H*W, C] -> [P^2 B, N_pad / P^2, C]``
* :func:`skiparse_unfold` -- the exact inverse, cropping the padding
* :func:`skiparse_switch` -- token <-> group on folded data
* :func:`skiparse_key_mask` -- which folded slots hold real tokens (the key-padding mask of sparse attention)
* :func:`skiparse_positions` -- the true (t, h, w) of every folded slot, for RoPE

Every function checks (grid, ratio) before anything is allocated: H and W must be >= ratio (every sub-sequence
holds a real token), and the padded H x W may hold at most ``MAX_PAD_FACTOR`` (16) times the grid's H x W (an
absurd ratio would otherwise allocate a grid of mostly padding).  Any strides are accepted, an empty batch too.

Example::

    >>> import torch
    >>> from ospfn.ops import skiparse_fold, skiparse_unfold, skiparse_switch
    >>> x = torch.randn(2, 3 * 5 * 6, 8)               # B=2, grid (T, H, W) = (3, 5, 6), C=8
    >>> y = skiparse_fold(x, (3, 5, 6), 2, "token")     # H, W padded to 8: 4 sub-sequences of 3*4*4 tokens
    >>> y.shape
    torch.Size([8, 48, 8])
    >>> torch.equal(skiparse_switch(y, (3, 5, 6), 2), skiparse_fold(x, (3, 5, 6), 2, "group"))
    True
    >>> torch.equal(skiparse_unfold(y, (3, 5, 6), 2, "token"), x)
    True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from ospfn.backends import register, select

__all__ = [
    "SkiparseLayout",
    "skiparse_layout",
    "skiparse_fold",
    "skiparse_unfold",
    "skiparse_switch",
    "skiparse_key_mask",
    "skiparse_positions",
]

KINDS = ("token", "group")


@dataclass(frozen=True)
class SkiparseLayout:
    """Sizes of the padded grid and the folded sequence for one (grid, ratio)."""

    T: int
    H: int
    W: int
    P: int
    Hp: int  # H padded up to a multiple of P^2
    Wp: int

    @property
    def n(self) -> int:
        """Tokens of the unpadded grid."""
        return self.T * self.H * self.W

    @property
    def n_pad(self) -> int:
        return self.T * self.Hp * self.Wp

    @property
    def groups(self) -> int:
        """Sub-sequences per batch element, P^2."""
        return self.P * self.P

    @property
    def seq(self) -> int:
        """Length of one folded sub-sequence, N_pad / P^2."""
        return self.n_pad // self.groups

    @property
    def padded(self) -> bool:
        return self.Hp != self.H or self.Wp != self.W


def _check_grid(grid: object, fn: str) -> tuple[int, int, int]:
    if not isinstance(grid, Sequence) or len(grid) != 3:
        raise ValueError(f"{fn}: grid must be a (T, H, W) triple of positive ints, got {grid!r}")
    out = []
    for name, v in zip("THW", grid):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{fn}: grid {name} must be a positive int, got {v!r} in grid={tuple(grid)!r}")
        out.append(int(v))
    return out[0], out[1], out[2]


def _check_ratio(ratio: object, fn: str) -> int:
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"{fn}: ratio must be an int >= 1, got {ratio!r}")
    return int(ratio)


def _check_kind(kind: object, fn: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"{fn}: kind must be one of {KINDS}, got {kind!r}")
    return kind  # type: ignore[return-value]


MAX_PAD_FACTOR = 16  # the padded H x W may hold at most this many times the grid's own H x W tokens


@functools.lru_cache(maxsize=256)
def _layout(T: int, H: int, W: int, P: int, fn: str) -> SkiparseLayout:
    if P > 1 and (H < P or W < P):
        raise ValueError(f"{fn}: grid H and W must be >= ratio ({P}) so every sub-sequence holds a real token, got H={H}, W={W}")
    m = P * P
    Hp, Wp = -(-H // m) * m, -(-W // m) * m
    if Hp * Wp > MAX_PAD_FACTOR * H * W:  # plain ints: refused before anything is allocated
        raise ValueError(
            f"{fn}: ratio {P} would pad grid (T, H, W) = {(T, H, W)} to H x W = {Hp} x {Wp}, {Hp * Wp / (H * W):.1f} times "
            f"its {H} x {W} tokens per frame; at most {MAX_PAD_FACTOR} times is allowed (H and W are padded to multiples "
            f"of ratio^2 = {m}): use a smaller ratio or a larger grid"
        )
    return SkiparseLayout(T, H, W, P, Hp, Wp)


def skiparse_layout(grid: Sequence[int], ratio: int) -> SkiparseLayout:
    """The padded sizes for ``grid`` and ``ratio`` (validated)."""
    T, H, W = _check_grid(grid, "skiparse_layout")
    return _layout(T, H, W, _check_ratio(ratio, "skiparse_layout"), "skiparse_layout")


def _check_tensor(x: object, fn: str, arg: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{fn}: {arg} must have shape [batch, tokens, channels], got shape {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------------------------------------
# public API


def skiparse_fold(x: torch.Tensor, grid: Sequence[int], ratio: int, kind: str, *, backend: str | None = None) -> torch.Tensor:
    """Pad H, W to multiples of ratio^2 and fold ``x`` [B, T*H*W, C] (raster order) into the ``kind`` layout
    [ratio^2 * B, N_pad / ratio^2, C].  Pad tokens are zeros."""
    fn = "skiparse_fold"
    x = _check_tensor(x, fn, "x")
    T, H, W = _check_grid(grid, fn)
    lay = _layout(T, H, W, _check_ratio(ratio, fn), fn)
    kind = _check_kind(kind, fn)
    if x.shape[1] != lay.n:
        raise ValueError(f"{fn}: x has {x.shape[1]} tokens but grid {(T, H, W)} has T*H*W = {lay.n}")
    if lay.P == 1:
        return x
    return select("skiparse_fold", backend, x.device)(x, lay, kind)


def skiparse_unfold(y: torch.Tensor, grid: Sequence[int], ratio: int, kind: str, *, backend: str | None = None) -> torch.Tensor:
    """Inverse of :func:`skiparse_fold`: [ratio^2 * B, N_pad / ratio^2, C] -> [B, T*H*W, C], padding cropped."""
    fn = "skiparse_unfold"
    y = _check_tensor(y, fn, "y")
    T, H, W = _check_grid(grid, fn)
    lay = _layout(T, H, W, _check_ratio(ratio, fn), fn)
    kind = _check_kind(kind, fn)
    _check_folded(y, lay, fn)
    if lay.P == 1:
        return y
    return select("skiparse_unfold", backend, y.device)(y, lay, kind)


def skiparse_switch(y: torch.Tensor, grid: Sequence[int], ratio: int, *, backend: str | None = None) -> torch.Tensor:
    """Token <-> group layout on folded data (the same permutation both ways: an involution)."""
    fn = "skiparse_switch"
    y = _check_tensor(y, fn, "y")
    T, H, W = _check_grid(grid, fn)
    lay = _layout(T, H, W, _check_ratio(ratio, fn), fn)
    _check_folded(y, lay, fn)
    if lay.P == 1:
        return y
    return select("skiparse_switch", backend, y.device)(y, lay)


def _check_folded(y: torch.Tensor, lay: SkiparseLayout, fn: str) -> None:
    if y.shape[0] % lay.groups or y.shape[1] != lay.seq:
        raise ValueError(
            f"{fn}: y must have shape [ratio^2 * B, {lay.seq}, C] for grid {(lay.T, lay.H, lay.W)} and ratio {lay.P}, "
            f"got {tuple(y.shape)}"
        )


def skiparse_key_mask(grid: Sequence[int], ratio: int, kind: str, batch: int, *, device=None) -> torch.Tensor | None:
    """bool [ratio^2 * batch, N_pad / ratio^2]: True where the folded slot holds a real token.

    ``None`` when nothing is padded (every slot real), so attention can skip masking.
    """
    fn = "skiparse_key_mask"
    T, H, W = _check_grid(grid, fn)
    lay = _layout(T, H, W, _check_ratio(ratio, fn), fn)
    kind = _check_kind(kind, fn)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"{fn}: batch must be a positive int, got {batch!r}")
    if not lay.padded:
        return None
    m = _mask_table(lay, kind, torch.device(device) if device is not None else torch.device("cpu"))
    return m.repeat_interleave(batch, dim=0)


def skiparse_positions(grid: Sequence[int], ratio: int, kind: str | None, *, device=None) -> torch.Tensor:
    """int64 [ratio^2, N_pad / ratio^2, 3]: the true (t, h, w) of every folded slot; pad slots are -1.

    Slot g of the result belongs to folded batch rows g*B .. g*B + B - 1.  ``kind=None`` gives the unfolded
    raster positions [1, T*H*W, 3].
    """
    fn = "skiparse_positions"
    T, H, W = _check_grid(grid, fn)
    lay = _layout(T, H, W, _check_ratio(ratio, fn), fn)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if kind is None:
        return _raster_positions(T, H, W, dev)
    kind = _check_kind(kind, fn)
    return _positions_table(lay, kind, dev)


@functools.lru_cache(maxsize=64)
def _raster_positions(T: int, H: int, W: int, device: torch.device) -> torch.Tensor:
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    return torch.stack([t, h, w], dim=-1).reshape(1, T * H * W, 3).to(device)


@functools.lru_cache(maxsize=64)
def _positions_table(lay: SkiparseLayout, kind: str, device: torch.device) -> torch.Tensor:
    pos = _raster_positions(lay.T, lay.H, lay.W, torch.device("cpu"))
    return _ref_fold(pos, lay, kind, fill=-1).to(device)


@functools.lru_cache(maxsize=64)
def _mask_table(lay: SkiparseLayout, kind: str, device: torch.device) -> torch.Tensor:
    ones = torch.ones(1, lay.n, 1, dtype=torch.bool)
    return _ref_fold(ones, lay, kind).squeeze(-1).to(device)


# ----------------------------------------------------------------------------------------------------------
# ref backend: pad + view/permute (one copy), crop on the way back


def _pad_grid(x: torch.Tensor, lay: SkiparseLayout, fill=0) -> torch.Tensor:
    """[B, T*H*W, C] -> [B, T, Hp, Wp, C] (bottom/right padding with ``fill``)."""
    B, _, C = x.shape
    g = x.reshape(B, lay.T, lay.H, lay.W, C)
    if lay.padded:
        if x.dtype == torch.bool or not x.dtype.is_floating_point:
            out = torch.full((B, lay.T, lay.Hp, lay.Wp, C), fill, dtype=x.dtype, device=x.device)
            out[:, :, : lay.H, : lay.W] = g
            return out
        g = F.pad(g, (0, 0, 0, lay.Wp - lay.W, 0, lay.Hp - lay.H), value=fill)
    return g


def _ref_fold(x: torch.Tensor, lay: SkiparseLayout, kind: str, fill=0) -> torch.Tensor:
    return fold_padded_grid(_pad_grid(x, lay, fill), lay, kind)


def fold_padded_grid(g: torch.Tensor, lay: SkiparseLayout, kind: str) -> torch.Tensor:
    """Fold an already padded grid [B, T, Hp, Wp, C] into the ``kind`` layout [P^2 B, N_pad / P^2, C]."""
    P = lay.P
    if kind == "token":  # sub-sequence = the lowest digits (p, q) of (h, w)
        return rearrange(g, "b t (h p) (w q) c -> (p q b) (t h w) c", p=P, q=P)
    # group: sub-sequence = the middle digits (p1, q1) of (h, w)
    return rearrange(g, "b t (h p1 p2) (w q1 q2) c -> (p1 q1 b) (t h p2 w q2) c", p1=P, p2=P, q1=P, q2=P)


def _ref_unfold(y: torch.Tensor, lay: SkiparseLayout, kind: str) -> torch.Tensor:
    P, T = lay.P, lay.T
    if kind == "token":
        g = rearrange(y, "(p q b) (t h w) c -> b t (h p) (w q) c", p=P, q=P, t=T, h=lay.Hp // P)
    else:
        g = rearrange(y, "(p1 q1 b) (t h p2 w q2) c -> b t (h p1 p2) (w q1 q2) c",
                      p1=P, q1=P, t=T, h=lay.Hp // (P * P), p2=P, q2=P)  # fmt: skip
    if lay.padded:
        g = g[:, :, : lay.H, : lay.W]
    return rearrange(g, "b t h w c -> b (t h w) c")


def _ref_switch(y: torch.Tensor, lay: SkiparseLayout) -> torch.Tensor:
    # token (p2 q2 b) (t h p1 w q1)  <->  group (p1 q1 b) (t h p2 w q2): the same pattern both ways
    P = lay.P
    return rearrange(y, "(p2 q2 b) (t h p1 w q1) c -> (p1 q1 b) (t h p2 w q2) c",
                     p2=P, q2=P, t=lay.T, h=lay.Hp // (P * P), p1=P, q1=P)  # fmt: skip


register("skiparse_fold", "ref", _ref_fold)
register("skiparse_unfold", "ref", _ref_unfold)
register("skiparse_switch", "ref", _ref_switch)
register("skiparse_fold", "triton", "ospfn.kernels.skiparse:fold")
register("skiparse_unfold", "triton", "ospfn.kernels.skiparse:unfold")
register("skiparse_switch", "triton", "ospfn.kernels.skiparse:switch")
