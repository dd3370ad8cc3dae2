"""Datasets: deterministic synthetic motion clips (:mod:`ospfn.data.synthetic`) and real OSP-Next video corpora.

Real corpora: :mod:`ospfn.data.index` (index / meta JSON parsing, :class:`ClipEntry`, the clip filter),
:mod:`ospfn.data.sampling` (frame resampling to the training frame rate), :mod:`ospfn.data.buckets`
(aspect-ratio buckets) and :mod:`ospfn.data.video` (:class:`VideoDataset`, decoded with decord, which is imported
only when a video is opened).  :mod:`ospfn.data.latents` encodes a corpus once into a cache of VAE latents and
text features (:func:`prepare_cache`) that training reads instead of the videos (:class:`LatentDataset`).
Scoring generated videos is in :mod:`ospfn.eval`.
"""

from ospfn.data.buckets import choose_bucket
from ospfn.data.index import FILTER_REASONS, ClipEntry, filter_clips, load_index
from ospfn.data.latents import LatentCacheError, LatentDataset, prepare_cache
from ospfn.data.sampling import resample_offsets, source_frames_needed
from ospfn.data.synthetic import SyntheticMotion
from ospfn.data.video import VideoDataset

__all__ = [
    "SyntheticMotion",
    "ClipEntry",
    "load_index",
    "filter_clips",
    "FILTER_REASONS",
    "VideoDataset",
    "resample_offsets",
    "source_frames_needed",
    "choose_bucket",
    "LatentDataset",
    "LatentCacheError",
    "prepare_cache",
]
