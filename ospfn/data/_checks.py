"""Argument checks shared by the :mod:`ospfn.data` modules (package-internal)."""

from __future__ import annotations

import math

_UNSET = object()

MAX_FRAMES = 100_000  # frames per clip a data function accepts (a typo like 1e9 would build huge index lists)
MAX_ITEM_BYTES = 8 * 2**30  # the float32 video [3, F, H, W] of one item; more is a typo, not a training clip


def is_int(v: object) -> bool:
    """An int, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: object) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_sampling_args(
    fn: str, num_frames: object, train_fps: object, *, fps: object = _UNSET, frames_arg: str = "num_frames"
) -> None:
    """``ValueError`` (prefixed with ``fn``, naming the argument) unless ``num_frames`` is a positive int and
    ``fps`` (when given) and ``train_fps`` are positive numbers: the arguments of frame resampling, shared by
    :func:`~ospfn.data.sampling.resample_offsets`, :func:`~ospfn.data.index.filter_clips` (where the frame count
    is called ``sample_num_frames``) and :class:`~ospfn.data.video.VideoDataset`.

    Example::

        >>> check_sampling_args("f", 49, 16)
        >>> check_sampling_args("f", 0, 16, frames_arg="sample_num_frames")
        Traceback (most recent call last):
        ...
        ValueError: f: sample_num_frames=0 must be a positive int
    """
    if not is_int(num_frames) or num_frames < 1:
        raise ValueError(f"{fn}: {frames_arg}={num_frames!r} must be a positive int")
    if num_frames > MAX_FRAMES:
        raise ValueError(f"{fn}: {frames_arg}={num_frames!r} is more than the {MAX_FRAMES} frames a clip may have")
    if fps is not _UNSET and (not is_num(fps) or fps <= 0):
        raise ValueError(f"{fn}: fps={fps!r} must be a positive number")
    if not is_num(train_fps) or train_fps <= 0:
        raise ValueError(f"{fn}: train_fps={train_fps!r} must be a positive number")


def check_item_size(fn: str, frames: int, height: int, width: int, what: str) -> None:
    """``ValueError`` (naming ``what``, e.g. ``"frames=9, size=(32, 32)"``) when one item's float32 video
    [3, frames, height, width] would exceed ``MAX_ITEM_BYTES`` -- refused before anything is allocated.

    Example::

        >>> check_item_size("f", 49, 480, 832, "num_frames=49, bucket (480, 832)")
        >>> check_item_size("f", 49, 100_000, 100_000, "num_frames=49, bucket (100000, 100000)")
        Traceback (most recent call last):
        ...
        ValueError: f: num_frames=49, bucket (100000, 100000) gives items of 5880.0 GB (a float32 video [3, 49, 100000, 100000]); at most 8.6 GB is allowed
    """
    nbytes = 12 * frames * height * width
    if nbytes > MAX_ITEM_BYTES:
        raise ValueError(
            f"{fn}: {what} gives items of {nbytes / 1e9:.1f} GB (a float32 video [3, {frames}, {height}, {width}]); "
            f"at most {MAX_ITEM_BYTES / 1e9:.1f} GB is allowed"
        )
