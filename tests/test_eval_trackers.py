"""ospfn.eval.trackers: the object tracker and the caption / motion parsers, on synthetic and hand-made videos."""

import doctest
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ospfn.data import SyntheticMotion
from ospfn.eval import trackers
from ospfn.eval.trackers import caption_direction, motion_direction, track_object


def blur3(video):
    """3 x 3 box blur of every frame of [3, F, H, W] (replicate border)."""
    x = video.permute(1, 0, 2, 3)
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), torch.ones(3, 1, 3, 3) / 9, groups=3)
    return x.permute(1, 0, 2, 3)


def test_track_object_exact_on_hand_made_video_with_gradient():
    h, w, nf = 24, 40, 4
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    bg = torch.stack([-0.5 + 0.004 * xx, -0.6 + 0.003 * yy, 0.2 + 0.002 * (xx + yy)])  # a linear gradient
    v = bg[:, None].repeat(1, nf, 1, 1)
    col = torch.tensor([0.9, 0.8, -0.8])[:, None, None]
    boxes = [(3, 7, 5, 11), (4, 8, 9, 15), (10, 15, 20, 23), (12, 16, 30, 36)]  # (r0, r1, c0, c1) exclusive ends
    for f, (r0, r1, c0, c1) in enumerate(boxes):
        v[:, f, r0:r1, c0:c1] = col
    c, p = track_object(v)
    expect = torch.tensor([[(c0 + c1 - 1) / 2, (r0 + r1 - 1) / 2] for r0, r1, c0, c1 in boxes])
    assert p.all()
    assert torch.allclose(c, expect, atol=0.01)  # dist weights vary slightly with the gradient
    # a known flat background can be passed in
    flat = torch.full((3, 2, 16, 16), -0.2)
    flat[:, :, 2:6, 9:12] = 0.9
    c2, p2 = track_object(flat, background=[-0.2, -0.2, -0.2])
    assert p2.all() and torch.allclose(c2, torch.tensor([[10.0, 3.5]] * 2), atol=1e-4)
    assert motion_direction(c) == "right"


def _check_tracking(ds, transform=None, tol=0.5):
    errs = []
    for i in range(len(ds)):
        it = ds[i]
        v = it["video"] if transform is None else transform(it["video"], i)
        c, p = track_object(v)
        assert p.all(), i
        errs.append(float((c - it["centroids"]).abs().max()))
        assert motion_direction(c) == it["direction"], i
    assert max(errs) < tol, max(errs)


def test_tracking_recovers_ground_truth():
    _check_tracking(SyntheticMotion(150, seed=11), tol=0.3)
    _check_tracking(SyntheticMotion(20, frames=13, size=(48, 64), seed=12), tol=0.3)


@pytest.mark.parametrize("noise,blur", [(0.1, False), (0.0, True), (0.1, True)])
def test_tracking_robust_to_noise_and_blur(noise, blur):
    gen = torch.Generator().manual_seed(0)

    def degrade(v, i):
        v = v + noise * torch.randn(v.shape, generator=gen)
        return (blur3(v) if blur else v).clamp(-1, 1)

    _check_tracking(SyntheticMotion(120, seed=21, split="eval"), transform=degrade, tol=0.5)


def test_track_object_reports_vanishing_object():
    ds = SyntheticMotion(30, seed=5)
    for i, k in zip(range(30), [0, 1, 2, 3, 4, 5, 6, 7, 8] * 4):
        it = ds[i]
        v = it["video"].clone()
        v[:, k + 1 :] = v[:, k + 1 :, 0:1, 0:1]  # later frames: flat background only
        c, p = track_object(v)
        assert p.tolist() == [True] * (k + 1) + [False] * (9 - k - 1), (i, k)
        assert torch.isnan(c[k + 1 :]).all() and not torch.isnan(c[: k + 1]).any()
        assert (c[: k + 1] - it["centroids"][: k + 1]).abs().max() < 0.3
        got = motion_direction(c)
        if k == 0:
            assert got is None  # lost after one frame
        elif k * it["speed"] >= 2.0:
            assert got == it["direction"]
    # an empty (all background, noisy) video: nothing present
    gen = torch.Generator().manual_seed(1)
    empty = (torch.full((3, 5, 32, 32), -0.3) + 0.1 * torch.randn(3, 5, 32, 32, generator=gen)).clamp(-1, 1)
    c, p = track_object(blur3(empty))
    assert not p.any() and torch.isnan(c).all()
    assert motion_direction(c) is None


def test_track_object_min_area_and_errors():
    v = torch.full((3, 1, 16, 16), -1.0)
    v[:, 0, 5:7, 5:7] = 1.0  # 4 px object; smoothing spreads it over a 4 x 4 patch
    assert track_object(v)[1].tolist() == [True]
    assert track_object(v, min_area=40)[1].tolist() == [False]
    with pytest.raises(ValueError, match=r"shape \[3, F, H, W\]"):
        track_object(torch.zeros(4, 2, 8, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        track_object([[0.0]])
    with pytest.raises(TypeError, match="float"):
        track_object(torch.zeros(3, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="threshold=0"):
        track_object(v, threshold=0)
    with pytest.raises(ValueError, match="background of shape"):
        track_object(v, background=torch.zeros(2))


def test_motion_direction():
    assert motion_direction([[10, 5], [8, 5.2], [6, 5.1]]) == "left"
    assert motion_direction(torch.tensor([[3.0, 9.0], [3.5, 6.0], [2.5, 3.0]])) == "up"
    assert motion_direction(np.array([[3.0, 3.0], [5.0, 6.0], [7.0, 9.5]])) == "down"  # |dy| > |dx|
    assert motion_direction([[3.0, 3.0], [float("nan")] * 2, [9.0, 4.0]]) == "right"
    assert motion_direction([[10.0, 5.0], [10.5, 5.5], [11.0, 6.0]]) is None  # barely moves (1 px)
    assert motion_direction([[10.0, 5.0], [10.5, 5.5], [11.0, 6.0]], min_displacement=0.5) == "right"
    assert motion_direction([[10.0, 5.0]] + [[float("nan")] * 2] * 4) is None  # lost
    # least squares ignores one jittery frame
    track = [[float(x), 5.0] for x in range(0, 18, 2)]
    track[4] = [2.0, 9.0]
    assert motion_direction(track) == "right"
    with pytest.raises(ValueError, match=r"\[F, 2\]"):
        motion_direction([1.0, 2.0])
    with pytest.raises(ValueError, match="min_present"):
        motion_direction([[0, 0], [5, 0]], min_present=1)


def test_caption_direction():
    assert caption_direction("a small red circle moving left on a navy background") == "left"
    assert caption_direction("A large cyan square moving Up on a black background") == "up"
    assert caption_direction("down we go, down!") == "down"
    assert caption_direction("a square in the upper corner moving right") == "right"  # "upper" is not "up"
    for d in ("left", "right", "up", "down"):
        ds_caption = SyntheticMotion(1)[0]["caption"]
        assert caption_direction(re.sub(r"\b(left|right|up|down)\b", d, ds_caption)) == d
    with pytest.raises(ValueError, match="no direction word"):
        caption_direction("a red circle standing still")
    with pytest.raises(ValueError, match=r"several directions \['left', 'up'\]"):
        caption_direction("moving left then up")
    with pytest.raises(TypeError, match="caption must be a str"):
        caption_direction(None)


def test_docstring_examples():
    res = doctest.testmod(trackers, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 10 and res.failed == 0
