"""ospfn.eval.styles: the I2SV evaluator (style of every frame by the nearest style template; motion and presence)."""

import doctest

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ospfn.data.stylize import render_styled_video, style_background
from ospfn.data.synthetic import SyntheticMotion, render_video
from ospfn.eval import classify_style, score_styled_video
from ospfn.eval import styles as ev
from ospfn.styles import STYLES

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def degrade(video: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What a small blurry model's output is like: a 3 x 3 box blur (replicate border) plus Gaussian noise std 0.05."""
    x = video.permute(1, 0, 2, 3)
    x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), torch.ones(3, 1, 3, 3) / 9, groups=3)
    x = x + 0.05 * torch.randn(x.shape, generator=gen)
    return x.clamp(-1, 1).permute(1, 0, 2, 3)


def _scene(item) -> dict:
    return {k: item[k] for k in ("shape", "radius", "color", "background", "gradient")}


@pytest.fixture(scope="module")
def items():
    ds = SyntheticMotion(72, frames=5, size=(32, 32), split="eval", seed=3, styles="all")
    out = [ds[i] for i in range(len(ds))]
    assert {it["style"] for it in out} == set(STYLES)  # every style is tested
    return out


def test_classifier_is_exact_on_perfect_renders(items):
    right = total = 0
    for it in items:
        for f in range(1, 5):
            got = classify_style(it["video"][:, f], **_scene(it))
            assert got["errors"].shape == (12,) and got["centroids"].shape == (12, 2)
            k = STYLES.index(it["style"])
            # the own template, at the tracked place, is (nearly) the frame; every other one is far off
            own, others = float(got["errors"][k]), torch.cat([got["errors"][:k], got["errors"][k + 1 :]])
            assert own < 5e-3 and float(others.min()) > 10 * own + 0.02, (it["style"], own, float(others.min()))
            right += got["style"] == it["style"]
            total += 1
            # the tracked centroid for the right style is the object's
            assert float((got["centroids"][k] - it["centroids"][f]).abs().max()) < 0.75
    assert right == total, f"{right}/{total}"


def test_classifier_on_degraded_renders(items):
    gen = torch.Generator().manual_seed(0)
    right = total = 0
    per_style = dict.fromkeys(STYLES, 0)
    for it in items:
        v = degrade(it["video"], gen)
        for f in range(1, 5):
            got = classify_style(v[:, f], **_scene(it))["style"]
            right += got == it["style"]
            per_style[it["style"]] += got != it["style"]
            total += 1
    assert right / total >= 0.95, (right / total, per_style)


def test_plain_frames_and_other_styles_are_not_the_target(items):
    rng = np.random.default_rng(1)
    for it in items[:36]:
        # the plain first frame is no style at all (the plain rendering fits it best) ...
        got = classify_style(it["video"][:, 0], **_scene(it))
        assert got["style"] is None and got["plain_error"] < float(got["errors"].min()), it["index"]
        # ... and a frame of another style is classified as that style, not as the item's
        other = STYLES[(STYLES.index(it["style"]) + 1 + int(rng.integers(11))) % 12]
        frame = render_styled_video(it["centroids"][2:3], style=other, size=(32, 32), **_scene(it))[:, 0]
        assert classify_style(frame, **_scene(it))["style"] == other, (it["style"], other)


def test_names_and_rgb_are_the_same_object():
    kw = dict(shape="triangle", radius=5.44, gradient=torch.tensor([0.05, 4.0]))
    frame = render_styled_video([[15.4, 12.7]], style="Fairy tale", shape="triangle", radius=5.44, color="cyan",
                                background="brown", size=(32, 32), gradient=(0.05, 4.0))[:, 0]  # fmt: skip
    a = classify_style(frame, color="cyan", background="brown", **kw)
    b = classify_style(frame, color=(0.10, 0.80, 0.90), background=[0.36, 0.22, 0.10], **kw)
    assert a["style"] == b["style"] == "Fairy tale" and torch.allclose(a["errors"], b["errors"])
    # the wrong object colour makes every template wrong: the right style's error grows
    c = classify_style(frame, color="red", background="brown", **kw)
    assert float(c["errors"][STYLES.index("Fairy tale")]) > 10 * float(a["errors"][STYLES.index("Fairy tale")]) + 1e-3


def test_score_styled_video_on_perfect_and_reversed_clips():
    ds = SyntheticMotion(24, frames=9, size=(32, 32), split="eval", seed=6, styles="all")
    for it in (ds[i] for i in range(len(ds))):
        s = score_styled_video(it["video"], it, it["style"])
        assert s["style"] == s["target"] == it["style"] and s["style_ok"] is True
        assert s["frame_styles"] == [it["style"]] * 8 and s["style_fraction"] == 1.0
        assert s["direction"] == s["expected_direction"] == it["direction"] and s["direction_ok"] is True
        assert s["present_fraction"] == 1.0 and bool(s["present"].all())
        assert float((s["centroids"] - it["centroids"]).abs().max()) < 0.75
        assert s["errors"].shape == (8, 12) and s["plain_errors"].shape == (8,)
        # frames 1.. played backwards: the style stays, the motion goes the other way
        rev = torch.cat([it["video"][:, :1], it["video"][:, 1:].flip(1)], dim=1)
        r = score_styled_video(rev, it, it["style"])
        assert r["style_ok"] is True and r["direction_ok"] is False and r["direction"] == OPPOSITE[it["direction"]]
        # another target style is not met
        other = STYLES[(STYLES.index(it["style"]) + 5) % 12]
        assert score_styled_video(it["video"], it, other)["style_ok"] is False


def test_score_styled_video_plain_clip_has_no_style():
    ds = SyntheticMotion(6, frames=5, size=(32, 32), seed=8)
    for i in range(6):
        it = ds[i]
        s = score_styled_video(it["video"], it, "Oil painting")
        assert s["style"] is None and s["style_ok"] is False and s["frame_styles"] == [None] * 4
        # the track of frame 0 (against the plain background) is still right
        assert bool(s["present"][0]) and float((s["centroids"][0] - it["centroids"][0]).abs().max()) < 0.5


def test_score_styled_video_object_gone():
    it = SyntheticMotion(3, frames=5, size=(32, 32), seed=1, styles=["Lego"])[2]
    v = it["video"].clone()
    v[:, 1:] = style_background("Lego", background=it["background"], size=(32, 32), gradient=it["gradient"])[:, None]
    s = score_styled_video(v, it, "Lego")
    assert s["present"].tolist() == [True, False, False, False, False] and s["present_fraction"] == pytest.approx(0.2)
    assert s["direction"] is None and s["direction_ok"] is False
    assert s["centroids"][1:].isnan().all()


def test_classify_style_is_fast(items):
    import time

    frames = [it["video"][:, 1] for it in items[:20]]
    t0 = time.perf_counter()
    for it, f in zip(items[:20], frames):
        classify_style(f, **_scene(it))
    assert (time.perf_counter() - t0) / 20 < 0.1  # ~5 ms on one core; generous for a loaded machine


def test_errors_name_the_argument(items):
    it = items[0]
    v = it["video"]
    with pytest.raises(TypeError, match=r"score_styled_video: video must be a float torch.Tensor"):
        score_styled_video([1, 2], it, it["style"])
    with pytest.raises(ValueError, match=r"score_styled_video: video must have shape \[3, F, H, W\]"):
        score_styled_video(v[0], it, it["style"])
    with pytest.raises(ValueError, match=r"score_styled_video: video must have at least 2 frames"):
        score_styled_video(v[:, :1], it, it["style"])
    with pytest.raises(TypeError, match=r"score_styled_video: video must be a float tensor"):
        score_styled_video((v * 100).long(), it, it["style"])
    with pytest.raises(ValueError, match=r"score_styled_video: video has non-finite values"):
        score_styled_video(v * float("nan"), it, it["style"])
    with pytest.raises(ValueError, match=r"score_styled_video: style='Manga' is not allowed; allowed: Ghibli, .*Chibi"):
        score_styled_video(v, it, "Manga")
    with pytest.raises(TypeError, match=r"score_styled_video: item must be a SyntheticMotion item dict"):
        score_styled_video(v, "item", it["style"])
    bad = {k: val for k, val in it.items() if k != "radius"}
    with pytest.raises(ValueError, match=r"score_styled_video: item lacks the keys \['radius'\]"):
        score_styled_video(v, bad, it["style"])
    with pytest.raises(ValueError, match=r"score_styled_video: item: color='pink' is not a known colour name"):
        score_styled_video(v, {**it, "color": "pink"}, it["style"])
    kw = _scene(it)
    with pytest.raises(ValueError, match=r"classify_style: frame must have shape \[3, H, W\]"):
        classify_style(v, **kw)
    with pytest.raises(ValueError, match=r"classify_style: shape='star' is not allowed"):
        classify_style(v[:, 1], **{**kw, "shape": "star"})
    with pytest.raises(ValueError, match=r"classify_style: radius=-1.0 must be a finite number > 0"):
        classify_style(v[:, 1], **{**kw, "radius": -1.0})
    with pytest.raises(ValueError, match=r"classify_style: background=\(0.1, 0.2\) must be"):
        classify_style(v[:, 1], **{**kw, "background": (0.1, 0.2)})
    with pytest.raises(ValueError, match=r"classify_style: gradient=.* must be a pair of finite numbers"):
        classify_style(v[:, 1], **{**kw, "gradient": (0.1,)})


def test_plain_reference_matches_render_video():
    """The plain candidate of the classifier is render_video's rendering: a plain frame has (almost) zero error."""
    frame = render_video([[12.25, 19.5]], shape="square", radius=3.52, color=(0.85, 0.20, 0.85), background=(0.42, 0.42, 0.42),
                         size=(32, 32), gradient=(0.06, 0.3))[:, 0]  # fmt: skip
    got = classify_style(frame, shape="square", radius=3.52, color="magenta", background="gray", gradient=(0.06, 0.3))
    assert got["style"] is None and got["plain_error"] < 1e-3


def test_docstring_examples():
    res = doctest.testmod(ev, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 8 and res.failed == 0
