"""Stylised renderings of the synthetic motion world: the 12 styles of :data:`ospfn.styles.STYLES`.

Image-to-stylised-video (I2SV) on :class:`ospfn.data.SyntheticMotion` (``styles=...``): frame 0 of a clip is the
plain rendering (:func:`ospfn.data.synthetic.render_video`), frames 1..F-1 are the same object, moving the same
way, rendered in one style by :func:`render_styled_video`.  :func:`style_background` is a style's background
without the object (what a tracker subtracts); :mod:`ospfn.eval.styles` classifies the style of a frame by the
nearest of the 12 style templates rendered here.

The styles are built to be told apart by a small, blurry model's output at 32 x 32: mostly by low-frequency cues
(background palette and gradient, object palette, outlines 1-2 px thick, 4 x 4 pixel blocks), with a fixed
texture (period >= 4 px, aligned to the image grid, not moving with the object) as a secondary cue.  Every style
keeps the object clearly apart from the style's own background (a tracker finds it), is deterministic, and keeps
the object's shape, size and position.  In the table ``c`` is the object colour, ``b`` the plain background (base
colour plus the item's gradient), ``t`` the row position ``y / (H - 1)`` in [0, 1] (0 at the top), RGB in [0, 1]:

==============  =========================================================  ==============================================
style           background                                                 object
==============  =========================================================  ==============================================
Ghibli          soft painted sky: pale sky blue (top) to soft meadow       pastel ``0.6 c + 0.3`` warm white, tinted by
                green (bottom), vertical                                   the sky behind it (ambient light)
3D rendering    studio: ``0.3 b`` plus a neutral light growing towards     lit from the top-left (brighter there, darker
                the bottom (+0.06 at the top, +0.36 at the bottom)         bottom-right) and by the floor light; a faint
                                                                           drop shadow offset by (2, 2) px
Cyberpunk       near-black night, a magenta glow rising towards the        dim magenta fill ``0.3 c + magenta`` inside a
                bottom, faint magenta scanlines on every 4th row           bright neon cyan outline (2 px, on the edge);
                (over the object too)                                      the scanlines over it
Ink painting    flat warm off-white rice paper                             grey ink ``0.06 + 0.22 luma(c)`` (near black),
                                                                           a light ink bleed 1 px around it
Oil painting    canvas: ``0.7 b`` warmed and lifted; diagonal brush        ``c`` more saturated and warmer; the brush
                stripes (2 px wide, period 4 px along x + y, +-0.12)       stripes over it
Pixel art       ``0.1 + 0.5 b`` averaged over the 4 x 4 blocks of the      ``0.25 + 0.85 c`` quantised to 4 levels (a
                image grid, quantised to 4 levels per channel, one         bright palette colour), its coverage
                level of blue added (a dark retro-console blue)            averaged over the same 4 x 4 blocks
Vaporwave       pink (top) -> lavender -> cyan (bottom), vertical          a dark silhouette, hue-rotated (channels
                                                                           ``(b, r, g)``) and violet-tinted
Disney          bright sky blue, a little lighter at the top               ``c`` saturated (x 1.4), a white outline 1 px
                                                                           around it
Fairy tale      night indigo, violet towards the bottom; golden            golden ``0.5 c + 0.5`` gold, a soft golden glow
                sparkles (single pixels on a fixed lattice, 1 per 23 px)   1.5 px around it; the sparkles over it
Gotham noir     grey scale: nearly black, with venetian-blind light        light grey ``0.5 + 0.32 luma(c)`` (bright
                bands (4 rows lit, 4 rows dark)                            whatever its colour); the bands across it
Lego            light grey baseplate with lighter 2 x 2 px studs every     ``0.9 c`` (plastic), with the same lighter
                4 px                                                       studs on it
Chibi           candy pink, lighter towards the top                        pastel ``0.65 c + 0.35`` inside a thick (2 px,
                                                                           on the edge) dark plum outline
==============  =========================================================  ==============================================

Outlines, glows and bleeds come from the anti-aliased coverage (4 x 4 sub-samples per pixel, as in
:mod:`ospfn.data.synthetic`) of the same shape scaled about its centroid so that its edges move out (or in) by
the given number of pixels; so they are symmetric about the object's centroid, anti-aliased, and move smoothly
with sub-pixel motion.  Textures laid "over" the object (scanlines, stripes, sparkles, blinds, studs) are added to
the whole frame, and the Ghibli and 3D objects follow their background's vertical light, so the object's contrast
to the style's background is the same all over it: :func:`ospfn.eval.trackers.track_object` (given the style's
background) finds the object's centroid within ~0.4 px (3D rendering: its light is not symmetric), and within
~0.65 px in Pixel art, whose 4 x 4 blocks move the object's mass to block centres.

Styles are named by any spelling :func:`ospfn.styles.style_name` accepts (``"pixel-art"``, ``"Pixel Art"``, or
the id 5); colours are RGB triples in [0, 1] or names of :data:`~ospfn.data.synthetic.OBJECT_COLORS` /
:data:`~ospfn.data.synthetic.BACKGROUND_COLORS`.

Example::

    >>> import torch
    >>> from ospfn.data.stylize import render_styled_video, style_background
    >>> cents = torch.tensor([[10.0, 12.0], [12.0, 12.0]])
    >>> v = render_styled_video(cents, style="Gotham noir", shape="circle", radius=5.0, color="red",
    ...                         background="navy", size=(32, 32))
    >>> v.shape, v.dtype, bool(v.min() >= -1 and v.max() <= 1)
    (torch.Size([3, 2, 32, 32]), torch.float32, True)
    >>> bool(torch.equal(v[0], v[1])), bool(torch.equal(v[0], v[2]))  # grey scale: R == G == B
    (True, True)
    >>> bg = style_background("gotham-noir", background="navy", size=(32, 32))
    >>> bool((v[:, 0, 0] == bg[:, 0]).all())  # far from the object, the frame is the style's background
    True
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ospfn.data.synthetic import BACKGROUND_COLORS, OBJECT_COLORS, SHAPES, _coverage, _plain_background
from ospfn.styles import STYLES, style_name

__all__ = ["render_styled_video", "style_background"]

# inradius / radius of each shape (the distance from its centroid to its edges): scaling the shape about its
# centroid by (inradius + d) / inradius moves every edge out by d px (for the circle: exactly, everywhere)
_INRADIUS = {"circle": 1.0, "square": 0.886, "triangle": 1.35 / 2.0, "diamond": 1.2 / math.sqrt(2.0)}
_EXTENT = {"circle": 1.0, "square": 0.886 * math.sqrt(2.0), "triangle": 1.35, "diamond": 1.2}  # max |offset| / r
_BLOCK = 4  # Pixel art block size (px)
_PERIOD = 4  # Oil painting stripe / Lego stud period (px)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _resolve_style(style: object, fn: str) -> str:
    """The canonical name of ``style`` (any spelling or id :func:`ospfn.styles.style_name` accepts).

    ``ValueError`` naming ``fn``, the value and the 12 allowed names otherwise.
    """
    try:
        return style_name(style)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: style={style!r} is not allowed; allowed: {', '.join(STYLES)}") from None


def _resolve_rgb(value: object, table: dict, fn: str, arg: str) -> np.ndarray:
    """An RGB colour float32 [3] in [0, 1] from a name of ``table`` or three numbers in [0, 1] (``ValueError``
    naming ``fn`` and ``arg`` otherwise)."""
    if isinstance(value, str):
        if value not in table:
            raise ValueError(f"{fn}: {arg}={value!r} is not a known colour name; allowed: {tuple(table)} or an RGB triple in [0, 1]")
        value = table[value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    try:
        rgb = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        rgb = None
    if rgb is None or rgb.shape != (3,) or not np.isfinite(rgb).all() or rgb.min() < 0 or rgb.max() > 1:
        raise ValueError(f"{fn}: {arg}={value!r} must be a colour name in {tuple(table)} or an RGB triple in [0, 1]")
    return rgb.astype(np.float32)


def _check_geometry(fn: str, size: object, gradient: object) -> tuple[tuple[int, int], tuple[float, float]]:
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 4 for s in size)
    ):
        raise ValueError(f"{fn}: size={size!r} must be a pair of ints (H, W), each >= 4")
    if isinstance(gradient, torch.Tensor):
        gradient = gradient.detach().cpu().tolist()
    try:
        amp, ang = (float(g) for g in gradient)
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: gradient={gradient!r} must be a pair of finite numbers (amplitude, angle)") from None
    if not (math.isfinite(amp) and math.isfinite(ang)):
        raise ValueError(f"{fn}: gradient={gradient!r} must be a pair of finite numbers (amplitude, angle)")
    return (int(size[0]), int(size[1])), (amp, ang)


# ------------------------------------------------------------------------------------------------------------
# building blocks (numpy float32, RGB in [0, 1], images [3, H, W], videos [3, F, H, W])


def _rgb(*v: float) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)[:, None, None]


def _rows(size: tuple[int, int]) -> np.ndarray:
    """Row position t = y / (H - 1) in [0, 1], shape [1, H, 1]."""
    h = size[0]
    return (np.arange(h, dtype=np.float32) / max(h - 1, 1))[None, :, None]


def _vertical(size: tuple[int, int], stops: Sequence[tuple[float, tuple[float, float, float]]]) -> np.ndarray:
    """A vertical piecewise-linear gradient through colour ``stops`` [(t, rgb), ...] -> [3, H, W]."""
    h, w = size
    t = _rows(size)[0, :, 0]  # [H]
    ts = np.asarray([s[0] for s in stops], dtype=np.float32)
    cols = np.asarray([s[1] for s in stops], dtype=np.float32)  # [S, 3]
    out = np.stack([np.interp(t, ts, cols[:, k]) for k in range(3)]).astype(np.float32)  # [3, H]
    return np.ascontiguousarray(np.broadcast_to(out[:, :, None], (3, h, w)))


def _mix(a: np.ndarray, b: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return a * (1.0 - alpha) + b * alpha


def _saturate(c: np.ndarray, k: float) -> np.ndarray:
    """Colour(s) [3, ...] with their saturation scaled by ``k`` about their luma, clipped to [0, 1]."""
    y = np.tensordot(_LUMA, c, axes=(0, 0))
    return np.clip(y[None] + k * (c - y[None]), 0.0, 1.0)


def _luma(c: np.ndarray) -> np.ndarray:
    return np.tensordot(_LUMA, c, axes=(0, 0))


def _quantise(x: np.ndarray, levels: int = 4) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * (levels - 1)) / (levels - 1)


def _block_mean(x: np.ndarray, block: int = _BLOCK) -> np.ndarray:
    """Mean of ``x`` [..., H, W] over the ``block`` x ``block`` cells of the image grid (partial cells at the
    bottom / right edge average what they hold), broadcast back to [..., H, W]."""
    h, w = x.shape[-2:]
    hb, wb = -(-h // block), -(-w // block)
    pad = [(0, 0)] * (x.ndim - 2) + [(0, hb * block - h), (0, wb * block - w)]
    ones = np.pad(np.ones((h, w), dtype=np.float32), pad[-2:])
    xs = np.pad(x, pad).reshape(*x.shape[:-2], hb, block, wb, block).sum((-3, -1))
    ns = ones.reshape(hb, block, wb, block).sum((-3, -1))
    m = (xs / ns).astype(np.float32)
    return np.repeat(np.repeat(m, block, -2), block, -1)[..., :h, :w]


def _stripes(size: tuple[int, int]) -> np.ndarray:
    """Oil painting brush texture [1, H, W]: +1 / -1 in diagonal stripes 2 px wide, period 4 px along x + y."""
    h, w = size
    k = (np.arange(h)[:, None] + np.arange(w)[None, :]) % _PERIOD
    return np.where(k < _PERIOD // 2, 1.0, -1.0).astype(np.float32)[None]


def _studs(size: tuple[int, int]) -> np.ndarray:
    """Lego stud mask [1, H, W]: 2 x 2 px dots every 4 px (rows and columns 1, 2 mod 4)."""
    h, w = size
    on_y = np.isin(np.arange(h) % _PERIOD, (1, 2))
    on_x = np.isin(np.arange(w) % _PERIOD, (1, 2))
    return (on_y[:, None] & on_x[None, :]).astype(np.float32)[None]


def _scanlines(size: tuple[int, int]) -> np.ndarray:
    """Cyberpunk scanline mask [1, H, W]: every 4th row (rows 0 mod 4)."""
    h, w = size
    return np.broadcast_to((np.arange(h) % 4 == 0).astype(np.float32)[None, :, None], (1, h, w))


def _blinds(size: tuple[int, int]) -> np.ndarray:
    """Gotham noir venetian-blind mask [1, H, W]: 4 lit rows, 4 dark rows."""
    h, w = size
    return np.broadcast_to(((np.arange(h) // 4) % 2 == 0).astype(np.float32)[None, :, None], (1, h, w))


def _sparkles(size: tuple[int, int]) -> np.ndarray:
    """Fairy tale sparkle mask [1, H, W]: a fixed scatter of single pixels on a slanted lattice, one per 23 px."""
    h, w = size
    y, x = np.arange(h)[:, None], np.arange(w)[None, :]
    return ((3 * x + 7 * y) % 23 == 0).astype(np.float32)[None]


# ------------------------------------------------------------------------------------------------------------
# the styles: background [3, H, W] and full render [3, F, H, W], RGB in [0, 1] (clipped by the caller)


class _Scene:
    """What a style renders from: geometry, colours and cached coverages."""

    def __init__(self, cents, shape, radius, color, background, size, gradient):
        self.cents = cents  # [F, 2] float64
        self.shape, self.radius, self.size = shape, float(radius), size
        self.c = color[:, None, None, None]  # [3, 1, 1, 1]
        self.b = _plain_background(background, gradient, size)  # [3, H, W]
        self._cov: dict[float, np.ndarray] = {}

    def cov(self, d: float = 0.0) -> np.ndarray:
        """Coverage [1, F, H, W] of the shape with its edges moved out by ``d`` px (in, for ``d < 0``)."""
        if d not in self._cov:
            rho = _INRADIUS[self.shape] * self.radius
            scale = (rho + d) / rho
            if scale <= 0:
                cov = np.zeros((len(self.cents), *self.size), dtype=np.float32)
            else:
                cov = _coverage(self.cents, self.shape, self.radius * scale, self.size)
            self._cov[d] = cov[None]
        return self._cov[d]

    def shifted_cov(self, dx: float, dy: float) -> np.ndarray:
        return _coverage(self.cents + np.array([dx, dy]), self.shape, self.radius, self.size)[None]

    def light(self) -> np.ndarray:
        """3D light term in [-1, 1] [1, F, H, W]: +1 towards the object's top-left, -1 towards its bottom-right."""
        h, w = self.size
        dx = np.arange(w, dtype=np.float32)[None, None, :] - self.cents[:, 0, None, None].astype(np.float32)
        dy = np.arange(h, dtype=np.float32)[None, :, None] - self.cents[:, 1, None, None].astype(np.float32)
        ext = _EXTENT[self.shape] * self.radius
        return np.clip(-(dx + dy) / (math.sqrt(2.0) * ext), -1.0, 1.0)[None]


_GHIBLI_SKY = [(0.0, (0.72, 0.86, 0.96)), (1.0, (0.56, 0.78, 0.60))]


def _bg_ghibli(b, size):
    return _vertical(size, _GHIBLI_SKY)


def _ghibli(s: _Scene):
    bg = _bg_ghibli(s.b, s.size)[:, None]
    # the object takes on the sky's variation (ambient light): its contrast to the sky is the same everywhere
    ambient = bg - np.asarray([np.mean([st[1][k] for st in _GHIBLI_SKY]) for k in range(3)], dtype=np.float32)[:, None, None, None]
    return _mix(bg, 0.6 * s.c + 0.3 * _rgb(1.0, 0.98, 0.94)[:, None] + ambient, s.cov())


def _bg_3d(b, size):
    return 0.3 * b + (0.06 + 0.30 * _rows(size))


def _3d(s: _Scene):
    bg = _bg_3d(s.b, s.size)[:, None]
    bg = np.clip(bg - 0.07 * s.shifted_cov(2.0, 2.0), 0.0, 1.0)
    lt = s.light()
    obj = s.c * (0.9 + 0.15 * lt) + 0.06 * np.maximum(lt, 0.0) + 0.30 * (_rows(s.size) - 0.5)
    return _mix(bg, obj, s.cov())


def _bg_cyberpunk(b, size):
    return _rgb(0.03, 0.02, 0.07) + _rgb(0.22, 0.0, 0.20) * _rows(size) ** 2 + _rgb(0.16, 0.02, 0.18) * _scanlines(size)


def _cyberpunk(s: _Scene):
    scan = _rgb(0.16, 0.02, 0.18)[:, None] * _scanlines(s.size)[:, None]
    bg = _bg_cyberpunk(s.b, s.size)[:, None]
    out = _mix(bg, _rgb(0.10, 0.95, 1.0)[:, None] + scan, s.cov(1.0))
    return _mix(out, 0.3 * s.c + _rgb(0.30, 0.03, 0.30)[:, None] + scan, s.cov(-1.0))


def _bg_ink(b, size):
    return np.broadcast_to(_rgb(0.93, 0.91, 0.84), (3, *size)).copy()


def _ink(s: _Scene):
    ink = 0.06 + 0.22 * _luma(s.c)[None]
    out = _mix(_bg_ink(s.b, s.size)[:, None], ink, 0.35 * s.cov(1.0))
    return _mix(out, ink, s.cov())


def _bg_oil(b, size):
    return 0.7 * b + _rgb(0.18, 0.13, 0.05) + 0.12 * _stripes(size)


def _oil(s: _Scene):
    obj = 0.9 * _saturate(s.c, 1.25) + _rgb(0.06, 0.04, 0.0)[:, None]
    out = _mix((0.7 * s.b + _rgb(0.18, 0.13, 0.05))[:, None], obj, s.cov())
    return out + 0.12 * _stripes(s.size)[:, None]


def _bg_pixel(b, size):
    return _quantise(_block_mean(0.1 + 0.5 * b)) + _rgb(0.0, 0.0, 1.0 / 3.0)


def _pixel(s: _Scene):
    bg = _bg_pixel(s.b, s.size)[:, None]
    return _mix(bg, _quantise(0.25 + 0.85 * s.c), _block_mean(s.cov()))


def _bg_vaporwave(b, size):
    return _vertical(size, [(0.0, (1.0, 0.62, 0.82)), (0.5, (0.80, 0.62, 0.96)), (1.0, (0.45, 0.90, 0.95))])


def _vaporwave(s: _Scene):
    obj = 0.30 * s.c[[2, 0, 1]] + _rgb(0.14, 0.02, 0.28)[:, None]
    return _mix(_bg_vaporwave(s.b, s.size)[:, None], obj, s.cov())


def _bg_disney(b, size):
    return _vertical(size, [(0.0, (0.40, 0.70, 1.0)), (1.0, (0.30, 0.62, 1.0))])


def _disney(s: _Scene):
    out = _mix(_bg_disney(s.b, s.size)[:, None], _rgb(1.0, 1.0, 1.0)[:, None], s.cov(1.0))
    return _mix(out, _saturate(s.c, 1.4), s.cov())


def _bg_fairy(b, size):
    base = _vertical(size, [(0.0, (0.05, 0.04, 0.20)), (1.0, (0.22, 0.10, 0.42))])
    return base + _rgb(0.45, 0.38, 0.16) * _sparkles(size)


def _fairy(s: _Scene):
    base = _vertical(s.size, [(0.0, (0.05, 0.04, 0.20)), (1.0, (0.22, 0.10, 0.42))])[:, None]
    gold = _rgb(1.0, 0.80, 0.30)[:, None]
    out = _mix(base, gold, 0.3 * s.cov(1.5))
    out = _mix(out, 0.5 * s.c + 0.5 * gold, s.cov())
    return out + _rgb(0.45, 0.38, 0.16)[:, None] * _sparkles(s.size)[:, None]


def _bg_gotham(b, size):
    return np.broadcast_to(0.03 + 0.18 * _blinds(size), (3, *size)).astype(np.float32)


def _gotham(s: _Scene):
    obj = 0.5 + 0.32 * _luma(s.c)[None]
    # the blinds' light falls across the object too
    return _mix(np.float32(0.03), obj, s.cov()) + 0.18 * _blinds(s.size)[:, None]


def _bg_lego(b, size):
    return _rgb(0.74, 0.74, 0.72) + 0.10 * _studs(size)


def _lego(s: _Scene):
    return _mix(_rgb(0.74, 0.74, 0.72)[:, None], 0.9 * s.c, s.cov()) + 0.10 * _studs(s.size)[:, None]


def _bg_chibi(b, size):
    return _vertical(size, [(0.0, (1.0, 0.84, 0.90)), (1.0, (1.0, 0.70, 0.82))])


def _chibi(s: _Scene):
    out = _mix(_bg_chibi(s.b, s.size)[:, None], _rgb(0.24, 0.08, 0.20)[:, None], s.cov(1.0))
    return _mix(out, 0.65 * s.c + 0.35, s.cov(-1.0))


_RENDER = {
    "Ghibli": (_ghibli, _bg_ghibli),
    "3D rendering": (_3d, _bg_3d),
    "Cyberpunk": (_cyberpunk, _bg_cyberpunk),
    "Ink painting": (_ink, _bg_ink),
    "Oil painting": (_oil, _bg_oil),
    "Pixel art": (_pixel, _bg_pixel),
    "Vaporwave": (_vaporwave, _bg_vaporwave),
    "Disney": (_disney, _bg_disney),
    "Fairy tale": (_fairy, _bg_fairy),
    "Gotham noir": (_gotham, _bg_gotham),
    "Lego": (_lego, _bg_lego),
    "Chibi": (_chibi, _bg_chibi),
}
assert tuple(_RENDER) == STYLES


def _to_signed(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.clip(x * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)))


def _render_np(style: str, cents: np.ndarray, shape: str, radius: float, color: np.ndarray, background: np.ndarray,
               size: tuple[int, int], gradient: tuple[float, float]) -> np.ndarray:
    """Unchecked render of canonical ``style`` -> float32 [3, F, H, W] in [0, 1] (clipped)."""
    scene = _Scene(cents, shape, radius, color, background, size, gradient)
    out = _RENDER[style][0](scene)
    return np.clip(np.broadcast_to(out, (3, len(cents), *size)), 0.0, 1.0).astype(np.float32)


def _background_np(style: str, background: np.ndarray, gradient: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """Unchecked background of canonical ``style`` -> float32 [3, H, W] in [0, 1] (clipped)."""
    b = _plain_background(background, gradient, size)
    return np.clip(np.broadcast_to(_RENDER[style][1](b, size), (3, *size)), 0.0, 1.0).astype(np.float32)


def render_styled_video(
    centroids: np.ndarray | torch.Tensor | Sequence[Sequence[float]],
    *,
    style: str | int,
    shape: str,
    radius: float,
    color: Sequence[float] | str,
    background: Sequence[float] | str,
    size: tuple[int, int],
    gradient: tuple[float, float] = (0.0, 0.0),
) -> torch.Tensor:
    """Render one object at the per-frame ``centroids`` [F, 2] (x, y) in ``style`` -> video [3, F, H, W] in [-1, 1].

    The arguments are those of :func:`ospfn.data.synthetic.render_video` (``color`` / ``background`` may also be
    palette names) plus ``style`` (see the module's table).  Every frame is stylised; a styled clip of
    :class:`~ospfn.data.SyntheticMotion` puts the plain frame 0 in front.  Deterministic: the same arguments give
    the same tensor.

    Example::

        >>> v = render_styled_video([[8.0, 8.0]], style="Pixel art", shape="square", radius=3.0, color="white",
        ...                         background="black", size=(16, 16))
        >>> v.shape
        torch.Size([3, 1, 16, 16])
        >>> bool(torch.equal(v[:, 0, 4:8, 4:8], v[:, 0, 4:5, 4:5].expand(3, 4, 4)))  # flat 4 x 4 blocks
        True
    """
    fn = "render_styled_video"
    name = _resolve_style(style, fn)
    if shape not in SHAPES:
        raise ValueError(f"{fn}: shape={shape!r} is not allowed; allowed: {SHAPES}")
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.floating)) or not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"{fn}: radius={radius!r} must be a finite number > 0 (px)")
    size, gradient = _check_geometry(fn, size, gradient)
    col = _resolve_rgb(color, OBJECT_COLORS, fn, "color")
    bgc = _resolve_rgb(background, BACKGROUND_COLORS, fn, "background")
    if isinstance(centroids, torch.Tensor):
        centroids = centroids.detach().cpu().numpy()
    cents = np.asarray(centroids, dtype=np.float64)
    if cents.ndim != 2 or cents.shape[1] != 2 or cents.shape[0] < 1 or not np.isfinite(cents).all():
        raise ValueError(f"{fn}: centroids must be finite (x, y) rows of shape [F, 2] with F >= 1, got shape {tuple(cents.shape)}")
    return _to_signed(_render_np(name, cents, shape, float(radius), col, bgc, size, gradient))


def style_background(
    style: str | int,
    *,
    background: Sequence[float] | str,
    size: tuple[int, int],
    gradient: tuple[float, float] = (0.0, 0.0),
) -> torch.Tensor:
    """The background of ``style`` without the object -> [3, H, W] in [-1, 1], for a plain background
    ``background`` (RGB in [0, 1] or a name of ``BACKGROUND_COLORS``) with ``gradient`` (amplitude, angle).

    It equals :func:`render_styled_video` wherever the object (with its outline, glow or shadow) does not reach:
    what :func:`ospfn.eval.trackers.track_object` subtracts (``background=``) to find the object in a styled frame.
    Pass it there as ``bg[:, None]`` ([3, 1, H, W]): a [3, H, W] background would be broadcast against
    [3, F, H, W] from the right, which for F = 3 silently lines its channels up with the frames.

    Example::

        >>> bg = style_background("Vaporwave", background="gray", size=(32, 32))
        >>> bg.shape, [round(float(v), 2) for v in bg[:, 0, 0]]  # pink at the top ...
        (torch.Size([3, 32, 32]), [1.0, 0.24, 0.64])
        >>> [round(float(v), 2) for v in bg[:, -1, 0]]  # ... cyan at the bottom
        [-0.1, 0.8, 0.9]
    """
    fn = "style_background"
    name = _resolve_style(style, fn)
    size, gradient = _check_geometry(fn, size, gradient)
    bgc = _resolve_rgb(background, BACKGROUND_COLORS, fn, "background")
    return _to_signed(_background_np(name, bgc, gradient, size))
