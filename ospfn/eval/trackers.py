"""Score generated videos of one moving object: where it is, whether it is still there, where it goes.

Built for the bundled tiny image-to-video model and its synthetic data (:class:`ospfn.data.SyntheticMotion`),
used by ``recipes/eval_tiny.py``:

* :func:`track_object` -- the object's centroid in every frame of a video, and whether it is present;
* :func:`motion_direction` -- the dominant direction ("left", "right", "up", "down") of such a track;
* :func:`caption_direction` -- the direction a caption names.

Conventions (those of :mod:`ospfn.data.synthetic`): videos are float ``[3, F, H, W]`` in ``[-1, 1]`` (RGB);
coordinates are ``(x, y)`` in pixels, ``x`` the column, ``y`` the row (growing downwards, so "up" means
decreasing ``y``), pixel centres at integer coordinates.

Example::

    >>> from ospfn.data import SyntheticMotion
    >>> from ospfn.eval.trackers import caption_direction, motion_direction, track_object
    >>> item = SyntheticMotion(4, frames=9, size=(32, 32), seed=0)[1]
    >>> caption_direction(item["caption"]) == item["direction"]
    True
    >>> cents, present = track_object(item["video"])
    >>> bool(present.all()), motion_direction(cents) == item["direction"]
    (True, True)
    >>> bool((cents - item["centroids"]).abs().max() < 0.5)
    True
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from ospfn.data.synthetic import DIRECTIONS

__all__ = ["track_object", "motion_direction", "caption_direction"]


def _check_video(video: object, fn: str) -> np.ndarray:
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(video)
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{fn}: video must be a torch.Tensor [3, F, H, W], got {type(video).__name__}")
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"{fn}: video must have shape [3, F, H, W], got {tuple(video.shape)}")
    if video.shape[2] < 3 or video.shape[3] < 3:
        raise ValueError(f"{fn}: video frames must be at least 3 x 3, got {tuple(video.shape[2:])}")
    if not video.is_floating_point():
        raise TypeError(f"{fn}: video must be a float tensor in [-1, 1], got dtype {video.dtype}")
    return video.detach().to(device="cpu", dtype=torch.float64).numpy()


def _border_plane(frames: np.ndarray, threshold: float) -> np.ndarray:
    """Per-frame, per-channel plane a + b x + c y fitted to the 2-px border ring -> background [F, 3, H, W].

    Least squares, refitted once without the border pixels whose residual (L2 over channels) exceeds
    ``threshold`` (e.g. an object touching the edge), as long as at least half the ring remains.
    """
    nf, _, h, w = frames.shape
    ring = np.zeros((h, w), dtype=bool)
    b = 2 if min(h, w) >= 8 else 1
    ring[:b, :] = ring[-b:, :] = ring[:, :b] = ring[:, -b:] = True
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    design_full = np.stack([np.ones_like(xx), (xx - (w - 1) / 2) / w, (yy - (h - 1) / 2) / h], -1)  # [H, W, 3]
    design = design_full[ring]  # [N, 3]
    vals = frames.transpose(0, 2, 3, 1)[:, ring]  # [F, N, 3]

    def fit(wts: np.ndarray) -> np.ndarray:  # weighted normal equations, batched over frames -> [F, 3, 3]
        aw = design[None] * wts[..., None]  # [F, N, 3]
        return np.linalg.solve(aw.transpose(0, 2, 1) @ design[None], aw.transpose(0, 2, 1) @ vals)

    coef = fit(np.ones((nf, design.shape[0])))
    res = np.linalg.norm(vals - design[None] @ coef, axis=-1)  # [F, N]
    keep = res <= threshold
    redo = keep.sum(1) >= design.shape[0] // 2  # enough of the ring left to refit without the outliers
    coef = fit(np.where(redo[:, None], keep, True).astype(np.float64))
    out = design_full[None] @ coef[:, None]  # [F, H, W, 3]
    return out.transpose(0, 3, 1, 2)


def _box3(x: np.ndarray) -> np.ndarray:
    """3 x 3 mean over the last two axes, edges replicated."""
    h, w = x.shape[-2:]
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    return sum(p[..., i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def _dilate3(m: np.ndarray) -> np.ndarray:
    """3 x 3 binary dilation over the last two axes."""
    h, w = m.shape[-2:]
    p = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)])
    out = np.zeros_like(m)
    for i in range(3):
        for j in range(3):
            out |= p[..., i : i + h, j : j + w]
    return out


def track_object(
    video: torch.Tensor,
    background: torch.Tensor | Sequence[float] | None = None,
    threshold: float = 0.35,
    min_area: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Locate the single object in every frame of ``video`` [3, F, H, W] (in [-1, 1]).

    Per frame:

    1. background: ``background`` if given (RGB [3], or anything broadcastable to [3, F, H, W], in [-1, 1]);
       otherwise a plane ``a + b x + c y`` per channel least-squares fitted to the 2-px border ring (robust
       refit without outlying border pixels), which absorbs mild gradients;
    2. ``diff = frame - background``, smoothed by a 3 x 3 box filter (suppresses pixel noise);
       ``dist = ||diff||_2`` over the channels;
    3. object pixels: ``dist > threshold`` (L2 distance in [-1, 1] units; the dataset's object/background pairs
       are >= 1.0 apart, a noise of std 0.1 smoothed is ~0.06);
    4. ``present`` when the object pixels number at least ``min_area`` (default ``max(4, round(H * W / 256))``,
       i.e. 4 px at 32 x 32);
    5. centroid: the ``dist``-weighted mean (x, y) over the object pixels dilated by 1 px.  The weight is
       proportional to the object's coverage, so this is the object's area centroid with anti-aliased edges,
       and a symmetric blur of the video leaves it unchanged.

    Returns ``(centroids, present)``: float32 [F, 2] (x = column, y = row, NaN where not present) and bool [F].

    Limitations: assumes one object and a background that is (close to) flat or linear; several blobs give the
    centroid of their union.

    Example::

        >>> import torch
        >>> v = torch.full((3, 2, 16, 16), -1.0)
        >>> v[:, 0, 4:8, 10:14] = 1.0  # a 4 x 4 white square, columns 10..13, rows 4..7; frame 1 empty
        >>> c, p = track_object(v)
        >>> c[0].tolist(), p.tolist(), bool(c[1].isnan().all())
        ([11.5, 5.5], [True, False], True)
    """
    fn = "track_object"
    v = _check_video(video, fn)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold > 0:
        raise ValueError(f"{fn}: threshold={threshold!r} must be a positive number")
    _, nf, h, w = v.shape
    if min_area is None:
        min_area = max(4, round(h * w / 256))
    if isinstance(min_area, bool) or not isinstance(min_area, int) or min_area < 1:
        raise ValueError(f"{fn}: min_area={min_area!r} must be a positive int")
    frames = v.transpose(1, 0, 2, 3)  # [F, 3, H, W], float64 (numpy: no torch thread pool for small frames)
    if background is None:
        bg = _border_plane(frames, threshold)
    else:
        bgt = np.asarray(background.detach().cpu() if isinstance(background, torch.Tensor) else background,
                         dtype=np.float64)
        if bgt.ndim == 1:
            bgt = bgt[:, None, None, None]
        try:
            bg = np.broadcast_to(bgt, v.shape).transpose(1, 0, 2, 3)
        except ValueError:
            raise ValueError(
                f"{fn}: background of shape {tuple(bgt.shape)} does not broadcast to the video's {tuple(v.shape)}; "
                "allowed: [3] or shapes broadcastable to [3, F, H, W]"
            ) from None
    dist = np.linalg.norm(_box3(frames - bg), axis=1)  # [F, H, W]
    mask = dist > threshold
    present = mask.reshape(nf, -1).sum(1) >= min_area
    wgt = np.where(_dilate3(mask), dist, 0.0)
    tot = np.maximum(wgt.reshape(nf, -1).sum(1), 1e-12)
    cx = (wgt * np.arange(w, dtype=np.float64)[None, None, :]).reshape(nf, -1).sum(1) / tot
    cy = (wgt * np.arange(h, dtype=np.float64)[None, :, None]).reshape(nf, -1).sum(1) / tot
    cents = np.stack([cx, cy], 1).astype(np.float32)
    cents[~present] = np.nan
    return torch.from_numpy(cents), torch.from_numpy(present)


def motion_direction(
    centroids: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    *,
    min_displacement: float = 2.0,
    min_present: int = 2,
) -> str | None:
    """The dominant direction ("left", "right", "up", "down") of a track of (x, y) ``centroids`` [F, 2].

    Rows with NaN (object absent) are ignored.  The velocity is the least-squares slope of x and y over the frame
    index of the remaining rows (robust to single-frame tracking jitter); the net displacement is that velocity
    times the frames between the first and last present rows.  The axis with the larger absolute displacement
    wins, its sign gives the direction (y grows downwards: negative is "up").

    Returns ``None`` when fewer than ``min_present`` frames are present (the object is lost) or the net
    displacement is shorter than ``min_displacement`` px (it barely moves).

    Example::

        >>> motion_direction([[10.0, 5.0], [8.0, 5.2], [6.0, 5.1]])
        'left'
        >>> motion_direction([[10.0, 5.0], [10.2, 5.1], [10.1, 5.3]]) is None
        True
    """
    fn = "motion_direction"
    if isinstance(centroids, torch.Tensor):
        centroids = centroids.detach().cpu().numpy()
    c = np.asarray(centroids, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"{fn}: centroids must have shape [F, 2], got {tuple(c.shape)}")
    if not isinstance(min_displacement, (int, float)) or min_displacement < 0:
        raise ValueError(f"{fn}: min_displacement={min_displacement!r} must be a non-negative number")
    if isinstance(min_present, bool) or not isinstance(min_present, int) or min_present < 2:
        raise ValueError(f"{fn}: min_present={min_present!r} must be an int >= 2")
    ok = ~np.isnan(c).any(1)
    if int(ok.sum()) < min_present:
        return None
    t = np.arange(c.shape[0], dtype=np.float64)[ok]
    c = c[ok]
    tc = t - t.mean()
    vel = (tc[:, None] * (c - c.mean(0))).sum(0) / (tc * tc).sum()  # [2] px / frame
    dx, dy = (float(d) for d in vel * (t[-1] - t[0]))
    if max(abs(dx), abs(dy)) < min_displacement:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


_DIR_RE = re.compile(r"\b(left|right|up|down)\b", re.IGNORECASE)


def caption_direction(caption: str) -> str:
    """The motion direction named in ``caption``: the one word of left / right / up / down it contains.

    Matches whole words, case-insensitively ("upper" or "downtown" do not count).  ``ValueError`` when the caption
    names none, or names two different directions.

    Example::

        >>> caption_direction("a small red circle moving left on a navy background")
        'left'
        >>> caption_direction("A large cyan square moving Up on a black background")
        'up'
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption_direction: caption must be a str, got {type(caption).__name__}")
    found = {m.lower() for m in _DIR_RE.findall(caption)}
    if len(found) != 1:
        what = "no direction word" if not found else f"several directions {sorted(found)}"
        raise ValueError(
            f"caption_direction: caption {caption!r} contains {what}; it must name exactly one of {DIRECTIONS}"
        )
    return found.pop()
