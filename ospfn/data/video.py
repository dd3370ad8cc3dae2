"""Real video corpora in the OSP-Next layout (spec-dit.md section 4): index file, meta JSON, filter, dataset.

Layout
------
* **Index file**: text, one corpus per line ``<videos_root>,<meta_json>``.  Blank lines and lines starting with
  ``#`` are ignored; the line is split at its **last** comma (so a ``videos_root`` may contain commas, a meta
  path may not); relative paths are relative to the index file's folder; ``~`` is expanded.
* **Meta JSON**: a list of entries ``{"path": str (relative to videos_root, or absolute), "cap": str | [str, ...],
  "resolution": {"height": int, "width": int}, "fps": number, "num_frames": int, "cut": [start, end)}``; all but
  ``path`` and ``cap`` optional (``null`` counts as absent).  ``num_frames`` is the frame count of the whole
  file, ``cut`` a half-open frame range inside it.  Any other keys (a motion score, an aesthetic score, ...) are
  kept in :attr:`ClipEntry.extra`.

Pipeline
--------
:func:`load_index` -> list of :class:`ClipEntry`; :func:`filter_clips` -> the clips that are big enough, have an
allowed aspect ratio, enough frames for ``sample_num_frames`` at ``train_fps`` and an allowed motion score (plus a
report of the drops); :class:`VideoDataset` decodes the clips with decord, resamples them to ``train_fps``,
resizes and centre-crops them to the nearest-aspect bucket.

Frame resampling (:func:`resample_offsets`): output frame ``k`` (time ``k / train_fps``) takes the source frame
nearest in time, ``floor(k * fps / train_fps + 0.5)`` (halves round up), counted from the chosen start frame.
E.g. 24 -> 16 fps: offsets 0, 2, 3, 5, 6, 8, ...; 16 -> 16 fps: 0, 1, 2, ...; 8 -> 16 fps would repeat frames
(0, 1, 1, 2, ...), which :func:`filter_clips` refuses (reason ``"low_fps"``) but :class:`VideoDataset` allows.
A clip needs ``resample_offsets(...)[-1] + 1`` source frames inside its cut.

Example::

    >>> from ospfn.data.video import resample_offsets, source_frames_needed, choose_bucket
    >>> resample_offsets(6, fps=24, train_fps=16)
    [0, 2, 3, 5, 6, 8]
    >>> source_frames_needed(49, fps=24, train_fps=16)  # 48 * 1.5 = 72 -> frames 0..72
    73
    >>> choose_bucket(720, 1280, [(480, 832), (832, 480), (640, 640)])
    (480, 832)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "ClipEntry",
    "load_index",
    "filter_clips",
    "VideoDataset",
    "resample_offsets",
    "source_frames_needed",
    "choose_bucket",
    "FILTER_REASONS",
]

FILTER_REASONS = ("bad_cut", "small_area", "aspect", "too_few_frames", "low_fps", "too_short", "missing_motion",
                  "motion")
_KNOWN_KEYS = ("path", "cap", "resolution", "fps", "num_frames", "cut")


def _decord():
    try:
        import decord
    except ImportError as e:  # pragma: no cover - decord is a dependency of ospfn.data.video
        raise ImportError("ospfn.data.video needs decord to read videos: pip install decord==0.6.0") from e
    return decord


def _hint(err: Exception) -> str:
    if "size must exactly match" in str(err):
        return " (a known decord 0.6.0 failure on frames narrower than 64 px whose width is not a multiple of 32)"
    return ""


@dataclass(frozen=True)
class ClipEntry:
    """One clip of a corpus.

    Attributes:
        path: absolute path of the video file.
        captions: the caption(s), at least one (``caption`` is the first).
        height, width: frame size in pixels, or None if the meta JSON did not say.
        fps: frames per second, or None.
        num_frames: frames in the whole file, or None.
        cut: ``(start, end)`` half-open frame range of the clip inside the file, or None (the whole file).
        extra: the entry's other meta keys (e.g. a motion score), unchanged.
        source: the meta JSON the entry came from (for error messages), "" if built by hand.

    Example::

        >>> e = ClipEntry("/v/a.mp4", ("a cat", "a small cat"), fps=24.0, num_frames=100, cut=(10, 70))
        >>> e.caption, e.frame_range(), e.available_frames()
        ('a cat', (10, 70), 60)
    """

    path: str
    captions: tuple[str, ...]
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    num_frames: int | None = None
    cut: tuple[int, int] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)
    source: str = ""

    @property
    def caption(self) -> str:
        """The first caption."""
        return self.captions[0]

    def frame_range(self, total: int | None = None) -> tuple[int, int] | None:
        """``(start, end)`` frames of the clip: the cut, or ``(0, total or num_frames)``; None if unknown."""
        if self.cut is not None:
            return self.cut
        n = total if total is not None else self.num_frames
        return None if n is None else (0, n)

    def available_frames(self, total: int | None = None) -> int | None:
        """Frames inside :meth:`frame_range` (None if unknown)."""
        r = self.frame_range(total)
        return None if r is None else r[1] - r[0]


# ------------------------------------------------------------------------------------------------------------
# index + meta JSON


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_entry(entry: object, k: int, meta_path: str, root: str) -> ClipEntry:
    where = f"load_index: entry {k} of meta file '{meta_path}'"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(entry).__name__}: {entry!r:.80}")
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: key 'path' must be a non-empty string, got {path!r}")
    cap = entry.get("cap")
    if isinstance(cap, str):
        captions = (cap,)
    elif isinstance(cap, list) and cap and all(isinstance(c, str) for c in cap):
        captions = tuple(cap)
    else:
        raise ValueError(f"{where}: key 'cap' must be a string or a non-empty list of strings, got {cap!r:.80}")
    height = width = None
    res = entry.get("resolution")
    if res is not None:
        if not isinstance(res, dict):
            raise ValueError(f"{where}: key 'resolution' must be an object {{'height', 'width'}}, got {res!r}")
        for key in ("height", "width"):
            val = res.get(key)
            if not _is_int(val) or val <= 0:
                raise ValueError(f"{where}: key 'resolution.{key}' must be a positive int, got {val!r}")
        height, width = res["height"], res["width"]
    fps = entry.get("fps")
    if fps is not None:
        if not _is_num(fps) or fps <= 0:
            raise ValueError(f"{where}: key 'fps' must be a positive number, got {fps!r}")
        fps = float(fps)
    num_frames = entry.get("num_frames")
    if num_frames is not None and (not _is_int(num_frames) or num_frames <= 0):
        raise ValueError(f"{where}: key 'num_frames' must be a positive int, got {num_frames!r}")
    cut = entry.get("cut")
    if cut is not None:
        if (
            not isinstance(cut, list)
            or len(cut) != 2
            or not all(_is_int(c) for c in cut)
            or not 0 <= cut[0] < cut[1]
        ):
            raise ValueError(f"{where}: key 'cut' must be [start, end) ints with 0 <= start < end, got {cut!r}")
        cut = (cut[0], cut[1])
    extra = {key: v for key, v in entry.items() if key not in _KNOWN_KEYS}
    return ClipEntry(
        path=os.path.join(root, os.path.expanduser(path)),
        captions=captions,
        height=height,
        width=width,
        fps=fps,
        num_frames=num_frames,
        cut=cut,
        extra=extra,
        source=meta_path,
    )


def load_index(index_file: str | os.PathLike) -> list[ClipEntry]:
    """Read an index file (lines ``<videos_root>,<meta_json>``) and every meta JSON it names.

    Returns the clips of all corpora in file order.  Video files are not opened (nor checked to exist) here.
    Raises ``FileNotFoundError`` for a missing index or meta file, ``ValueError`` for a line without a comma,
    an unreadable JSON, a meta file that is not a list, or an entry with a missing / malformed key (the message
    names the key, the entry number and the file).

    Example::

        >>> import json, os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> with open(os.path.join(d, "meta.json"), "w") as f:
        ...     json.dump([{"path": "a.mp4", "cap": ["a dog", "a brown dog"], "fps": 24, "num_frames": 40}], f)
        >>> with open(os.path.join(d, "index.txt"), "w") as f:
        ...     _ = f.write("# corpus list\\nvideos,meta.json\\n")
        >>> [e] = load_index(os.path.join(d, "index.txt"))
        >>> e.path == os.path.join(d, "videos", "a.mp4"), e.captions, e.fps
        (True, ('a dog', 'a brown dog'), 24.0)
    """
    index_file = os.fspath(index_file)
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"load_index: index file '{index_file}' does not exist")
    base = os.path.dirname(os.path.abspath(index_file))
    out: list[ClipEntry] = []
    with open(index_file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for no, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "," not in line:
            raise ValueError(
                f"load_index: line {no} of index file '{index_file}' is {line!r}, which has no comma; "
                "expected '<videos_root>,<meta_json>'"
            )
        root, meta = (p.strip() for p in line.rsplit(",", 1))
        if not root or not meta:
            raise ValueError(
                f"load_index: line {no} of index file '{index_file}' is {line!r}; both parts of "
                "'<videos_root>,<meta_json>' must be non-empty"
            )
        root = os.path.join(base, os.path.expanduser(root))
        meta_path = os.path.join(base, os.path.expanduser(meta))
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(
                f"load_index: meta file '{meta_path}' (line {no} of index file '{index_file}') does not exist"
            )
        try:
            with open(meta_path, encoding="utf-8") as mf:
                data = json.load(mf)
        except json.JSONDecodeError as e:
            raise ValueError(f"load_index: meta file '{meta_path}' is not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise ValueError(
                f"load_index: meta file '{meta_path}' must hold a JSON list of entries, got {type(data).__name__}"
            )
        out.extend(_parse_entry(entry, k, meta_path, root) for k, entry in enumerate(data))
    return out


# ------------------------------------------------------------------------------------------------------------
# resampling, buckets


def _check_fps(fps: object, train_fps: object, fn: str) -> None:
    if not _is_num(fps) or fps <= 0:
        raise ValueError(f"{fn}: fps={fps!r} must be a positive number")
    if not _is_num(train_fps) or train_fps <= 0:
        raise ValueError(f"{fn}: train_fps={train_fps!r} must be a positive number")


def resample_offsets(num_frames: int, fps: float, train_fps: float = 16) -> list[int]:
    """Source-frame offsets (from the start frame) of ``num_frames`` output frames at ``train_fps``.

    Output frame ``k`` takes source frame ``floor(k * fps / train_fps + 0.5)``: the one nearest in time, halves
    rounded up.

    Example::

        >>> resample_offsets(5, fps=30, train_fps=16)  # 0, 1.875, 3.75, 5.625, 7.5
        [0, 2, 4, 6, 8]
    """
    if not _is_int(num_frames) or num_frames < 1:
        raise ValueError(f"resample_offsets: num_frames={num_frames!r} must be a positive int")
    _check_fps(fps, train_fps, "resample_offsets")
    ratio = float(fps) / float(train_fps)
    # the tiny epsilon keeps exact halves (k * 1.5 = 4.5) from rounding down through float error
    return [int(math.floor(k * ratio + 0.5 + 1e-9)) for k in range(num_frames)]


def source_frames_needed(num_frames: int, fps: float, train_fps: float = 16) -> int:
    """Source frames a clip needs to yield ``num_frames`` frames at ``train_fps`` (see :func:`resample_offsets`).

    Example::

        >>> source_frames_needed(49, fps=16, train_fps=16), source_frames_needed(49, fps=30, train_fps=16)
        (49, 91)
    """
    return resample_offsets(num_frames, fps, train_fps)[-1] + 1


def _check_buckets(buckets: object, fn: str) -> list[tuple[int, int]]:
    ok = isinstance(buckets, (list, tuple)) and len(buckets) > 0
    if ok:
        for b in buckets:
            if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(_is_int(v) and v > 0 for v in b)):
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
    if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
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


# ------------------------------------------------------------------------------------------------------------
# filter


def _probe(path: str, fn: str) -> tuple[int, int, float, int]:
    """(height, width, fps, num_frames) of a video file, read with decord."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}: video file '{path}' does not exist")
    decord = _decord()
    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        n = len(vr)
        fps = float(vr.get_avg_fps())
        h, w = vr[0].shape[:2]
    except Exception as e:  # decord raises its own error types
        raise RuntimeError(f"{fn}: cannot read video file '{path}': {e}{_hint(e)}") from e
    return int(h), int(w), fps, int(n)


def filter_clips(
    entries: Iterable[ClipEntry],
    *,
    min_hw: int | None = None,
    aspect_range: tuple[float, float] = (0.4, 1.2),
    min_frames: int = 0,
    train_fps: float = 16,
    sample_num_frames: int = 49,
    motion_key: str | None = None,
    motion_range: tuple[float, float] | None = None,
) -> tuple[list[ClipEntry], dict[str, int]]:
    """Keep the clips fit for training; report how many were dropped and why.

    Metadata the entry lacks (height, width, fps, num_frames) is read from the video file with decord (opening
    the file, which demuxes it to build the frame index -- cost grows with the file's length -- and decoding its
    first frame: milliseconds per small file, more for long ones; precompute it in the meta JSON for big
    corpora).  The kept entries carry the completed metadata.  A missing file then raises ``FileNotFoundError``.

    Checks, in this order; a clip is counted under the first reason that drops it:

    * ``"bad_cut"``: the cut ends after the file's last frame;
    * ``"small_area"``: ``height * width < min_hw`` (None: no bound);
    * ``"aspect"``: ``height / width`` outside ``aspect_range`` (inclusive);
    * ``"too_few_frames"``: fewer than ``min_frames`` frames inside the cut;
    * ``"low_fps"``: ``fps < train_fps`` (resampling would repeat frames);
    * ``"too_short"``: fewer frames inside the cut than :func:`source_frames_needed` (``sample_num_frames`` at
      ``train_fps``);
    * ``"missing_motion"`` / ``"motion"``: with ``motion_key``, the entry's ``extra[motion_key]`` is absent (or not
      a number) / outside ``motion_range`` (inclusive).

    Returns ``(kept, report)``; ``report`` has ``"total"``, ``"kept"``, ``"probed"`` (files opened) and a count
    for every reason in :data:`FILTER_REASONS` (zeros included).

    Example::

        >>> clips = [ClipEntry("/v/a.mp4", ("a",), 480, 832, 24.0, 200),   # kept
        ...          ClipEntry("/v/b.mp4", ("b",), 1080, 1080, 24.0, 200), # h/w = 1.0: kept
        ...          ClipEntry("/v/c.mp4", ("c",), 480, 1600, 24.0, 200),  # h/w = 0.3: aspect
        ...          ClipEntry("/v/d.mp4", ("d",), 480, 832, 24.0, 60)]    # needs 73 frames: too_short
        >>> kept, report = filter_clips(clips, min_hw=256 * 256)
        >>> [e.path for e in kept], report["aspect"], report["too_short"], report["kept"]
        (['/v/a.mp4', '/v/b.mp4'], 1, 1, 2)
    """
    fn = "filter_clips"
    if min_hw is not None and (not _is_int(min_hw) or min_hw < 0):
        raise ValueError(f"{fn}: min_hw={min_hw!r} must be None or a non-negative int (minimum height * width)")
    if (
        not isinstance(aspect_range, (tuple, list))
        or len(aspect_range) != 2
        or not all(_is_num(a) for a in aspect_range)
        or not 0 < aspect_range[0] <= aspect_range[1]
    ):
        raise ValueError(f"{fn}: aspect_range={aspect_range!r} must be (lo, hi) with 0 < lo <= hi (height / width)")
    if not _is_int(min_frames) or min_frames < 0:
        raise ValueError(f"{fn}: min_frames={min_frames!r} must be a non-negative int")
    if not _is_num(train_fps) or train_fps <= 0:
        raise ValueError(f"{fn}: train_fps={train_fps!r} must be a positive number")
    if not _is_int(sample_num_frames) or sample_num_frames < 1:
        raise ValueError(f"{fn}: sample_num_frames={sample_num_frames!r} must be a positive int")
    if (motion_key is None) != (motion_range is None):
        raise ValueError(
            f"{fn}: motion_key={motion_key!r} and motion_range={motion_range!r} must be given together (or neither)"
        )
    if motion_range is not None and (
        not isinstance(motion_range, (tuple, list))
        or len(motion_range) != 2
        or not all(_is_num(a) for a in motion_range)
        or motion_range[0] > motion_range[1]
    ):
        raise ValueError(f"{fn}: motion_range={motion_range!r} must be (lo, hi) numbers with lo <= hi")
    if motion_key is not None and not isinstance(motion_key, str):
        raise ValueError(f"{fn}: motion_key={motion_key!r} must be a string (a key of the meta entries)")

    report = {"total": 0, "kept": 0, "probed": 0, **{r: 0 for r in FILTER_REASONS}}
    kept: list[ClipEntry] = []
    for e in entries:
        if not isinstance(e, ClipEntry):
            raise TypeError(f"{fn}: entries must be ClipEntry objects (see load_index), got {type(e).__name__}")
        report["total"] += 1
        if None in (e.height, e.width, e.fps, e.num_frames):
            h, w, fps, n = _probe(e.path, fn)
            report["probed"] += 1
            e = dataclasses.replace(
                e,
                height=e.height if e.height is not None else h,
                width=e.width if e.width is not None else w,
                fps=e.fps if e.fps is not None else fps,
                num_frames=e.num_frames if e.num_frames is not None else n,
            )
        reason = None
        avail = e.available_frames()
        if e.cut is not None and e.cut[1] > e.num_frames:
            reason = "bad_cut"
        elif min_hw is not None and e.height * e.width < min_hw:
            reason = "small_area"
        elif not aspect_range[0] <= e.height / e.width <= aspect_range[1]:
            reason = "aspect"
        elif avail < min_frames:
            reason = "too_few_frames"
        elif e.fps < train_fps:
            reason = "low_fps"
        elif avail < source_frames_needed(sample_num_frames, e.fps, train_fps):
            reason = "too_short"
        elif motion_key is not None:
            val = e.extra.get(motion_key)
            if not _is_num(val):
                reason = "missing_motion"
            elif not motion_range[0] <= val <= motion_range[1]:
                reason = "motion"
        if reason is None:
            kept.append(e)
        else:
            report[reason] += 1
    report["kept"] = len(kept)
    return kept, report


# ------------------------------------------------------------------------------------------------------------
# dataset


class VideoDataset(Dataset):
    """Decode clips with decord, resample to ``train_fps``, cover-resize and centre-crop to a bucket.

    Args:
        entries: :class:`ClipEntry` list (usually the output of :func:`filter_clips`).
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
    ``bucket`` (bh, bw); ``frame_indices`` int64 [num_frames] (source frames used); ``index`` int.
    Items in different buckets have different shapes: batch them per bucket (or use batch size 1).

    Errors: ``FileNotFoundError`` for a missing video file, ``ValueError`` when the clip is too short for
    ``num_frames`` at ``train_fps`` or its cut exceeds the file (use :func:`filter_clips` first),
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
            if not isinstance(e, ClipEntry):
                raise TypeError(f"{fn}: entries must be ClipEntry objects (see load_index), got {type(e).__name__}")
        if not _is_int(num_frames) or num_frames < 1:
            raise ValueError(f"{fn}: num_frames={num_frames!r} must be a positive int")
        if not _is_num(train_fps) or train_fps <= 0:
            raise ValueError(f"{fn}: train_fps={train_fps!r} must be a positive number")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"{fn}: seed={seed!r} must be a non-negative int")
        self.entries = entries
        self.num_frames = num_frames
        self.train_fps = float(train_fps)
        self.buckets = _check_buckets(list(buckets) if isinstance(buckets, tuple) else buckets, fn)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw new start frames / captions: item ``i`` of epoch ``e`` is seeded with ``(seed, e, i)``."""
        if not _is_int(epoch) or epoch < 0:
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
        decord = _decord()
        try:
            vr = decord.VideoReader(e.path, ctx=decord.cpu(0), num_threads=1)
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
            raise RuntimeError(f"{fn}: cannot decode frames of '{e.path}'{src}: {err}{_hint(err)}") from err
        bucket = choose_bucket(int(frames.shape[1]), int(frames.shape[2]), self.buckets)
        return {
            "video": _resize_crop(frames, bucket),
            "caption": caption,
            "path": e.path,
            "bucket": bucket,
            "frame_indices": torch.tensor(idx, dtype=torch.int64),
            "index": i,
        }

    def __repr__(self) -> str:
        return (
            f"VideoDataset({len(self.entries)} clips, num_frames={self.num_frames}, train_fps={self.train_fps:g}, "
            f"buckets={self.buckets}, seed={self.seed})"
        )
