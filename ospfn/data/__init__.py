"""Datasets: deterministic synthetic motion clips (:mod:`ospfn.data.synthetic`) and real OSP-Next video corpora
(:mod:`ospfn.data.video`, decoded with decord, which is imported only when a video is opened)."""

from ospfn.data.synthetic import (
    SyntheticMotion,
    caption_direction,
    motion_direction,
    track_object,
)
from ospfn.data.video import ClipEntry, VideoDataset, filter_clips, load_index

__all__ = [
    "SyntheticMotion",
    "track_object",
    "motion_direction",
    "caption_direction",
    "ClipEntry",
    "load_index",
    "filter_clips",
    "VideoDataset",
]
