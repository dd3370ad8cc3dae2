"""Real video clips for training: decode with decord, resample to ``train_fps``, resize and crop to a bucket.

Pipeline (docs/training.md#video-data): :func:`~ospfn.data.index.load_index` reads an OSP-Next index into
:class:`~ospfn.data.index.ClipEntry` objects, :func:`~ospfn.data.index.filter_clips` keeps the usable clips, and
:class:`VideoDataset` decodes them (decord, imported only when a video is opened), resamples the frames to
``train_fps`` (:mod:`ospfn.data.sampling`) and resizes and centre-crops them to the nearest-aspect bucket
(:mod:`ospfn.data.buckets`).  All of these names are also in :mod:`ospfn.data`.

Example::

    >>> from ospfn.data import ClipEntry, VideoDataset
    >>> ds = VideoDataset([ClipEntry("/v/a.mp4", ("a cat",))], num_frames=9, train_fps=16, buckets=[(480, 832)])
    >>> ds
    VideoDataset(1 clips, num_frames=9, train_fps=16, buckets=[(480, 832)], seed=0)
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ospfn.data._checks import check_item_size, check_sampling_args, is_int
from ospfn.data._decode import decord, hint
from ospfn.data.buckets import _check_buckets, _resize_crop, choose_bucket
from ospfn.data.index import ClipEntry, _check_entry
from ospfn.data.sampling import resample_offsets

__all__ = ["VideoDataset"]


class VideoDataset(Dataset):
    """Decode clips with decord, resample to ``train_fps``, cover-resize and centre-crop to a bucket.

    Args:
        entries: :class:`ClipEntry` list (usually the output of :func:`~ospfn.data.index.filter_clips`).
        num_frames: output frames per item.
        train_fps: output frame rate (see :func:`resample_offsets`).
        buckets: ``[(height, width), ...]``; each clip goes to the bucket nearest its aspect ratio
            (:func:`choose_bucket`, using the decoded frame size).
        seed: non-negative int.

    Item ``i``: the start frame is drawn uniformly from the starts that fit the resampled clip inside the cut, and
    (when the entry has several captions) the caption uniformly among them, both from a generator seeded with
    ``(seed, epoch, i)`` -- deterministic, the same in every DataLoader worker; :meth:`set_epoch` changes them
    per epoch (epoch 0 by default).  The frames are resized (bilinear, antialiased) so that they cover the
    bucket with the aspect ratio kept, then centre-cropped to it.

    Returns a dict: ``video`` float32 [3, num_frames, bh, bw] in [-1, 1]; ``caption`` str; ``path`` str;
    ``bucket`` (bh, bw); ``frame_indices`` int64 [num_frames] (source frames used); ``index`` int; ``style``
    str, only for a clip with an I2SV style label (``ClipEntry.style``).
    Items in different buckets have different shapes: batch them per bucket (or use batch size 1).

    Errors: ``ValueError`` at construction for a bad argument (naming it), including a bucket whose items would
    exceed 8 GiB of float32; ``FileNotFoundError`` for a missing video file, ``ValueError`` when the clip is too short for
    ``num_frames`` at ``train_fps`` or its cut exceeds the file (use :func:`~ospfn.data.index.filter_clips` first),
    ``RuntimeError`` when decord cannot decode the file.

    Example::

        >>> ds = VideoDataset([ClipEntry("/no/such.mp4", ("x",))], num_frames=9, buckets=[(32, 32)])
        >>> len(ds)
        1
        >>> ds[0]
        Traceback (most recent call last):
        ...
        FileNotFoundError: VideoDataset: video file '/no/such.mp4' (item 0) does not exist
    """

    def __init__(
        self,
        entries: Sequence[ClipEntry],
        *,
        num_frames: int = 49,
        train_fps: float = 16,
        buckets: Sequence[tuple[int, int]] = ((480, 832),),
        seed: int = 0,
    ):
        fn = "VideoDataset"
        entries = list(entries)
        for e in entries:
            _check_entry(e, fn)
        check_sampling_args(fn, num_frames, train_fps)
        if not is_int(seed) or seed < 0:
            raise ValueError(f"{fn}: seed={seed!r} must be a non-negative int")
        self.entries = entries
        self.num_frames = num_frames
        self.train_fps = float(train_fps)
        self.buckets = _check_buckets(list(buckets) if isinstance(buckets, tuple) else buckets, fn)
        for bh, bw in self.buckets:
            check_item_size(fn, num_frames, bh, bw, f"num_frames={num_frames} with bucket {(bh, bw)}")
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw new start frames / captions: item ``i`` of epoch ``e`` is seeded with ``(seed, e, i)``."""
        if not is_int(epoch) or epoch < 0:
            raise ValueError(f"VideoDataset.set_epoch: epoch={epoch!r} must be a non-negative int")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        fn = "VideoDataset"
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"{fn}: index={index!r} must be an int")
        n = len(self.entries)
        i = int(index) + (n if index < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"{fn}: index={index} is out of range for {n} clips")
        e = self.entries[i]
        src = f" (item {i}" + (f", from '{e.source}')" if e.source else ")")
        if not os.path.isfile(e.path):
            raise FileNotFoundError(f"{fn}: video file '{e.path}'{src} does not exist")
        dec = decord()
        try:
            vr = dec.VideoReader(e.path, ctx=dec.cpu(0), num_threads=1)
            total = len(vr)
            fps = e.fps if e.fps is not None else float(vr.get_avg_fps())
        except Exception as err:
            raise RuntimeError(f"{fn}: cannot read video file '{e.path}'{src}: {err}") from err
        start, end = e.frame_range(total)
        if end > total:
            raise ValueError(f"{fn}: cut {e.cut} of '{e.path}'{src} ends after the file's {total} frames")
        offsets = resample_offsets(self.num_frames, fps, self.train_fps)
        need = offsets[-1] + 1
        if end - start < need:
            raise ValueError(
                f"{fn}: '{e.path}'{src} has {end - start} frames in range [{start}, {end}) at {fps:g} fps; "
                f"{self.num_frames} frames at {self.train_fps:g} fps need {need} (drop it with filter_clips)"
            )
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, i]))
        first = start + int(rng.integers(0, end - start - need + 1))
        caption = e.captions[int(rng.integers(len(e.captions)))] if len(e.captions) > 1 else e.captions[0]
        idx = [first + o for o in offsets]
        try:
            frames = vr.get_batch(idx).asnumpy()  # [N, H, W, 3] uint8
        except Exception as err:
            raise RuntimeError(f"{fn}: cannot decode frames of '{e.path}'{src}: {err}{hint(err)}") from err
        bucket = choose_bucket(int(frames.shape[1]), int(frames.shape[2]), self.buckets)
        return {
            "video": _resize_crop(frames, bucket),
            "caption": caption,
            "path": e.path,
            "bucket": bucket,
            "frame_indices": torch.tensor(idx, dtype=torch.int64),
            "index": i,
            **({"style": e.style} if e.style is not None else {}),
        }

    def __repr__(self) -> str:
        return (
            f"VideoDataset({len(self.entries)} clips, num_frames={self.num_frames}, train_fps={self.train_fps:g}, "
            f"buckets={self.buckets}, seed={self.seed})"
        )
