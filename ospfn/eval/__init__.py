"""Evaluation tools: :mod:`ospfn.eval.trackers` scores videos of one moving object (position, presence,
direction against the caption), as ``recipes/eval_tiny.py`` does for the bundled tiny model;
:mod:`ospfn.eval.styles` scores image-to-stylised-video outputs (the style of every frame, by the nearest style
template, and the motion), as ``recipes/eval_i2sv.py`` does."""

from ospfn.eval.styles import classify_style, score_styled_video
from ospfn.eval.trackers import caption_direction, motion_direction, track_object

__all__ = ["track_object", "motion_direction", "caption_direction", "classify_style", "score_styled_video"]
