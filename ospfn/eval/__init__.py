"""Evaluation tools: :mod:`ospfn.eval.trackers` scores videos of one moving object (position, presence,
direction against the caption), as ``recipes/eval_tiny.py`` does for the bundled tiny model."""

from ospfn.eval.trackers import caption_direction, motion_direction, track_object

__all__ = ["track_object", "motion_direction", "caption_direction"]
