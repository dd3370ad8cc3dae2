"""OSP-Next corpus index (docs/training.md#video-data): the index file, its meta JSON files and the clip filter.

Layout
------
* **Index file**: text, one corpus per line ``<videos_root>,<meta_json>``.  Blank lines and lines starting with
  ``#`` are ignored; the line is split at its **last** comma (so a ``videos_root`` may contain commas, a meta
  path may not); relative paths are relative to the index file's folder; ``~`` is expanded.
* **Meta JSON**: a list of entries ``{"path": str (relative to videos_root, or absolute), "cap": str | [str, ...],
  "resolution": {"height": int, "width": int}, "fps": number, "num_frames": int, "cut": [start, end),
  "style": str | int}``; all but ``path`` and ``cap`` optional (``null`` counts as absent).  ``style`` labels an
  image-to-stylised-video clip with one of the 12 styles of :mod:`ospfn.styles` (a name in any spelling
  :func:`ospfn.styles.style_id` takes, or its id 0..11; stored as the canonical name); training wraps the caption
  in that style's template.  ``num_frames`` is the frame count of the whole
  file, ``cut`` a half-open frame range inside it.  Any other keys (a motion score, an aesthetic score, ...) are
  kept in :attr:`ClipEntry.extra`.

:func:`load_index` -> list of :class:`ClipEntry`; :func:`filter_clips` -> the clips that are big enough, have an
allowed aspect ratio, enough frames for ``sample_num_frames`` at ``train_fps`` (see :mod:`ospfn.data.sampling`)
and an allowed motion score (plus a report of the drops).  :class:`ospfn.data.video.VideoDataset` then decodes
them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ospfn.data._checks import check_sampling_args, is_int, is_num
from ospfn.data._decode import probe
from ospfn.data.sampling import source_frames_needed
from ospfn.styles import STYLES, style_name

__all__ = ["ClipEntry", "load_index", "filter_clips", "FILTER_REASONS"]

FILTER_REASONS = ("bad_cut", "small_area", "aspect", "too_few_frames", "low_fps", "too_short", "missing_motion",
                  "motion", "missing_style", "style")
_KNOWN_KEYS = ("path", "cap", "resolution", "fps", "num_frames", "cut", "style")


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
        style: the I2SV style label (a canonical name of ``ospfn.styles.STYLES``), or None.
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
    style: str | None = None

    def __post_init__(self) -> None:
        # the types the rest of ospfn.data relies on (e.g. captions given as one str would become one caption per
        # character); whether the numbers fit the file (a cut past its end, ...) is filter_clips' business
        fn = "ClipEntry"
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"{fn}: path must be a non-empty str, got {self.path!r}")
        caps = self.captions
        if not isinstance(caps, (tuple, list)) or not caps or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{fn}: captions must be a non-empty tuple of str, got {caps!r:.80}")
        object.__setattr__(self, "captions", tuple(caps))
        for name in ("height", "width", "num_frames"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v <= 0):
                raise ValueError(f"{fn}: {name} must be None or a positive int, got {v!r}")
        if self.fps is not None and (not is_num(self.fps) or self.fps <= 0):
            raise ValueError(f"{fn}: fps must be None or a positive finite number, got {self.fps!r}")
        cut = self.cut
        if cut is not None:
            if not isinstance(cut, (tuple, list)) or len(cut) != 2 or not all(is_int(c) for c in cut) or not 0 <= cut[0] < cut[1]:
                raise ValueError(f"{fn}: cut must be None or (start, end) ints with 0 <= start < end, got {cut!r}")
            object.__setattr__(self, "cut", (cut[0], cut[1]))
        if self.style is not None:
            try:
                object.__setattr__(self, "style", style_name(self.style))
            except (TypeError, ValueError):
                raise ValueError(f"{fn}: style must be None or one of the 12 styles ({', '.join(STYLES)}), got {self.style!r}") from None

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
            if not is_int(val) or val <= 0:
                raise ValueError(f"{where}: key 'resolution.{key}' must be a positive int, got {val!r}")
        height, width = res["height"], res["width"]
    fps = entry.get("fps")
    if fps is not None:
        if not is_num(fps) or fps <= 0:
            raise ValueError(f"{where}: key 'fps' must be a positive number, got {fps!r}")
        fps = float(fps)
    num_frames = entry.get("num_frames")
    if num_frames is not None and (not is_int(num_frames) or num_frames <= 0):
        raise ValueError(f"{where}: key 'num_frames' must be a positive int, got {num_frames!r}")
    cut = entry.get("cut")
    if cut is not None:
        if (
            not isinstance(cut, list)
            or len(cut) != 2
            or not all(is_int(c) for c in cut)
            or not 0 <= cut[0] < cut[1]
        ):
            raise ValueError(f"{where}: key 'cut' must be [start, end) ints with 0 <= start < end, got {cut!r}")
        cut = (cut[0], cut[1])
    style = entry.get("style")
    if style is not None:
        try:
            style = style_name(style)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: key 'style' must be one of the 12 styles ({', '.join(STYLES)}) or its id 0..11, "
                             f"got {style!r:.80}") from None
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
        style=style,
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
    if not isinstance(index_file, (str, os.PathLike)):
        raise TypeError(f"load_index: index_file must be a path (str or os.PathLike), got {type(index_file).__name__}")
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
# filter


def _check_entry(e: object, fn: str) -> None:
    if not isinstance(e, ClipEntry):
        raise TypeError(f"{fn}: entries must be ClipEntry objects (see load_index), got {type(e).__name__}")


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
    styles: Iterable[str] | None = None,
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
    * ``"too_short"``: fewer frames inside the cut than :func:`~ospfn.data.sampling.source_frames_needed`
      (``sample_num_frames`` at ``train_fps``);
    * ``"missing_motion"`` / ``"motion"``: with ``motion_key``, the entry's ``extra[motion_key]`` is absent (or not
      a number) / outside ``motion_range`` (inclusive);
    * ``"missing_style"`` / ``"style"``: with ``styles`` (style names, any spelling ``ospfn.styles.style_id``
      takes), the entry has no style label / a style not among them.

    Returns ``(kept, report)``; ``report`` has ``"total"``, ``"kept"``, ``"probed"`` (files opened), a count
    for every reason in :data:`FILTER_REASONS` (zeros included) and ``"styles"``: the kept clips per style label
    (``{name: count}`` over the labelled clips, zeros included for the ``styles`` asked for).

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
    if min_hw is not None and (not is_int(min_hw) or min_hw < 0):
        raise ValueError(f"{fn}: min_hw={min_hw!r} must be None or a non-negative int (minimum height * width)")
    if (
        not isinstance(aspect_range, (tuple, list))
        or len(aspect_range) != 2
        or not all(is_num(a) for a in aspect_range)
        or not 0 < aspect_range[0] <= aspect_range[1]
    ):
        raise ValueError(f"{fn}: aspect_range={aspect_range!r} must be (lo, hi) with 0 < lo <= hi (height / width)")
    if not is_int(min_frames) or min_frames < 0:
        raise ValueError(f"{fn}: min_frames={min_frames!r} must be a non-negative int")
    check_sampling_args(fn, sample_num_frames, train_fps, frames_arg="sample_num_frames")
    if (motion_key is None) != (motion_range is None):
        raise ValueError(
            f"{fn}: motion_key={motion_key!r} and motion_range={motion_range!r} must be given together (or neither)"
        )
    if motion_range is not None and (
        not isinstance(motion_range, (tuple, list))
        or len(motion_range) != 2
        or not all(is_num(a) for a in motion_range)
        or motion_range[0] > motion_range[1]
    ):
        raise ValueError(f"{fn}: motion_range={motion_range!r} must be (lo, hi) numbers with lo <= hi")
    if motion_key is not None and not isinstance(motion_key, str):
        raise ValueError(f"{fn}: motion_key={motion_key!r} must be a string (a key of the meta entries)")

    want_styles = None
    if styles is not None:
        if isinstance(styles, str):
            raise ValueError(f"{fn}: styles={styles!r} must be a collection of style names, not one str (wrap it in a list)")
        want_styles = set()
        for v in styles:
            try:
                want_styles.add(style_name(v))
            except (TypeError, ValueError):
                raise ValueError(f"{fn}: styles holds {v!r}, which is not one of the 12 styles ({', '.join(STYLES)})") from None
    report = {"total": 0, "kept": 0, "probed": 0, **{r: 0 for r in FILTER_REASONS}}
    per_style = {name: 0 for name in STYLES if want_styles is not None and name in want_styles}
    kept: list[ClipEntry] = []
    for e in entries:
        _check_entry(e, fn)
        report["total"] += 1
        if None in (e.height, e.width, e.fps, e.num_frames):
            h, w, fps, n = probe(e.path, fn)
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
            if not is_num(val):
                reason = "missing_motion"
            elif not motion_range[0] <= val <= motion_range[1]:
                reason = "motion"
        if reason is None and want_styles is not None:
            if e.style is None:
                reason = "missing_style"
            elif e.style not in want_styles:
                reason = "style"
        if reason is None:
            kept.append(e)
            if e.style is not None:
                per_style[e.style] = per_style.get(e.style, 0) + 1
        else:
            report[reason] += 1
    report["kept"] = len(kept)
    report["styles"] = {name: per_style[name] for name in STYLES if name in per_style}
    return kept, report
