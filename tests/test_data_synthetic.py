"""ospfn.data.synthetic: the synthetic motion dataset, the object tracker and the caption / motion parsers."""

import doctest
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ospfn.data import synthetic as syn
from ospfn.data.synthetic import SyntheticMotion, caption_direction, motion_direction, track_object

# the palettes as the tests expect them (independent copies), RGB in [0, 1]
OBJECT_RGB = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.15, 0.80, 0.20),
    "yellow": (0.95, 0.85, 0.10),
    "cyan": (0.10, 0.80, 0.90),
    "magenta": (0.85, 0.20, 0.85),
    "white": (0.97, 0.97, 0.97),
}
BACKGROUND_NAMES = {"black", "gray", "navy", "brown", "purple"}
UNIT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def blur3(video):
    """3 x 3 box blur of every frame of [3, F, H, W] (replicate border)."""
    x = video.permute(1, 0, 2, 3)
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), torch.ones(3, 1, 3, 3) / 9, groups=3)
    return x.permute(1, 0, 2, 3)


# ------------------------------------------------------------------------------------------------------------
# dataset content


@pytest.mark.parametrize("size,frames", [((32, 32), 9), ((48, 64), 5)])
def test_items_are_well_formed_and_self_consistent(size, frames):
    ds = SyntheticMotion(40, frames=frames, size=size, seed=7)
    h, w = size
    m = min(h, w)
    seen = {k: set() for k in ("shape", "color", "background", "direction", "size")}
    for i in range(len(ds)):
        it = ds[i]
        v = it["video"]
        assert v.shape == (3, frames, h, w) and v.dtype == torch.float32
        assert float(v.min()) >= -1.0 and float(v.max()) <= 1.0
        assert it["index"] == i
        for k in seen:
            seen[k].add(it[k])
        # caption names size, colour, shape, direction and background, in the documented template
        assert it["caption"] == (
            f"a {it['size']} {it['color']} {it['shape']} moving {it['direction']} on a {it['background']} background"
        )
        assert caption_direction(it["caption"]) == it["direction"]
        # constant velocity along the caption's direction at `speed`, with the documented speed range
        c = it["centroids"].double()
        assert c.shape == (frames, 2)
        ux, uy = UNIT[it["direction"]]
        t = torch.arange(frames, dtype=torch.float64)
        expect = c[0] + t[:, None] * torch.tensor([ux, uy], dtype=torch.float64) * it["speed"]
        assert torch.allclose(c, expect, atol=1e-4)
        assert 0.25 * m / 32 <= it["speed"] <= 2.5 * m / 32 + 1e-9
        # the start centre lies on the quarter-pixel lattice
        assert torch.allclose(c[0] * 4, (c[0] * 4).round(), atol=1e-5)
        # the object has its palette colour at the pixel nearest its centroid (fully covered there) ...
        col = torch.tensor(OBJECT_RGB[it["color"]]) * 2 - 1
        for f in range(frames):
            x, y = (int(math.floor(float(a) + 0.5)) for a in c[f])
            assert torch.allclose(v[:, f, y, x], col, atol=1e-5), (i, f)
        # ... and never touches the outermost rows / columns (it stays fully inside the frame)
        dist = (v - col[:, None, None, None]).norm(dim=0)  # [F, H, W]
        border = torch.cat([dist[:, 0, :], dist[:, -1, :], dist[:, :, 0], dist[:, :, -1]], 1)
        assert float(border.min()) > 0.8, i
        # the base background colour is the most common colour far from the object
        far = dist[0] > 0.9
        bg = v[:, 0][:, far].median(dim=1).values
        assert torch.allclose(bg, it["background_rgb"], atol=0.12)
    assert seen["direction"] == set(UNIT)
    assert seen["shape"] <= {"circle", "square", "triangle", "diamond"} and len(seen["shape"]) >= 3
    assert seen["color"] <= set(OBJECT_RGB) and seen["background"] <= BACKGROUND_NAMES
    assert seen["size"] == {"small", "large"}


def test_object_area_matches_the_shape():
    """Coverage-weighted area of each rendered object equals the ideal shape's area (anti-aliasing is exact)."""
    r = 5.0
    areas = {
        "circle": math.pi * r * r,
        "square": (2 * 0.886 * r) ** 2,
        "diamond": 2 * (1.2 * r) ** 2,
        "triangle": 3 * math.sqrt(3) / 4 * (1.35 * r) ** 2,
    }
    for shape, area in areas.items():
        v = syn.render_video(torch.tensor([[15.3, 14.6]]), shape=shape, radius=r, color=(1, 1, 1),
                             background=(0, 0, 0), size=(32, 32))
        cov = (v[0, 0] + 1) / 2  # white on black: the pixel value is the coverage
        assert abs(float(cov.sum()) - area) < 0.02 * area, shape
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        cx, cy = float((cov * xs).sum() / cov.sum()), float((cov * ys).sum() / cov.sum())
        assert abs(cx - 15.3) < 0.1 and abs(cy - 14.6) < 0.1, shape  # the centroid is the shape's centroid


def test_determinism_no_global_rng_and_dataloader_workers():
    ds = SyntheticMotion(12, seed=3)
    torch.manual_seed(123)
    np.random.seed(123)
    t_state, n_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    a = ds[5]
    _ = [ds[i] for i in range(12)]  # order must not matter
    b = SyntheticMotion(12, seed=3)[5]
    assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"] and a["speed"] == b["speed"]
    assert torch.equal(a["video"], ds[-7]["video"])
    # no global RNG read or advanced
    assert torch.equal(torch.random.get_rng_state(), t_state)
    assert np.array_equal(np.random.get_state()[1], n_state)
    # a different seed or split gives different clips
    assert not torch.equal(SyntheticMotion(12, seed=4)[5]["video"], a["video"])
    assert not torch.equal(SyntheticMotion(12, seed=3, split="eval")[5]["video"], a["video"])
    # a longer dataset has the same first items (item i depends only on (seed, split, i))
    assert torch.equal(SyntheticMotion(1000, seed=3)[5]["video"], a["video"])
    # DataLoader workers see the same items
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    vids = torch.cat([bt["video"] for bt in batches])
    direct = torch.stack([ds[i]["video"] for i in range(12)])
    assert torch.equal(vids, direct)
    assert [c for bt in batches for c in bt["caption"]] == [ds[i]["caption"] for i in range(12)]


def test_eval_split_is_disjoint_from_train():
    train = SyntheticMotion(3000, frames=5, seed=0, split="train")
    evals = SyntheticMotion(300, frames=5, seed=0, split="eval")
    # the documented mechanism: start lattice coordinates qx + qy are even for train, odd for eval
    for ds, parity in ((train, 0), (evals, 1)):
        for i in range(0, len(ds), 7):
            q = (ds[i]["centroids"][0] * 4).round().long()
            assert int(q.sum()) % 2 == parity
    # and its consequence: no eval first frame equals any train first frame
    train_first = {train[i]["video"][:, 0].numpy().tobytes() for i in range(len(train))}
    assert len(train_first) == len(train)
    assert not any(evals[i]["video"][:, 0].numpy().tobytes() in train_first for i in range(len(evals)))


def test_same_object_shifted_by_one_lattice_step_renders_differently():
    """The injectivity the disjointness argument rests on: a quarter-pixel shift changes the pixels."""
    for shape in syn.SHAPES:
        for d in ((0.25, 0.0), (0.0, 0.25), (-0.25, 0.0), (0.0, -0.25)):
            a = syn.render_video(torch.tensor([[12.0, 13.25]]), shape=shape, radius=3.52, color=(1, 0, 0),
                                 background=(0, 0, 1), size=(32, 32))
            b = syn.render_video(torch.tensor([[12.0 + d[0], 13.25 + d[1]]]), shape=shape, radius=3.52,
                                 color=(1, 0, 0), background=(0, 0, 1), size=(32, 32))
            assert not torch.equal(a, b), (shape, d)


def test_constructor_and_index_errors():
    with pytest.raises(ValueError, match=r"split='test'.*allowed"):
        SyntheticMotion(4, split="test")
    with pytest.raises(ValueError, match="num_samples=-1"):
        SyntheticMotion(-1)
    with pytest.raises(ValueError, match="size=\\(8, 8\\)"):
        SyntheticMotion(4, size=(8, 8))
    with pytest.raises(ValueError, match="frames=1"):
        SyntheticMotion(4, frames=1)
    with pytest.raises(ValueError, match="frames=200 is too many"):
        SyntheticMotion(4, frames=200)
    with pytest.raises(ValueError, match="seed=-2"):
        SyntheticMotion(4, seed=-2)
    ds = SyntheticMotion(4)
    with pytest.raises(IndexError, match="index=4"):
        ds[4]
    with pytest.raises(TypeError, match="index"):
        ds["0"]
    assert len(list(ds)) == 4  # iteration stops at IndexError


# ------------------------------------------------------------------------------------------------------------
# tracking


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
    res = doctest.testmod(syn, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 10 and res.failed == 0
