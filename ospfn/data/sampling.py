"""Frame resampling: which source frames make a clip at the training frame rate.

Output frame ``k`` (time ``k / train_fps``) takes the source frame nearest in time,
``floor(k * fps / train_fps + 0.5)`` (halves round up), counted from the chosen start frame.  E.g. 24 -> 16 fps:
offsets 0, 2, 3, 5, 6, 8, ...; 16 -> 16 fps: 0, 1, 2, ...; 8 -> 16 fps would repeat frames (0, 1, 1, 2, ...),
which :func:`~ospfn.data.index.filter_clips` refuses (reason ``"low_fps"``) but
:class:`~ospfn.data.video.VideoDataset` allows.  A clip needs ``resample_offsets(...)[-1] + 1`` source frames
inside its cut.

Example::

    >>> from ospfn.data.sampling import resample_offsets, source_frames_needed
    >>> resample_offsets(6, fps=24, train_fps=16)
    [0, 2, 3, 5, 6, 8]
    >>> source_frames_needed(49, fps=24, train_fps=16)  # 48 * 1.5 = 72 -> frames 0..72
    73
"""

from __future__ import annotations

import math

from ospfn.data._checks import check_sampling_args

__all__ = ["resample_offsets", "source_frames_needed"]


def resample_offsets(num_frames: int, fps: float, train_fps: float = 16) -> list[int]:
    """Source-frame offsets (from the start frame) of ``num_frames`` output frames at ``train_fps``.

    Output frame ``k`` takes source frame ``floor(k * fps / train_fps + 0.5)``: the one nearest in time, halves
    rounded up.

    Example::

        >>> resample_offsets(5, fps=30, train_fps=16)  # 0, 1.875, 3.75, 5.625, 7.5
        [0, 2, 4, 6, 8]
    """
    check_sampling_args("resample_offsets", num_frames, train_fps, fps=fps)
    ratio = float(fps) / float(train_fps)
    if not (num_frames - 1) * ratio < 2**53:  # also catches an overflow to inf
        raise ValueError(f"resample_offsets: fps={fps!r} / train_fps={train_fps!r} = {ratio:g} is too large a ratio for "
                         f"{num_frames} frames (source offsets beyond 2^53)")  # fmt: skip
    # the tiny epsilon keeps exact halves (k * 1.5 = 4.5) from rounding down through float error
    return [int(math.floor(k * ratio + 0.5 + 1e-9)) for k in range(num_frames)]


def source_frames_needed(num_frames: int, fps: float, train_fps: float = 16) -> int:
    """Source frames a clip needs to yield ``num_frames`` frames at ``train_fps`` (see :func:`resample_offsets`).

    Example::

        >>> source_frames_needed(49, fps=16, train_fps=16), source_frames_needed(49, fps=30, train_fps=16)
        (49, 91)
    """
    return resample_offsets(num_frames, fps, train_fps)[-1] + 1
