"""Rewards for RL post-training: score decoded videos, higher is better.

A reward is any object with a ``name`` (str), a ``weight`` (float) and
``__call__(video, prompts, *, first_frames=None) -> [B]``:

* ``video``: float tensor ``[B, 3, F, H, W]`` in ``[-1, 1]`` (RGB), the decoded generations;
* ``prompts``: ``B`` captions (str);
* ``first_frames``: optional ``[B, 3, H, W]`` in ``[-1, 1]``, the condition images of an image-to-video model
  (rewards that compare against the first frame use ``video[:, :, 0]`` when it is not given);
* returns float32 ``[B]`` on the video's device, finite, higher is better.

:class:`Reward` is a base class that validates the inputs and the output around a subclass's :meth:`Reward.score`;
:class:`FunctionReward` wraps a plain function (for instance a reward model a user runs locally);
:func:`make_reward` builds a registered reward by name (:data:`reward_registry`, :func:`register_reward`).

Built-in offline rewards for the synthetic world of :mod:`ospfn.data.synthetic` (one coloured object moving in a
straight line over a background with a mild linear gradient).  They need no model and no ground truth beyond the
caption and the first frame, so they score generated videos of held-out examples too:

* ``"motion"`` (:class:`MotionReward`): the tracked object moves the way the caption says;
* ``"fidelity"`` (:class:`FidelityReward`): in every later frame, the object looks like the first frame's object
  moved to where it is tracked (colour, shape and sharpness at once);
* ``"sharpness"`` (:class:`SharpnessReward`): the object's edge energy in every later frame matches the first
  frame's;
* ``"first_frame"`` (:class:`FirstFrameReward`): PSNR of the generated frame 0 against the condition image.

They segment the object the way :func:`ospfn.eval.trackers.track_object` does (a plane per channel fitted to the
2-px border ring as background, a 3 x 3 box-smoothed colour distance, threshold 0.35), batched in torch.  All
are deterministic, need no gradients, and return a low reward (never NaN) when the object vanishes.

Example::

    >>> import torch
    >>> from ospfn.data import SyntheticMotion
    >>> from ospfn.rl.rewards import make_reward
    >>> items = [SyntheticMotion(2, frames=5, size=(32, 32), split="eval", seed=0)[i] for i in range(2)]
    >>> video = torch.stack([it["video"] for it in items])          # [2, 3, 5, 32, 32], the ground truth
    >>> prompts = [it["caption"] for it in items]
    >>> fidelity = make_reward("fidelity")
    >>> fidelity.name, fidelity.weight
    ('fidelity', 1.0)
    >>> bool((fidelity(video, prompts) > 0.9).all())                # ground truth: close to the maximum, 1
    True
    >>> bool((make_reward("motion")(video, prompts) > 0.9).all())
    True
    >>> blurred = torch.nn.functional.avg_pool3d(video, (1, 3, 3), stride=1, padding=(0, 1, 1),
    ...                                          count_include_pad=False)
    >>> bool((fidelity(blurred, prompts, first_frames=video[:, :, 0]) < fidelity(video, prompts)).all())
    True
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ospfn.eval.trackers import caption_direction

__all__ = [
    "Reward",
    "FunctionReward",
    "MotionReward",
    "FidelityReward",
    "SharpnessReward",
    "FirstFrameReward",
    "reward_registry",
    "register_reward",
    "make_reward",
    "check_reward_inputs",
]

RANGE_TOL = 1e-3  # values up to this far outside [-1, 1] are accepted (rounding), like Pipeline.check_image
_UNIT = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (x, y), y downwards


# --------------------------------------------------------------------------------------------------------------
# validation


def _check_weight(weight: object, fn: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{fn}: weight={weight!r} must be a finite number >= 0")
    return float(weight)


def _check_frames_tensor(x: object, arg: str, fn: str, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {arg} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim or x.shape[1] != 3:
        raise ValueError(f"{fn}: {arg} must have shape {layout} (RGB), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {arg} must be a float tensor in [-1, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: {arg} is empty, shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fn}: {arg} contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_TOL or hi > 1 + RANGE_TOL:
        raise ValueError(
            f"{fn}: {arg} has values in [{lo:.4g}, {hi:.4g}]; allowed: [-1, 1] "
            "(a video in [0, 1] or 0..255? convert it to [-1, 1] first)"
        )
    return x


def check_reward_inputs(
    video: object, prompts: object, first_frames: object = None, *, fn: str = "reward", min_size: int = 1
) -> tuple[torch.Tensor, list[str], Optional[torch.Tensor]]:
    """Validate the arguments of a reward call; returns ``(video, prompts as a list, first_frames)``.

    ``video`` a finite float tensor [B, 3, F, H, W] with values in [-1, 1] (``RANGE_TOL`` of rounding allowed),
    B >= 1, F >= 1, H and W >= ``min_size``; ``prompts`` a list or tuple of exactly B str; ``first_frames`` None or
    a finite float tensor [B, 3, H, W] in [-1, 1].  ``TypeError`` / ``ValueError`` naming the argument otherwise.
    """
    v = _check_frames_tensor(video, "video", fn, 5, "[B, 3, F, H, W]")
    b, _, _, h, w = v.shape
    if h < min_size or w < min_size:
        raise ValueError(f"{fn}: video frames are {h} x {w}; this reward needs at least {min_size} x {min_size}")
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"{fn}: prompts must be a list of {b} str (one per video), got {type(prompts).__name__}")
    if len(prompts) != b:
        raise ValueError(f"{fn}: prompts has {len(prompts)} entries but video has a batch of {b}; they must match")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{fn}: prompts[{i}] must be a str, got {type(p).__name__}")
    if first_frames is not None:
        ff = _check_frames_tensor(first_frames, "first_frames", fn, 4, "[B, 3, H, W]")
        if ff.shape[0] != b or ff.shape[2:] != v.shape[3:]:
            raise ValueError(
                f"{fn}: first_frames has shape {tuple(ff.shape)}; it must be [B, 3, H, W] = {[b, 3, h, w]} to match "
                f"video {tuple(v.shape)}"
            )
        first_frames = ff
    return v, list(prompts), first_frames


# --------------------------------------------------------------------------------------------------------------
# the protocol


class Reward:
    """Base class of a reward: subclasses implement :meth:`score`; calling validates inputs and output.

    ``name`` defaults to the class attribute ``default_name``; ``weight`` (finite, >= 0) is what
    ``ospfn.rl.combine_rewards`` multiplies this reward's advantage (or value) by when several are combined.
    """

    default_name = "reward"
    min_size = 1  # the smallest H and W the reward accepts

    def __init__(self, *, weight: float = 1.0, name: Optional[str] = None):
        cls = type(self).__name__
        self.weight = _check_weight(weight, cls)
        name = self.default_name if name is None else name
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{cls}: name={name!r} must be a non-empty str")
        self.name = name

    def score(self, video: torch.Tensor, prompts: list[str], first_frames: Optional[torch.Tensor]) -> torch.Tensor:
        """The reward of each video, [B] (any float dtype and device); inputs already validated."""
        raise NotImplementedError(f"{type(self).__name__}.score is not implemented")

    @torch.no_grad()
    def __call__(self, video: torch.Tensor, prompts: Sequence[str], *, first_frames: Optional[torch.Tensor] = None) -> torch.Tensor:
        fn = f"{type(self).__name__}({self.name!r})"
        video, prompts, first_frames = check_reward_inputs(video, prompts, first_frames, fn=fn, min_size=self.min_size)
        out = self.score(video, prompts, first_frames)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out)
        out = out.detach().to(device=video.device, dtype=torch.float32).reshape(-1)
        if out.shape[0] != video.shape[0]:
            raise ValueError(f"{fn}: score returned {out.shape[0]} values for a batch of {video.shape[0]} videos")
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"{fn}: score returned non-finite values {out.tolist()}")
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight})"


class FunctionReward(Reward):
    """Wrap ``fn(video [B, 3, F, H, W], prompts, first_frames) -> [B]`` (a tensor, array or list) as a :class:`Reward`.

    For a reward model run locally (e.g. a VideoAlign-style VLM scorer loaded from a directory), write the
    function that resizes / re-encodes the video the way the model wants and returns one number per video.

    Example::

        >>> import torch
        >>> r = FunctionReward(lambda v, p, ff: v.mean(dim=(1, 2, 3, 4)), name="brightness", weight=0.5)
        >>> r(torch.zeros(2, 3, 1, 4, 4), ["a", "b"]).tolist(), r.name, r.weight
        ([0.0, 0.0], 'brightness', 0.5)
    """

    def __init__(self, fn: Callable, *, name: str, weight: float = 1.0):
        if not callable(fn):
            raise TypeError(f"FunctionReward: fn must be callable (video, prompts, first_frames) -> [B], got {type(fn).__name__}")
        super().__init__(weight=weight, name=name)
        self.fn = fn

    def score(self, video, prompts, first_frames):
        return self.fn(video, prompts, first_frames)


# --------------------------------------------------------------------------------------------------------------
# batched object segmentation (the algorithm of ospfn.eval.trackers.track_object, in torch, float64)


def _border_plane(frames: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per image and channel, the plane a + b x + c y least-squares fitted to the border ring of ``frames``
    [N, 3, H, W] (2 px wide; 1 px below 8 px), refitted once without the ring pixels whose residual (L2 over
    channels) exceeds ``threshold`` when at least half the ring remains -> the background [N, 3, H, W]."""
    n, _, h, w = frames.shape
    dt, dev = frames.dtype, frames.device
    ring = torch.zeros(h, w, dtype=torch.bool, device=dev)
    b = 2 if min(h, w) >= 8 else 1
    ring[:b, :] = ring[-b:, :] = ring[:, :b] = ring[:, -b:] = True
    yy, xx = torch.meshgrid(torch.arange(h, dtype=dt, device=dev), torch.arange(w, dtype=dt, device=dev), indexing="ij")
    design_full = torch.stack([torch.ones_like(xx), (xx - (w - 1) / 2) / w, (yy - (h - 1) / 2) / h], -1)  # [H, W, 3]
    design = design_full[ring]  # [R, 3]
    vals = frames.permute(0, 2, 3, 1)[:, ring]  # [N, R, 3]

    def fit(wts: torch.Tensor) -> torch.Tensor:  # [N, R] weights -> coefficients [N, 3 (design), 3 (channels)]
        aw = design[None] * wts[..., None]  # [N, R, 3]
        lhs = aw.transpose(1, 2) @ design[None]  # [N, 3, 3]
        return torch.linalg.solve(lhs, aw.transpose(1, 2) @ vals)

    coef = fit(torch.ones(n, design.shape[0], dtype=dt, device=dev))
    res = (vals - design[None] @ coef).norm(dim=-1)  # [N, R]
    keep = res <= threshold
    redo = keep.sum(1) >= design.shape[0] // 2
    coef = fit(torch.where(redo[:, None], keep, torch.ones_like(keep)).to(dt))
    return (design_full.reshape(1, h * w, 3) @ coef).reshape(n, h, w, 3).permute(0, 3, 1, 2)


def _box3(x: torch.Tensor) -> torch.Tensor:
    """3 x 3 mean over the last two axes of [N, C, H, W], edges replicated."""
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def _dilate(m: torch.Tensor, px: int = 1) -> torch.Tensor:
    """Binary dilation by a (2 px + 1)^2 square over the last two axes of a bool [N, H, W]."""
    k = 2 * px + 1
    return F.max_pool2d(m[:, None].to(torch.float32), k, stride=1, padding=px)[:, 0] > 0


class _Seg:
    """Segmentation of N frames [N, 3, H, W]: background, object layer, mask, presence, centroid."""

    def __init__(self, frames: torch.Tensor, threshold: float, min_area: int):
        n, _, h, w = frames.shape
        self.bg = _border_plane(frames, threshold)
        self.diff = frames - self.bg  # [N, 3, H, W]: the object layer (plus noise)
        self.dist = _box3(self.diff).norm(dim=1)  # [N, H, W]
        self.mask = self.dist > threshold
        self.area = self.mask.flatten(1).sum(1)
        self.present = self.area >= min_area
        wgt = torch.where(_dilate(self.mask), self.dist, torch.zeros_like(self.dist))
        tot = wgt.flatten(1).sum(1).clamp_min(1e-12)
        xs = torch.arange(w, dtype=frames.dtype, device=frames.device)
        ys = torch.arange(h, dtype=frames.dtype, device=frames.device)
        cx = (wgt * xs[None, None, :]).flatten(1).sum(1) / tot
        cy = (wgt * ys[None, :, None]).flatten(1).sum(1) / tot
        self.centroid = torch.stack([cx, cy], 1)  # [N, 2] (x, y); meaningless where not present


def _shift(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Translate images [N, C, H, W] by ``d`` [N, 2] = (dx, dy) pixels (bilinear, zeros outside)."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2.0 * d[:, 0] / w  # align_corners=False: one pixel is 2 / W in normalised coordinates
    theta[:, 1, 2] = -2.0 * d[:, 1] / h
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _fill_absent(cent: torch.Tensor, present: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Centroids [B, F, 2]: an absent frame takes the last present frame's position (``start`` [B, 2] before
    the first present one)."""
    out = cent.clone()
    last = start.clone()
    for f in range(cent.shape[1]):
        last = torch.where(present[:, f, None], cent[:, f], last)
        out[:, f] = last
    return out


def _check_threshold(threshold: object, cls: str) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (0 < threshold < math.inf):
        raise ValueError(f"{cls}: threshold={threshold!r} must be a finite number > 0")
    return float(threshold)


def _check_min_area(min_area: object, cls: str) -> Optional[int]:
    if min_area is not None and (isinstance(min_area, bool) or not isinstance(min_area, int) or min_area < 1):
        raise ValueError(f"{cls}: min_area={min_area!r} must be None (max(4, H * W / 256)) or an int >= 1")
    return min_area


class _SyntheticReward(Reward):
    """Shared set-up of the synthetic-world rewards: segmentation parameters, frame-0 template and later frames."""

    min_size = 8

    def __init__(self, *, weight: float = 1.0, name: Optional[str] = None, threshold: float = 0.35, min_area: Optional[int] = None):
        super().__init__(weight=weight, name=name)
        cls = type(self).__name__
        self.threshold = _check_threshold(threshold, cls)
        self.min_area = _check_min_area(min_area, cls)

    def _segment(self, video: torch.Tensor, first_frames: Optional[torch.Tensor]):
        """-> (template segmentation [B], later-frame segmentation [B * (F - 1)]) on CPU in float64."""
        v = video.detach().to(device="cpu", dtype=torch.float64)
        b, _, nf, h, w = v.shape
        min_area = self.min_area if self.min_area is not None else max(4, round(h * w / 256))
        ref = v[:, :, 0] if first_frames is None else first_frames.detach().to(device="cpu", dtype=torch.float64)
        tmpl = _Seg(ref, self.threshold, min_area)
        later = v[:, :, 1:].permute(0, 2, 1, 3, 4).reshape(b * (nf - 1), 3, h, w)
        return tmpl, _Seg(later, self.threshold, min_area), min_area


# --------------------------------------------------------------------------------------------------------------
# built-ins


class FidelityReward(_SyntheticReward):
    """Colour and shape fidelity of the moving object in every later frame against the first frame's object.

    The first frame (``first_frames``, else ``video[:, :, 0]``) is split into a background plane and the object
    layer ``T = frame - background`` kept on the object's mask dilated by ``dilate`` px (anti-aliased edges
    included).  In each later frame f the object is segmented the same way and tracked (colour-distance-weighted
    centroid, as :func:`ospfn.eval.trackers.track_object`); the prediction is ``T`` translated (bilinear) from
    the first frame's centroid to frame f's (an absent object keeps its last position).  With ``D_f`` the frame's
    object layer (frame minus its own fitted background, so a uniform background drift is not the object's
    fault) and ``R_f`` the union of both objects' masks dilated by ``dilate`` px, the frame's score is

        ``1 - sum_{R_f} ||D_f - shift(T)||^2 / sum ||T||^2``

    (RGB L2, in [-1, 1] units): 1 for a perfect copy, about 0 when the object vanished (the error is then the
    object's own energy), negative when it is replaced by something worse than nothing (e.g. a clash of
    colours); clamped to [-1, 1].  The reward is the mean over frames 1..F-1 (F = 1: 1).  A blurred, recoloured
    or reshaped object scores lower; a moved one does not (that is :class:`MotionReward`'s business).
    The ground truth of :class:`ospfn.data.SyntheticMotion` scores about 0.97-1 (sub-pixel motion is
    re-sampled bilinearly).  A first frame without a detectable object gives 0 for the whole video.
    """

    default_name = "fidelity"

    def __init__(self, *, weight: float = 1.0, name: Optional[str] = None, threshold: float = 0.35,
                 min_area: Optional[int] = None, dilate: int = 1):
        super().__init__(weight=weight, name=name, threshold=threshold, min_area=min_area)
        if isinstance(dilate, bool) or not isinstance(dilate, int) or not 0 <= dilate <= 8:
            raise ValueError(f"FidelityReward: dilate={dilate!r} must be an int in [0, 8] (pixels)")
        self.dilate = dilate

    def score(self, video, prompts, first_frames):
        b, _, nf, h, w = video.shape
        if nf == 1:
            return torch.ones(b)
        tmpl, seg, _ = self._segment(video, first_frames)
        k = nf - 1
        keep0 = _dilate(tmpl.mask, self.dilate) if self.dilate else tmpl.mask
        t = tmpl.diff * keep0[:, None]  # [B, 3, H, W]
        energy = t.pow(2).sum((1, 2, 3))  # [B]
        cent = _fill_absent(seg.centroid.reshape(b, k, 2), seg.present.reshape(b, k), tmpl.centroid)
        d = (cent - tmpl.centroid[:, None]).reshape(b * k, 2)
        src = torch.cat([t, keep0[:, None].to(t.dtype)], 1).repeat_interleave(k, 0)  # [B*k, 4, H, W]
        moved = _shift(src, d)
        pred, pred_mask = moved[:, :3], moved[:, 3] > 0.5
        region = _dilate(seg.mask, self.dilate) | pred_mask if self.dilate else seg.mask | pred_mask
        err = ((seg.diff - pred).pow(2).sum(1) * region).sum((1, 2)).reshape(b, k)  # [B, k]
        per_frame = (1.0 - err / energy.clamp_min(1e-12)[:, None]).clamp(-1.0, 1.0)
        out = per_frame.mean(1)
        return torch.where(tmpl.present & (energy > 1e-9), out, torch.zeros_like(out))


class SharpnessReward(_SyntheticReward):
    """The object's edge energy in every later frame against the first frame's: ``min(E_f / E_0, E_0 / E_f)``.

    ``E`` is the sum of squared horizontal and vertical differences of the object layer (frame minus fitted
    background) over the object's mask dilated by 2 px.  1 when the object is as crisp as in the first frame;
    a blurred object scores lower, and so do added noise or ringing (more edge energy than the first frame); 0
    when the object vanished.  The mean over frames 1..F-1 (F = 1: 1); 0 when the first frame has no object.
    A coarse signal at low resolution: the sub-pixel position of a small object alone changes its edge energy
    (ground-truth synthetic clips at 32 x 32 score 0.77-1, mean 0.95).
    """

    default_name = "sharpness"

    @staticmethod
    def _edge_energy(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        region = _dilate(mask, 2).to(diff.dtype)
        gx = (diff[..., :, 1:] - diff[..., :, :-1]).pow(2).sum(1) * region[..., :, 1:] * region[..., :, :-1]
        gy = (diff[..., 1:, :] - diff[..., :-1, :]).pow(2).sum(1) * region[..., 1:, :] * region[..., :-1, :]
        return gx.flatten(1).sum(1) + gy.flatten(1).sum(1)

    def score(self, video, prompts, first_frames):
        b, _, nf, _, _ = video.shape
        if nf == 1:
            return torch.ones(b)
        tmpl, seg, _ = self._segment(video, first_frames)
        e0 = self._edge_energy(tmpl.diff, tmpl.mask)  # [B]
        ef = self._edge_energy(seg.diff, seg.mask).reshape(b, nf - 1)
        ef = torch.where(seg.present.reshape(b, nf - 1), ef, torch.zeros_like(ef))
        e0_ = e0[:, None].clamp_min(1e-12)
        ratio = torch.minimum(ef / e0_, e0_ / ef.clamp_min(1e-12))
        out = ratio.mean(1)
        return torch.where(tmpl.present & (e0 > 1e-9), out, torch.zeros_like(out))


class MotionReward(_SyntheticReward):
    """The tracked object moves the way the caption says (left / right / up / down).

    The object is tracked in every frame (frame 0 from ``video``, not ``first_frames``: the motion is the
    generated video's); with at least two frames present, its velocity is the least-squares slope of the
    centroid over the frame index, times ``F - 1``: the displacement ``(a, p)`` along and across the caption's
    direction.  The reward is ``tanh(a / scale) - tanh(|p| / scale)`` with ``scale = scale_px * min(H, W) / 32``
    (default 2 px at 32 x 32, the tracker's ``min_displacement``): about 1 when it clearly moves the right way
    and straight, about 0 when it stays put, about -1 when it goes the opposite way (range [-2, 1]); -1 when the
    object is present in fewer than two frames.  Saturating on purpose: no reward for moving faster than needed.
    ``ValueError`` when a prompt names no direction (see :func:`ospfn.eval.trackers.caption_direction`).
    """

    default_name = "motion"

    def __init__(self, *, weight: float = 1.0, name: Optional[str] = None, threshold: float = 0.35,
                 min_area: Optional[int] = None, scale_px: float = 2.0):
        super().__init__(weight=weight, name=name, threshold=threshold, min_area=min_area)
        if isinstance(scale_px, bool) or not isinstance(scale_px, (int, float)) or not (0 < scale_px < math.inf):
            raise ValueError(f"MotionReward: scale_px={scale_px!r} must be a finite number > 0")
        self.scale_px = float(scale_px)

    def score(self, video, prompts, first_frames):
        b, _, nf, h, w = video.shape
        units = []
        for i, p in enumerate(prompts):
            try:
                units.append(_UNIT[caption_direction(p)])
            except ValueError as e:
                raise ValueError(f"MotionReward: prompts[{i}]: {e}") from None
        u = torch.tensor(units, dtype=torch.float64)  # [B, 2]
        if nf == 1:
            return torch.full((b,), -1.0)
        v = video.detach().to(device="cpu", dtype=torch.float64)
        min_area = self.min_area if self.min_area is not None else max(4, round(h * w / 256))
        seg = _Seg(v.permute(0, 2, 1, 3, 4).reshape(b * nf, 3, h, w), self.threshold, min_area)
        cent = seg.centroid.reshape(b, nf, 2)
        ok = seg.present.reshape(b, nf).to(torch.float64)  # [B, F]
        t = torch.arange(nf, dtype=torch.float64)[None].expand(b, nf)
        cnt = ok.sum(1).clamp_min(1.0)
        tm = (t * ok).sum(1) / cnt
        cm = (cent * ok[..., None]).sum(1) / cnt[:, None]
        tc = (t - tm[:, None]) * ok
        vel = (tc[..., None] * (cent - cm[:, None]) * ok[..., None]).sum(1) / (tc * tc).sum(1).clamp_min(1e-12)[:, None]
        disp = vel * (nf - 1)  # [B, 2] px over the clip
        along = (disp * u).sum(1)
        across = (disp[:, 0] * u[:, 1] - disp[:, 1] * u[:, 0]).abs()
        scale = self.scale_px * min(h, w) / 32
        out = torch.tanh(along / scale) - torch.tanh(across / scale)
        return torch.where(ok.sum(1) >= 2, out, torch.full_like(out, -1.0))


# --------------------------------------------------------------------------------------------------------------
# registry

class FirstFrameReward(Reward):
    """``"first_frame"``: PSNR (dB) of the generated frame 0 against the condition image ``first_frames``, pixels
    in [0, 1] (the measure ``recipes/eval_tiny.py`` reports), capped at ``cap`` dB.  An image-to-video model
    should start from its condition image; as an RL reward beside ``fidelity`` it keeps the first frame from
    drifting.  Needs ``first_frames``.

    Example::

        >>> import torch
        >>> first = torch.zeros(2, 3, 8, 8)
        >>> video = torch.zeros(2, 3, 3, 8, 8)
        >>> video[1, :, 0] = 0.2                              # an error of 0.1 in [0, 1] units: 20 dB
        >>> [round(x, 3) for x in FirstFrameReward()(video, ["a", "b"], first_frames=first).tolist()]
        [60.0, 20.0]
    """

    default_name = "first_frame"

    def __init__(self, *, weight: float = 1.0, name: Optional[str] = None, cap: float = 60.0):
        super().__init__(weight=weight, name=name)
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
            raise ValueError(f"FirstFrameReward: cap={cap!r} must be a finite number > 0 (dB)")
        self.cap = float(cap)

    def score(self, video, prompts, first_frames):
        if first_frames is None:
            raise ValueError(f"FirstFrameReward({self.name!r}): first_frames is required (the condition images [B, 3, H, W])")
        mse = ((video[:, :, 0].double() - first_frames.double()) / 2).pow(2).flatten(1).mean(1)
        return (-10 * torch.log10(mse.clamp_min(10 ** (-self.cap / 10)))).clamp(max=self.cap)


reward_registry: dict[str, Callable[..., Reward]] = {
    "motion": MotionReward,
    "fidelity": FidelityReward,
    "sharpness": SharpnessReward,
    "first_frame": FirstFrameReward,
}


def register_reward(name: str, factory: Callable[..., Reward], *, overwrite: bool = False) -> None:
    """Make ``make_reward(name, weight=..., **kw)`` build ``factory(weight=..., name=name, **kw)``.

    ``ValueError`` when ``name`` is taken (unless ``overwrite``) or not a non-empty str.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_reward: name={name!r} must be a non-empty str")
    if not callable(factory):
        raise TypeError(f"register_reward: factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in reward_registry and not overwrite:
        raise ValueError(f"register_reward: name={name!r} is already registered (pass overwrite=True to replace it)")
    reward_registry[name] = factory


def make_reward(name: str, weight: float = 1.0, **kwargs) -> Reward:
    """Build the registered reward ``name`` with ``weight`` and its keyword options.

    ``ValueError`` listing the known names for an unknown one.

    Example::

        >>> make_reward("motion", weight=0.5)
        MotionReward(name='motion', weight=0.5)
        >>> make_reward("fidelity", dilate=2).dilate
        2
    """
    if not isinstance(name, str) or name not in reward_registry:
        raise ValueError(f"make_reward: name={name!r} is not a known reward; known: {sorted(reward_registry)}")
    try:
        return reward_registry[name](weight=weight, name=name, **kwargs)
    except TypeError as e:  # an option this reward does not take
        raise TypeError(f"make_reward({name!r}): {e}") from None
