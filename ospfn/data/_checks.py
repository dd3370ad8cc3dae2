"""Argument checks shared by the :mod:`ospfn.data` modules (package-internal)."""

from __future__ import annotations

import math

_UNSET = object()


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
    if fps is not _UNSET and (not is_num(fps) or fps <= 0):
        raise ValueError(f"{fn}: fps={fps!r} must be a positive number")
    if not is_num(train_fps) or train_fps <= 0:
        raise ValueError(f"{fn}: train_fps={train_fps!r} must be a positive number")
