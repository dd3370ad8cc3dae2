"""decord access shared by :mod:`ospfn.data.index` (probing metadata) and :mod:`ospfn.data.video` (decoding).

decord is imported only when a video is opened (package-internal).
"""

from __future__ import annotations

import os


def decord():
    """The decord module (``ImportError`` with an install hint when missing)."""
    try:
        import decord
    except ImportError as e:  # pragma: no cover - decord is a dependency of ospfn
        raise ImportError("ospfn.data needs decord to read videos: pip install decord==0.6.0") from e
    return decord


def hint(err: Exception) -> str:
    """An explanation to append to a decord error message, or ""."""
    if "size must exactly match" in str(err):
        return " (a known decord 0.6.0 failure on frames narrower than 64 px whose width is not a multiple of 32)"
    return ""


def probe(path: str, fn: str) -> tuple[int, int, float, int]:
    """(height, width, fps, num_frames) of a video file, read with decord."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}: video file '{path}' does not exist")
    dec = decord()
    try:
        vr = dec.VideoReader(path, ctx=dec.cpu(0), num_threads=1)
        n = len(vr)
        fps = float(vr.get_avg_fps())
        h, w = vr[0].shape[:2]
    except Exception as e:  # decord raises its own error types
        raise RuntimeError(f"{fn}: cannot read video file '{path}': {e}{hint(e)}") from e
    return int(h), int(w), fps, int(n)
