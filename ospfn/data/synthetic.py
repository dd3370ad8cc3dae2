"""Deterministic synthetic motion videos for the bundled tiny image-to-video model.

:class:`SyntheticMotion` renders one coloured object (circle, square, triangle or diamond) on a plain background
(with a mild brightness gradient), moving in a straight line left, right, up or down at constant speed, with a
caption such as ``"a small red circle moving left on a navy background"``.  A tiny model on a 2-core CPU can learn
it (few colours and shapes, one object, constant velocity) yet it is not trivial: the model has to keep the
object's colour and shape from the first frame, move it in the direction the caption names, at a speed it must
infer, over a background that is not perfectly flat.

:mod:`ospfn.eval.trackers` scores such videos, generated ones included: where is the object in every frame, is
it still there, and does it move the way the caption says.

Image-to-stylised-video (I2SV): with ``styles=`` every item also gets one of the 12 rendering styles of
:data:`ospfn.styles.STYLES` (:mod:`ospfn.data.stylize` renders them).  Its frame 0 stays the plain rendering (the
condition image), frames 1..F-1 show the same object on the same path in that style; the caption stays the plain
caption (the trainer wraps it in the style's template).  :mod:`ospfn.eval.styles` scores such videos.

Conventions
-----------
* Videos are float32 ``[3, F, H, W]`` in ``[-1, 1]`` (RGB).
* Coordinates are ``(x, y)`` in pixels: ``x`` is the column, ``y`` the row (growing downwards), pixel centres
  at integer coordinates, so the frame spans ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``.  "up" means decreasing ``y``.
* Ground-truth ``centroids`` are the area centroid of the object's ideal (continuous) shape in every frame.

Rendering
---------
Edges are anti-aliased: every pixel is the average of a 4 x 4 grid of sub-samples at offsets
``(-3/8, -1/8, 1/8, 3/8)`` px from its centre, each sub-sample inside or outside the ideal shape.  So a pixel is
``background * (1 - c) + colour * c`` with coverage ``c`` in multiples of 1/16, and sub-pixel motion is visible.
Object sizes scale with ``m = min(H, W)``: radius ``0.11 m`` ("small") or ``0.17 m`` ("large"); the square's
half-side is ``0.886 r``, the diamond's half-diagonal ``1.2 r``, the (equilateral, pointing up) triangle's
circumradius ``1.35 r``.  Speeds are drawn uniformly from ``[1, 2.5] * m / 32`` px/frame, capped so that the
object (plus a 1 px margin) stays fully inside the frame for the whole clip; the start position is then drawn
from the positions that keep the whole path inside.

Determinism and the held-out split
----------------------------------
Item ``i`` is drawn from its own ``numpy.random.Generator`` seeded with ``SeedSequence([seed, split_id, i])``
(no global RNG state is read or changed), so it depends only on ``(seed, split, i)``: the same item twice gives
identical tensors, in any process and in DataLoader workers.  A styled item draws its style (uniformly from
``styles``) from the same generator after all the other draws, so its plain parameters, caption and frame 0 are
those of the unstyled item ``i`` (and the split argument below holds for styled datasets too).

Disjointness of ``split="eval"`` from ``split="train"`` does not rest on the seeds alone: the object's start
centre lies on a quarter-pixel lattice ``(qx / 4, qy / 4)`` and train items always have ``qx + qy`` even, eval
items odd.  A shift of the object by a non-zero lattice vector shifts its set of covered sub-samples by whole
sub-samples, which changes the coverage sums of the first (or last) pixel column or row the object touches (the
shapes are convex and wider than a pixel), so the first frames differ in pixel values.  Hence no eval first frame
(and so no eval (first frame, caption) pair) equals any train first frame, whatever the seeds or sizes.

Example::

    >>> from ospfn.data.synthetic import SyntheticMotion
    >>> ds = SyntheticMotion(4, frames=9, size=(32, 32), seed=0)
    >>> item = ds[1]
    >>> item["video"].shape, item["video"].dtype
    (torch.Size([3, 9, 32, 32]), torch.float32)
    >>> item["direction"] in item["caption"].split(), item["centroids"].shape
    (True, torch.Size([9, 2]))
    >>> styled = SyntheticMotion(4, frames=9, size=(32, 32), seed=0, styles="all")[1]
    >>> styled["style"], styled["style_id"], styled["caption"] == item["caption"]
    ('Ghibli', 0, True)
    >>> bool(torch.equal(styled["video"][:, 0], item["video"][:, 0]))  # frame 0 is the plain one
    True
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ospfn.data._checks import check_item_size
from ospfn.styles import STYLES, style_name

__all__ = [
    "SyntheticMotion",
    "render_video",
    "DIRECTIONS",
    "SHAPES",
    "OBJECT_COLORS",
    "BACKGROUND_COLORS",
    "SIZES",
    "MAX_NUM_SAMPLES",
]

DIRECTIONS = ("left", "right", "up", "down")
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
# RGB in [0, 1].  Every object colour is at least ~1.0 (L2, in [-1, 1] units) away from every background colour.
OBJECT_COLORS = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.15, 0.80, 0.20),
    "yellow": (0.95, 0.85, 0.10),
    "cyan": (0.10, 0.80, 0.90),
    "magenta": (0.85, 0.20, 0.85),
    "white": (0.97, 0.97, 0.97),
}
BACKGROUND_COLORS = {
    "black": (0.06, 0.06, 0.06),
    "gray": (0.42, 0.42, 0.42),
    "navy": (0.08, 0.10, 0.38),
    "brown": (0.36, 0.22, 0.10),
    "purple": (0.30, 0.10, 0.35),
}

MAX_NUM_SAMPLES = 10**8  # more is a typo: a sampler permuting that many indices needs 800 MB per permutation
_SPLITS = {"train": 0, "eval": 1}
_RADIUS = {"small": 0.11, "large": 0.17}  # times min(H, W)
_EXTENT = {"circle": 1.0, "square": 0.886, "triangle": 1.35, "diamond": 1.2}  # max |offset| from centroid / r
_SPEED = (1.0, 2.5)  # px / frame at min(H, W) = 32
_MIN_SPEED = 0.25  # px / frame at min(H, W) = 32: below this the configuration is refused
_MARGIN = 1.0  # px between the object and the frame edge, at every frame
_GRADIENT_MAX = 0.08  # peak-to-peak brightness change across the frame (in [0, 1] units), drawn in [0, max]
_SUB = 4  # anti-aliasing sub-samples per pixel and axis
_SEED_TAG = 0x05F9_D47A  # mixed into every item's SeedSequence


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of sub-sample offsets (dx, dy) from the centroid that lie inside ``shape`` of radius ``r``."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = 0.886 * r
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.2 * r
    if shape == "triangle":  # equilateral, pointing up, centroid at the origin, circumradius R
        big_r = 1.35 * r
        return (dy <= big_r / 2) & (np.abs(dx) * math.sqrt(3.0) <= dy + big_r)
    raise ValueError(f"_inside: unknown shape {shape!r}; allowed: {SHAPES}")


def render_video(
    centroids: np.ndarray | torch.Tensor | Sequence[Sequence[float]],
    *,
    shape: str,
    radius: float,
    color: Sequence[float],
    background: Sequence[float],
    size: tuple[int, int],
    gradient: tuple[float, float] = (0.0, 0.0),
) -> torch.Tensor:
    """Render one object at the given per-frame ``centroids`` [F, 2] (x, y) -> video [3, F, H, W] in [-1, 1].

    ``color`` / ``background`` are RGB in [0, 1]; ``gradient = (amplitude, angle)`` adds
    ``amplitude * ((x - cx) cos(angle) + (y - cy) sin(angle)) / min(H, W)`` to every background channel.
    Anti-aliased with a 4 x 4 sub-sample grid per pixel (see the module docstring).

    Example::

        >>> import torch
        >>> v = render_video(torch.tensor([[8.0, 8.0]]), shape="square", radius=4.0, color=(1, 1, 1),
        ...                  background=(0, 0, 0), size=(16, 16))
        >>> v.shape, float(v.max()), float(v.min())
        (torch.Size([3, 1, 16, 16]), 1.0, -1.0)
    """
    if shape not in SHAPES:
        raise ValueError(f"render_video: shape={shape!r} is not allowed; allowed: {SHAPES}")
    h, w = size
    cov = _coverage(centroids, shape, radius, (h, w))  # [F, H, W]
    bg = _plain_background(background, gradient, (h, w))  # [3, H, W]
    col = np.asarray(color, dtype=np.float32)[:, None, None, None]
    vid = bg[:, None] * (1.0 - cov[None]) + col * cov[None]  # [3, F, H, W]
    vid = np.clip(vid * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(vid))


def _coverage(
    centroids: np.ndarray | torch.Tensor | Sequence[Sequence[float]], shape: str, radius: float, size: tuple[int, int]
) -> np.ndarray:
    """Anti-aliased coverage float32 [F, H, W] in multiples of 1/16 of ``shape`` (radius ``radius``) centred at
    every row of ``centroids`` [F, 2] (x, y): the fraction of each pixel's 4 x 4 sub-samples inside the shape.

    Shared by :func:`render_video` and :mod:`ospfn.data.stylize` (which also calls it with a scaled ``radius``
    for outlines: all four shapes scale about their centroid).
    """
    h, w = size
    cent = np.asarray(centroids, dtype=np.float64).reshape(-1, 2)
    nf = cent.shape[0]
    offs = (np.arange(_SUB, dtype=np.float64) + 0.5) / _SUB - 0.5  # -3/8, -1/8, 1/8, 3/8
    xs = (np.arange(w, dtype=np.float64)[:, None] + offs[None, :]).reshape(-1)  # [W * SUB]
    ys = (np.arange(h, dtype=np.float64)[:, None] + offs[None, :]).reshape(-1)  # [H * SUB]
    dx = xs[None, None, :] - cent[:, 0, None, None]  # [F, 1, W*SUB]
    dy = ys[None, :, None] - cent[:, 1, None, None]  # [F, H*SUB, 1]
    inside = _inside(shape, dx, dy, radius)  # [F, H*SUB, W*SUB]
    return inside.reshape(nf, h, _SUB, w, _SUB).sum((2, 4)).astype(np.float32) / (_SUB * _SUB)  # [F, H, W]


def _plain_background(background: Sequence[float], gradient: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """The plain background float32 [3, H, W] in [0, 1]: ``background`` plus the gradient ramp, clipped."""
    h, w = size
    amp, ang = gradient
    m = float(min(h, w))
    gx = (np.arange(w, dtype=np.float32) - (w - 1) / 2) * math.cos(ang)
    gy = (np.arange(h, dtype=np.float32) - (h - 1) / 2) * math.sin(ang)
    ramp = amp * (gy[:, None] + gx[None, :]) / m  # [H, W]
    return np.clip(np.asarray(background, dtype=np.float32)[:, None, None] + ramp[None], 0.0, 1.0)  # [3, H, W]


def _check_styles(styles: object) -> tuple[str, ...] | None:
    """``styles`` of :class:`SyntheticMotion` -> None or a tuple of distinct canonical style names."""
    allowed = f"None, 'all' or a non-empty sequence of distinct style names from {list(STYLES)}"
    if styles is None:
        return None
    if isinstance(styles, str):
        if styles.strip().lower() == "all":
            return STYLES
        raise ValueError(f"SyntheticMotion: styles={styles!r} is not allowed; allowed: {allowed} (for one style pass [{styles!r}])")
    if not isinstance(styles, Sequence) or len(styles) == 0:
        raise ValueError(f"SyntheticMotion: styles={styles!r} is not allowed; allowed: {allowed}")
    names = []
    for s in styles:
        try:
            names.append(style_name(s))
        except (TypeError, ValueError):
            raise ValueError(f"SyntheticMotion: styles={styles!r} has an unknown style {s!r}; allowed: {allowed}") from None
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"SyntheticMotion: styles={styles!r} names {dup} more than once; allowed: {allowed}")
    return tuple(names)


class SyntheticMotion(Dataset):
    """``num_samples`` deterministic clips of one coloured object moving in a straight line (see module docs).

    Args:
        num_samples: number of items (``len``), in [1, ``MAX_NUM_SAMPLES``].
        frames: frames per clip ``F`` (>= 2; the tiny model uses ``4 k + 1``).
        size: ``(H, W)`` in pixels (each >= 16).
        split: ``"train"`` or ``"eval"`` (held out: no eval first frame equals a train first frame).
        seed: non-negative int; item ``i`` depends only on ``(seed, split, i)``.
        styles: ``None`` (plain clips), ``"all"`` (the 12 styles of :data:`ospfn.styles.STYLES`) or a non-empty
            sequence of distinct style names (any spelling :func:`ospfn.styles.style_name` accepts): each item
            draws one uniformly; its frame 0 is plain, frames 1.. in the style (:mod:`ospfn.data.stylize`).

    ``ValueError`` (naming the argument) for a bad argument, including an item larger than 8 GiB of float32
    (``ospfn.data._checks.MAX_ITEM_BYTES``) and ``frames`` too many for ``size``: the
    largest object must still be able to move at >= ``0.25 * min(H, W) / 32`` px/frame and stay inside (at
    32 x 32 up to 56 frames; from about 17 frames on, the larger objects move slower than 1 px/frame).

    Item ``i`` is a dict: ``video`` float32 [3, F, H, W] in [-1, 1]; ``caption`` str; ``direction``, ``shape``,
    ``color``, ``background``, ``size`` (``"small"``/``"large"``) str; ``speed`` float (px/frame);
    ``centroids`` float32 [F, 2] ground-truth (x, y); ``background_rgb`` float32 [3] (the base background colour,
    in [-1, 1]); ``index`` int; ``gradient`` float32 [2] (the background gradient's amplitude and angle, as
    :func:`render_video` takes it); ``radius`` float (px).  With ``styles``, also ``style`` (the canonical name)
    and ``style_id`` (its index in :data:`ospfn.styles.STYLES`).  Negative indices count from the end; others
    raise ``IndexError``.

    Example::

        >>> ds = SyntheticMotion(8, frames=5, size=(32, 48), split="eval", seed=3)
        >>> len(ds), ds[0]["video"].shape
        (8, torch.Size([3, 5, 32, 48]))
        >>> import torch
        >>> again = SyntheticMotion(8, frames=5, size=(32, 48), split="eval", seed=3)
        >>> bool(torch.equal(ds[5]["video"], again[5]["video"]))
        True
        >>> SyntheticMotion(8, styles=["pixel art", "Lego"])
        SyntheticMotion(num_samples=8, frames=9, size=(32, 32), split='train', seed=0, styles=('Pixel art', 'Lego'))
    """

    def __init__(
        self,
        num_samples: int,
        *,
        frames: int = 9,
        size: tuple[int, int] = (32, 32),
        split: str = "train",
        seed: int = 0,
        styles: str | Sequence[str] | None = None,
    ):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 1 <= num_samples <= MAX_NUM_SAMPLES:
            raise ValueError(f"SyntheticMotion: num_samples={num_samples!r} must be an int in [1, {MAX_NUM_SAMPLES}]")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise ValueError(f"SyntheticMotion: frames={frames!r} must be an int >= 2")
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 16 for s in size)
        ):
            raise ValueError(f"SyntheticMotion: size={size!r} must be a pair of ints (H, W), each >= 16")
        check_item_size("SyntheticMotion", frames, size[0], size[1], f"frames={frames}, size={tuple(size)!r}")
        if split not in _SPLITS:
            raise ValueError(f"SyntheticMotion: split={split!r} is not allowed; allowed: {tuple(_SPLITS)}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"SyntheticMotion: seed={seed!r} must be a non-negative int")
        self.styles = _check_styles(styles)
        self.num_samples = num_samples
        self.frames = frames
        self.size = (int(size[0]), int(size[1]))
        self.split = split
        self.seed = seed
        m = min(self.size)
        worst = max(_EXTENT.values()) * max(_RADIUS.values()) * m + _MARGIN
        cap = (m - 1 - 2 * worst - 0.5) / (frames - 1)  # the same cap as _params, for the largest object
        if cap < _MIN_SPEED * m / 32:
            raise ValueError(
                f"SyntheticMotion: frames={frames} is too many for size={self.size}: the largest object could move "
                f"at most {cap:.3f} px/frame and stay inside the frame; need >= {_MIN_SPEED * m / 32:.3f}"
            )

    def __len__(self) -> int:
        return self.num_samples

    def _params(self, index: int) -> dict:
        rng = np.random.default_rng(np.random.SeedSequence([_SEED_TAG, self.seed, _SPLITS[self.split], index]))
        h, w = self.size
        m = min(h, w)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size_name = SIZES[int(rng.integers(len(SIZES)))]
        color = list(OBJECT_COLORS)[int(rng.integers(len(OBJECT_COLORS)))]
        background = list(BACKGROUND_COLORS)[int(rng.integers(len(BACKGROUND_COLORS)))]
        direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        grad_amp = float(rng.uniform(0.0, _GRADIENT_MAX))
        grad_ang = float(rng.uniform(0.0, 2.0 * math.pi))
        radius = _RADIUS[size_name] * m
        ext = _EXTENT[shape] * radius + _MARGIN
        # centre ranges keeping the object + margin inside [-0.5, L - 0.5]
        lo_x, hi_x = -0.5 + ext, w - 0.5 - ext
        lo_y, hi_y = -0.5 + ext, h - 0.5 - ext
        axis_len = (hi_x - lo_x) if direction in ("left", "right") else (hi_y - lo_y)
        frames = self.frames
        s_lo, s_hi = _SPEED[0] * m / 32, _SPEED[1] * m / 32
        cap = (axis_len - 0.5) / (frames - 1)  # leave room for the quarter-pixel rounding of the start
        s_hi = min(s_hi, cap)
        s_lo = min(s_lo, s_hi)
        speed = float(rng.uniform(s_lo, s_hi))
        travel = speed * (frames - 1)
        sign = -1.0 if direction in ("left", "up") else 1.0
        # start ranges on the moving axis (continuous), then the quarter-pixel lattice
        if direction in ("left", "right"):
            ax_lo, ax_hi, pp_lo, pp_hi = lo_x, hi_x, lo_y, hi_y
        else:
            ax_lo, ax_hi, pp_lo, pp_hi = lo_y, hi_y, lo_x, hi_x
        if sign > 0:
            a_lo, a_hi = ax_lo, ax_hi - travel
        else:
            a_lo, a_hi = ax_lo + travel, ax_hi
        qa_lo, qa_hi = math.ceil(a_lo * _SUB), math.floor(a_hi * _SUB)
        qp_lo, qp_hi = math.ceil(pp_lo * _SUB), math.floor(pp_hi * _SUB)
        qa = int(rng.integers(qa_lo, qa_hi + 1))
        qp = int(rng.integers(qp_lo, qp_hi + 1))
        want = _SPLITS[self.split]  # parity of qx + qy: 0 for train, 1 for eval
        if (qa + qp) % 2 != want:  # move the perpendicular coordinate by one lattice step, staying in range
            qp = qp + 1 if qp + 1 <= qp_hi else qp - 1
        if direction in ("left", "right"):
            x0, y0 = qa / _SUB, qp / _SUB
            vel = (sign * speed, 0.0)
        else:
            x0, y0 = qp / _SUB, qa / _SUB
            vel = (0.0, sign * speed)
        t = np.arange(frames, dtype=np.float64)
        cents = np.stack([x0 + vel[0] * t, y0 + vel[1] * t], axis=1)
        # the style is drawn after everything else, so a styled item's plain parameters are the unstyled item's
        style = None if self.styles is None else self.styles[int(rng.integers(len(self.styles)))]
        return dict(
            style=style,
            shape=shape,
            size=size_name,
            color=color,
            background=background,
            direction=direction,
            speed=speed,
            radius=radius,
            gradient=(grad_amp, grad_ang),
            centroids=cents,
        )

    def __getitem__(self, index: int) -> dict:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"SyntheticMotion.__getitem__: index={index!r} must be an int")
        n = self.num_samples
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"SyntheticMotion.__getitem__: index={index} is out of range for {n} samples")
        p = self._params(i)
        video = render_video(
            p["centroids"] if p["style"] is None else p["centroids"][:1],  # styled: only frame 0 is plain
            shape=p["shape"],
            radius=p["radius"],
            color=OBJECT_COLORS[p["color"]],
            background=BACKGROUND_COLORS[p["background"]],
            size=self.size,
            gradient=p["gradient"],
        )
        if p["style"] is not None:  # frame 0 stays plain, frames 1.. in the style
            from ospfn.data.stylize import render_styled_video

            styled = render_styled_video(
                p["centroids"][1:],
                style=p["style"],
                shape=p["shape"],
                radius=p["radius"],
                color=OBJECT_COLORS[p["color"]],
                background=BACKGROUND_COLORS[p["background"]],
                size=self.size,
                gradient=p["gradient"],
            )
            video = torch.cat([video[:, :1], styled], dim=1)
        caption = f"a {p['size']} {p['color']} {p['shape']} moving {p['direction']} on a {p['background']} background"
        item = {
            "video": video,
            "caption": caption,
            "direction": p["direction"],
            "shape": p["shape"],
            "color": p["color"],
            "background": p["background"],
            "speed": p["speed"],
            "size": p["size"],
            "centroids": torch.tensor(p["centroids"], dtype=torch.float32),
            "background_rgb": torch.tensor(BACKGROUND_COLORS[p["background"]], dtype=torch.float32) * 2 - 1,
            "index": i,
            "gradient": torch.tensor(p["gradient"], dtype=torch.float32),
            "radius": float(p["radius"]),
        }
        if p["style"] is not None:
            item["style"] = p["style"]
            item["style_id"] = STYLES.index(p["style"])
        return item

    def __repr__(self) -> str:
        styles = "" if self.styles is None else f", styles={self.styles!r}"
        return (
            f"SyntheticMotion(num_samples={self.num_samples}, frames={self.frames}, size={self.size}, "
            f"split={self.split!r}, seed={self.seed}{styles})"
        )
