"""Aspect-ratio buckets: pick the bucket nearest a clip's aspect ratio, then resize and centre-crop to it.

Example::

    >>> from ospfn.data.buckets import choose_bucket
    >>> choose_bucket(720, 1280, [(480, 832), (832, 480), (640, 640)])
    (480, 832)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ospfn.data._checks import is_int

__all__ = ["choose_bucket"]


def _check_buckets(buckets: object, fn: str) -> list[tuple[int, int]]:
    ok = isinstance(buckets, (list, tuple)) and len(buckets) > 0
    if ok:
        for b in buckets:
            if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(is_int(v) and v > 0 for v in b)):
                ok = False
                break
    if not ok:
        raise ValueError(f"{fn}: buckets={buckets!r} must be a non-empty list of (height, width) positive int pairs")
    return [(int(b[0]), int(b[1])) for b in buckets]


def choose_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (h, w) whose aspect ratio is nearest to ``height / width`` (in log ratio; ties: first listed).

    Example::

        >>> choose_bucket(64, 48, [(480, 832), (832, 480)])
        (832, 480)
    """
    bl = _check_buckets(buckets, "choose_bucket")
    if not (is_int(height) and is_int(width) and height > 0 and width > 0):
        raise ValueError(f"choose_bucket: height={height!r}, width={width!r} must be positive ints")
    target = math.log(height / width)
    return min(bl, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def _resize_crop(frames: np.ndarray, bucket: tuple[int, int], chunk: int = 8) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [3, N, bh, bw] in [-1, 1]: cover-resize (bilinear, antialiased), centre crop."""
    n, h, w, _ = frames.shape
    bh, bw = bucket
    scale = max(bh / h, bw / w)
    nh, nw = max(bh, int(round(h * scale))), max(bw, int(round(w * scale)))
    top, left = (nh - bh) // 2, (nw - bw) // 2
    out = torch.empty(n, 3, bh, bw, dtype=torch.float32)
    src = torch.from_numpy(frames)
    for s in range(0, n, chunk):  # bounded memory for long, large clips
        x = src[s : s + chunk].permute(0, 3, 1, 2).to(torch.float32)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        out[s : s + chunk] = x[:, :, top : top + bh, left : left + bw]
    return (out / 127.5 - 1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()
