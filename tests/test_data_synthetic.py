"""ospfn.data.synthetic: the synthetic motion dataset and its renderer (the tracker: test_eval_trackers.py)."""

import doctest
import math

import numpy as np
import pytest
import torch

from ospfn.data import synthetic as syn
from ospfn.data.synthetic import SyntheticMotion
from ospfn.eval import caption_direction

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


def test_docstring_examples():
    res = doctest.testmod(syn, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 10 and res.failed == 0
