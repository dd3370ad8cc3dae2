"""3D rotary position embedding, Wan2.1 convention (docs/skiparse.md#true-positions-for-rope).

The head dim d is split into (t, h, w) parts of d - 4*floor(d/6), 2*floor(d/6), 2*floor(d/6) dims
(44/42/42 for d = 128).  Within each part, consecutive (interleaved) pairs (x[2i], x[2i+1]) rotate by
pos * theta^(-2j / d_part), j = 0 .. d_part/2 - 1.  Angles are formed in float64 and the rotation is applied
in fp32; the result has x's dtype.

Under Skiparse every token is rotated by its TRUE grid position: pass the folded positions of
``ospfn.ops.skiparse_positions``.  A negative position (a pad slot) means the identity rotation.

Example::

    >>> import torch
    >>> from ospfn.ops import rope_3d, skiparse_positions
    >>> pos = skiparse_positions((2, 3, 4), 1, None)          # [1, 24, 3] raster (t, h, w)
    >>> x = torch.randn(1, 24, 2, 128)
    >>> y = rope_3d(x, pos)
    >>> torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)   # rotations keep norms
    True
"""

from __future__ import annotations

import functools
import math

import torch

from ospfn.backends import register, select

__all__ = ["rope_3d", "rope_split", "rope_cos_sin", "apply_rope"]


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """(d_t, d_h, d_w) of the Wan2.1 split; each even."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 6 or head_dim % 2:
        raise ValueError(f"rope_split: head_dim must be an even int >= 6, got {head_dim!r}")
    dh = 2 * (head_dim // 6)
    return head_dim - 2 * dh, dh, dh


@functools.lru_cache(maxsize=16)
def _inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """float64 [head_dim / 2]: the per-pair frequency, axis by axis."""
    parts = []
    for d in rope_split(head_dim):
        parts.append(1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64), torch.arange(0, d, 2, dtype=torch.float64) / d))
    return torch.cat(parts)


def _axis_of_pair(head_dim: int) -> torch.Tensor:
    dt, dh, dw = rope_split(head_dim)
    return torch.cat([torch.full((dt // 2,), 0), torch.full((dh // 2,), 1), torch.full((dw // 2,), 2)])


def _check_theta(theta: object, fn: str) -> float:
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise TypeError(f"{fn}: theta must be a finite number > 1, got {type(theta).__name__}")
    if not 1 < theta < math.inf:  # NaN fails too
        raise ValueError(f"{fn}: theta must be a finite number > 1, got {theta!r}")
    return float(theta)


def _check_positions(positions: object, fn: str) -> torch.Tensor:
    if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        got = positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise TypeError(f"{fn}: positions must be an integer tensor [..., S, 3] of (t, h, w), got {got}")
    if positions.dim() < 2 or positions.shape[-1] != 3:
        raise ValueError(f"{fn}: positions must have shape [..., S, 3], got {tuple(positions.shape)}")
    return positions


def rope_cos_sin(positions: torch.Tensor, head_dim: int, *, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin as fp32 [..., S, head_dim / 2] for integer positions [..., S, 3] (negative -> angle 0)."""
    _check_positions(positions, "rope_cos_sin")
    theta = _check_theta(theta, "rope_cos_sin")
    rope_split(head_dim)
    inv = _inv_freq(head_dim, theta).to(positions.device)
    axis = _axis_of_pair(head_dim).to(positions.device)
    pos = positions.to(torch.float64)[..., axis]  # [..., S, head_dim/2]: the coordinate each pair rotates by
    ang = torch.where(pos >= 0, pos * inv, torch.zeros_like(pos))
    return torch.cos(ang).to(torch.float32), torch.sin(ang).to(torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, H, D] by (cos, sin) [B or 1 or G, S, D/2] in fp32.

    A leading size G that divides B is taken slot-major, as in the Skiparse folded batch: row g*(B/G) + b
    uses cos[g].
    """
    fn = "apply_rope"
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{fn}: x must be a float tensor [B, S, H, D], got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must have shape [batch, seq, heads, head_dim], got {tuple(x.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{fn}: {name} must be a float tensor [G, S, D/2] (from rope_cos_sin), got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")  # fmt: skip
        if t.dim() not in (2, 3):
            raise ValueError(f"{fn}: {name} must have shape [G, S, D/2] or [S, D/2], got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} must be on x's device {x.device}, got {t.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"{fn}: cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    B, S, H, D = x.shape
    if D % 2:
        raise ValueError(f"{fn}: the head dim of x must be even (rotated in pairs), got {D}")
    c, s = cos, sin
    if c.dim() == 2:
        c, s = c[None], s[None]
    G = c.shape[0]
    if c.shape[1:] != (S, D // 2):
        raise ValueError(f"apply_rope: cos/sin must have shape [G, {S}, {D // 2}], got {tuple(cos.shape)}")
    if B % G:
        raise ValueError(f"apply_rope: the leading size of cos/sin ({G}) must be 1 or divide the batch ({B})")
    # slot-major: view the batch as [G, B/G] and broadcast the tables over B/G and the heads (no copies)
    xf = x.to(torch.float32).contiguous().view(G, B // G, S, H, D // 2, 2)
    out = _rotate_pairs(xf, c[:, None, :, None, :], s[:, None, :, None, :], x.device.type in ("cpu", "cuda"))
    return out.reshape(B, S, H, D).to(x.dtype)


def _rotate_pairs(xf: torch.Tensor, c: torch.Tensor, s: torch.Tensor, use_complex: bool) -> torch.Tensor:
    """(x0, x1) -> (x0 c - x1 s, x0 s + x1 c) over the last dim of size 2 (fp32, c/s broadcast)."""
    if use_complex:
        # one complex multiply (x0 + i x1)(c + i s): the products and sums of the real formula, in one pass
        # over x instead of four multiplies, an add, a sub and a stack
        return torch.view_as_real(torch.view_as_complex(xf) * torch.complex(c, s))
    # complex dtypes are not supported on every device (e.g. Ascend): the real formula
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)


def rope_3d(x: torch.Tensor, positions: torch.Tensor, *, theta: float = 10000.0, backend: str | None = None) -> torch.Tensor:
    """Apply the Wan2.1 3D RoPE to x [B, S, H, D] at integer positions [S, 3], [G, S, 3] or [B, S, 3]."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"rope_3d: x must be a float tensor [B, S, H, D], got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4:
        raise ValueError(f"rope_3d: x must have shape [batch, seq, heads, head_dim], got {tuple(x.shape)}")
    _check_positions(positions, "rope_3d")
    if positions.dim() > 3:
        raise ValueError(f"rope_3d: positions must have shape [S, 3], [G, S, 3] or [B, S, 3], got {tuple(positions.shape)}")
    if positions.shape[-2] != x.shape[1]:
        raise ValueError(f"rope_3d: positions cover {positions.shape[-2]} tokens but x has {x.shape[1]}")
    theta = _check_theta(theta, "rope_3d")
    rope_split(x.shape[-1])
    return select("rope_3d", backend, x.device)(x, positions, theta)


def _ref_rope_3d(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    cos, sin = rope_cos_sin(positions.to(x.device), x.shape[-1], theta=theta)
    return apply_rope(x, cos, sin)


register("rope_3d", "ref", _ref_rope_3d)
