"""ospfn.data.stylize and SyntheticMotion(styles=...): the 12 I2SV rendering styles (the evaluator: test_eval_styles.py)."""

import doctest
import hashlib
import itertools
import math

import numpy as np
import pytest
import torch

from ospfn.data import stylize
from ospfn.data import synthetic as syn
from ospfn.data.stylize import render_styled_video, style_background
from ospfn.data.synthetic import SyntheticMotion
from ospfn.eval.trackers import track_object
from ospfn.styles import STYLES

# independent copies of the palettes (RGB in [0, 1]) and of the object radii at 32 x 32
OBJECT_RGB = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.15, 0.80, 0.20),
    "yellow": (0.95, 0.85, 0.10),
    "cyan": (0.10, 0.80, 0.90),
    "magenta": (0.85, 0.20, 0.85),
    "white": (0.97, 0.97, 0.97),
}
BACKGROUND_RGB = {
    "black": (0.06, 0.06, 0.06),
    "gray": (0.42, 0.42, 0.42),
    "navy": (0.08, 0.10, 0.38),
    "brown": (0.36, 0.22, 0.10),
    "purple": (0.30, 0.10, 0.35),
}
SHAPES = ("circle", "square", "triangle", "diamond")
RADII = {"small": 3.52, "large": 5.44}
SIZE = (32, 32)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------------
# the unstyled dataset is unchanged


def test_unstyled_renders_are_bit_identical_to_before_styles():
    """Hashes of videos recorded before ``render_video`` was split into shared helpers (and styles were added)."""
    ds = SyntheticMotion(60, frames=9, size=(32, 32), seed=5)
    assert _sha(torch.stack([ds[i]["video"] for i in range(60)])) == (
        "678b5afc4bd6b8576cef2396ba4c47355480257962ea1ad0fde3a7968bb4b62e"
    )
    ds = SyntheticMotion(20, frames=3, size=(16, 20), seed=1, split="eval")
    assert _sha(torch.stack([ds[i]["video"] for i in range(20)])) == (
        "53d81adab1f5ba795f8a49232366e3591fa63ac804946337ee1ce86d9d10d3d9"
    )
    v = syn.render_video([[3.3, 4.1], [10.2, 7.7]], shape="triangle", radius=3.0, color=(0.2, 0.5, 0.9),
                         background=(0.9, 0.1, 0.3), size=(17, 23), gradient=(0.5, 1.0))  # fmt: skip
    assert _sha(v) == "f5b8b30394c4878821f001f95e794b9eae6466c5161326763d106f2e5d719573"


def _reference_render(cents, shape, r, color, background, size, gradient):
    """An independent (per sub-sample, float64) re-implementation of render_video's documented rendering."""
    h, w = size
    offs = np.array([-3, -1, 1, 3]) / 8.0
    out = np.zeros((3, len(cents), h, w))
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    amp, ang = gradient
    ramp = amp * ((xx - (w - 1) / 2) * math.cos(ang) + (yy - (h - 1) / 2) * math.sin(ang)) / min(h, w)
    bg = np.clip(np.array(background)[:, None, None] + ramp, 0, 1)
    for f, (cx, cy) in enumerate(cents):
        cov = np.zeros((h, w))
        for oy in offs:
            for ox in offs:
                dx, dy = xx + ox - cx, yy + oy - cy
                if shape == "circle":
                    ins = dx**2 + dy**2 <= r * r
                elif shape == "square":
                    ins = (abs(dx) <= 0.886 * r) & (abs(dy) <= 0.886 * r)
                elif shape == "diamond":
                    ins = abs(dx) + abs(dy) <= 1.2 * r
                else:
                    ins = (dy <= 1.35 * r / 2) & (abs(dx) * math.sqrt(3) <= dy + 1.35 * r)
                cov += ins / 16.0
        out[:, f] = bg * (1 - cov) + np.array(color)[:, None, None] * cov
    return np.clip(out * 2 - 1, -1, 1)


def test_items_carry_gradient_and_radius_that_reproduce_the_video():
    ds = SyntheticMotion(12, frames=3, size=(24, 28), seed=2)
    for i in range(len(ds)):
        it = ds[i]
        assert set(it) == {"video", "caption", "direction", "shape", "color", "background", "speed", "size", "centroids",
                           "background_rgb", "index", "gradient", "radius"}  # fmt: skip
        assert it["gradient"].dtype == torch.float32 and it["gradient"].shape == (2,)
        assert 0 <= float(it["gradient"][0]) <= 0.08 and 0 <= float(it["gradient"][1]) <= 2 * math.pi
        assert isinstance(it["radius"], float) and it["radius"] == pytest.approx({"small": 0.11, "large": 0.17}[it["size"]] * 24)
        ref = _reference_render(it["centroids"].double().numpy(), it["shape"], it["radius"], OBJECT_RGB[it["color"]],
                                BACKGROUND_RGB[it["background"]], (24, 28), it["gradient"].double().tolist())  # fmt: skip
        assert np.abs(ref - it["video"].double().numpy()).max() < 1e-5, i


def test_styled_items_keep_the_plain_parameters_and_frame_0():
    plain = SyntheticMotion(40, frames=5, seed=9, split="eval")
    styled = SyntheticMotion(40, frames=5, seed=9, split="eval", styles="all")
    for i in range(40):
        a, b = plain[i], styled[i]
        assert torch.equal(a["video"][:, 0], b["video"][:, 0]), i
        for k in ("caption", "direction", "shape", "color", "background", "speed", "size", "index", "radius"):
            assert a[k] == b[k], (i, k)
        for k in ("centroids", "background_rgb", "gradient"):
            assert torch.equal(a[k], b[k]), (i, k)
        assert set(b) - set(a) == {"style", "style_id"}
        assert STYLES[b["style_id"]] == b["style"]
        # frames 1.. are the styled rendering of the same object on the same path, and differ from plain
        expect = render_styled_video(a["centroids"][1:], style=b["style"], shape=a["shape"], radius=a["radius"],
                                     color=a["color"], background=a["background"], size=(32, 32),
                                     gradient=a["gradient"].double().tolist())  # fmt: skip
        assert (expect - b["video"][:, 1:]).abs().max() < 1e-5, i
        assert float((a["video"][:, 1:] - b["video"][:, 1:]).pow(2).mean().sqrt()) > 0.15, i


def test_styled_items_are_deterministic_and_style_draws_are_uniform():
    ds = SyntheticMotion(1200, frames=2, size=(16, 16), seed=4, styles="all")
    torch.manual_seed(0)
    np.random.seed(0)
    t_state, n_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    counts = dict.fromkeys(STYLES, 0)
    for i in range(len(ds)):
        counts[ds[i]["style"]] += 1
    assert torch.equal(torch.random.get_rng_state(), t_state) and np.array_equal(np.random.get_state()[1], n_state)
    # 1200 draws from 12 styles: 100 expected each, sd ~9.6
    assert all(60 <= c <= 140 for c in counts.values()), counts
    again = SyntheticMotion(1200, frames=2, size=(16, 16), seed=4, styles="all")
    for i in (0, 7, 1199):
        x, y = ds[i], again[i]
        assert torch.equal(x["video"], y["video"]) and x["style"] == y["style"]
    # the seed changes the draws; a subset of styles draws only from it
    other = SyntheticMotion(60, frames=2, size=(16, 16), seed=5, styles="all")
    assert [other[i]["style"] for i in range(60)] != [ds[i]["style"] for i in range(60)]
    sub = SyntheticMotion(60, frames=2, size=(16, 16), seed=4, styles=["lego", "Chibi", "pixel_art"])
    got = [sub[i] for i in range(60)]
    assert {it["style"] for it in got} == {"Lego", "Chibi", "Pixel art"}
    assert all(it["style_id"] == {"Lego": 10, "Chibi": 11, "Pixel art": 5}[it["style"]] for it in got)
    one = SyntheticMotion(5, frames=2, size=(16, 16), styles=[3])
    assert {one[i]["style"] for i in range(5)} == {"Ink painting"}


def test_styles_argument_errors():
    for bad, pat in [
        ("Ghibli", r"styles='Ghibli' is not allowed; allowed: None, 'all' or .*pass \['Ghibli'\]"),
        ([], r"styles=\[\] is not allowed"),
        (["Ghibli", "Nope"], r"styles=\['Ghibli', 'Nope'\] has an unknown style 'Nope'; allowed: .*'Chibi'"),
        (["Lego", "lego"], r"names \['Lego'\] more than once"),
        (3, r"styles=3 is not allowed"),
        ([12], r"unknown style 12"),
    ]:
        with pytest.raises(ValueError, match=pat):
            SyntheticMotion(4, styles=bad)
    assert repr(SyntheticMotion(4)) == "SyntheticMotion(num_samples=4, frames=9, size=(32, 32), split='train', seed=0)"
    assert "styles=('Ghibli', '3D rendering'," in repr(SyntheticMotion(4, styles="ALL"))


def test_docstring_examples():
    for mod in (stylize, syn):
        res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert res.attempted >= 5 and res.failed == 0, mod.__name__


# ------------------------------------------------------------------------------------------------------------
# the renderer


def _configs():
    """Every shape x size x object colour x background, with two positions each (sub-pixel, off-centre) and a
    gradient: (kwargs, centroids [2, 2])."""
    rng = np.random.default_rng(0)
    for shape, size, cn, bn in itertools.product(SHAPES, RADII, OBJECT_RGB, BACKGROUND_RGB):
        cents = rng.uniform(9.0, 22.0, size=(2, 2))
        grad = (float(rng.uniform(0, 0.08)), float(rng.uniform(0, 2 * math.pi)))
        yield dict(shape=shape, radius=RADII[size], color=OBJECT_RGB[cn], background=BACKGROUND_RGB[bn], size=SIZE,
                   gradient=grad), cents  # fmt: skip


def test_styles_are_distinct_from_each_other_and_from_plain():
    """RMS difference (over a whole frame, [-1, 1] units) between any two styles' renders of the same object at the
    same place, and between each style and the plain render, over every shape / size / colour / background.

    The bar, 0.18, is 3.6 x the RMS of the evaluator's test noise (std 0.05) and holds where only the object differs
    (a small object is ~4 % of the frame): the styles differ mostly in their backgrounds (palette and gradient),
    which a blurry output keeps."""
    worst = {}
    for kw, cents in _configs():
        vids = [syn.render_video(cents, **kw)] + [render_styled_video(cents, style=s, **kw) for s in STYLES]
        v = torch.stack(vids)  # [13, 3, 2, H, W]
        d = ((v[:, None] - v[None]) ** 2).mean((2, 4, 5)).sqrt().amin(-1)  # [13, 13] min over the 2 frames
        d = d + torch.eye(13) * 9
        k = int(d.argmin())
        if float(d.flatten()[k]) < worst.get("d", 9):
            worst = {"d": float(d.flatten()[k]), "pair": (k // 13, k % 13), "kw": kw}
    names = ("plain",) + STYLES
    assert worst["d"] >= 0.18, (worst["d"], [names[i] for i in worst["pair"]], worst["kw"])


@pytest.mark.parametrize("style", STYLES)
def test_styled_objects_are_trackable_against_the_style_background(style):
    """track_object, given the style's background, finds the object in every frame, within 0.75 px."""
    rng = np.random.default_rng(STYLES.index(style))
    pairs = list(zip(OBJECT_RGB, itertools.cycle(BACKGROUND_RGB))) + [("white", "gray"), ("cyan", "navy"), ("red", "brown")]
    worst = 0.0
    for shape, size in itertools.product(SHAPES, RADII):
        for cn, bn in pairs:
            cents = rng.uniform(9.0, 22.0, size=(3, 2))
            grad = (float(rng.uniform(0, 0.08)), float(rng.uniform(0, 2 * math.pi)))
            v = render_styled_video(cents, style=style, shape=shape, radius=RADII[size], color=cn, background=bn, size=SIZE,
                                    gradient=grad)  # fmt: skip
            bg = style_background(style, background=bn, size=SIZE, gradient=grad)
            c, p = track_object(v, background=bg[:, None])
            assert p.all(), (shape, size, cn, bn)
            err = float((c.double() - torch.from_numpy(cents)).abs().max())
            assert err < 0.75, (shape, size, cn, bn, err)
            worst = max(worst, err)
    assert worst > 0  # the check ran on real errors


@pytest.mark.parametrize("style", STYLES)
def test_style_background_is_the_render_away_from_the_object(style):
    kw = dict(shape="square", radius=3.5, color="magenta", background="brown", size=(24, 32), gradient=(0.07, 2.0))
    v = render_styled_video([[5.0, 5.0]], style=style, **kw)[:, 0]
    bg = style_background(style, background="brown", size=(24, 32), gradient=(0.07, 2.0))
    assert bg.shape == (3, 24, 32) and bg.dtype == torch.float32
    assert torch.equal(v[:, 12:, :], bg[:, 12:, :]) and torch.equal(v[:, :, 14:], bg[:, :, 14:])
    assert float((v[:, 2:9, 2:9] - bg[:, 2:9, 2:9]).abs().max()) > 0.3  # and the object is there
    # deterministic, and spelled any way style_name accepts
    alias = STYLES.index(style) if style != "Lego" else "LEGO"
    assert torch.equal(render_styled_video([[5.0, 5.0]], style=alias, **kw)[:, 0], v)


def test_styles_look_as_documented():
    """A few properties of the module's table, checked on the pixels."""
    kw = dict(shape="circle", radius=5.0, color="red", background="navy", size=SIZE)
    far = (slice(None), slice(0, 4), slice(0, 32))  # the top rows, away from the object

    def render(style, cents=((16.0, 16.0),), **extra):
        return (render_styled_video(list(cents), style=style, **{**kw, **extra})[:, 0].double() + 1) / 2  # [0, 1]

    def bg(style, **extra):
        return (style_background(style, background=extra.get("background", "navy"), size=SIZE,
                                 gradient=extra.get("gradient", (0.0, 0.0))).double() + 1) / 2  # fmt: skip

    # grey scales: Gotham noir everywhere; Ink painting's object
    g = render("Gotham noir", color="yellow")
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    assert float(g[:, 16, 16].mean()) > 0.7 and float(bg("Gotham noir").mean()) < 0.15  # light object, dark scene
    ink = render("Ink painting", color="green")
    assert torch.allclose(ink[0, 14:19, 14:19], ink[1, 14:19, 14:19]) and float(ink[:, 16, 16].max()) < 0.3
    assert float(ink[far].mean()) > 0.8  # pale paper
    # Pixel art: constant on the 4 x 4 blocks of the grid; background levels on the 4-level palette
    p = render("Pixel art", cents=((13.3, 17.6),), gradient=(0.05, 1.0))
    blocks = p.reshape(3, 8, 4, 8, 4)
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    b = bg("Pixel art", gradient=(0.05, 1.0))
    assert torch.allclose(b * 3, (b * 3).round(), atol=1e-6)
    # Oil painting and Lego: textures of period 4 px (diagonal stripes, studs) over a flat base
    oil = bg("Oil painting")
    assert torch.allclose(oil[:, :, 4:], oil[:, :, :-4], atol=1e-6) and torch.allclose(oil[:, 1:, :-1], oil[:, :-1, 1:], atol=1e-6)
    assert float(oil.std()) > 0.1
    lego = bg("Lego")
    assert torch.allclose(lego[:, 4:], lego[:, :-4], atol=1e-6) and torch.allclose(lego[:, :, 4:], lego[:, :, :-4], atol=1e-6)
    assert float(lego[:, 1, 1].mean()) > float(lego[:, 0, 0].mean()) + 0.05  # a lighter stud on the light plate
    # vertical gradients: Ghibli sky blue above green; Vaporwave pink above cyan
    gh = bg("Ghibli")
    assert float(gh[2, 0].mean()) > float(gh[2, -1].mean()) + 0.2 and float(gh[1, 0].mean()) > 0.8
    vw = bg("Vaporwave")
    assert float(vw[0, 0].mean()) > 0.9 and float(vw[1, 0].mean()) < 0.7 and float(vw[0, -1].mean()) < 0.5
    # outlines: Cyberpunk's neon cyan ring, Chibi's dark ring, Disney's white ring, around a dimmer / coloured fill
    cy = render("Cyberpunk")
    assert float(cy[1, 16, 11]) > 0.8 and float(cy[2, 16, 11]) > 0.8 and float(cy[1, 16, 16]) < 0.3
    ch = render("Chibi")
    assert float(ch[:, 16, 11].max()) < 0.3 and float(ch[0, 16, 16]) > 0.9
    di = render("Disney", radius=5.4)  # the ring from 5.4 to 6.4 px covers most of pixel 10
    assert float(di[:, 16, 10].min()) > 0.7 and float(di[1, 16, 16]) < 0.1
    # 3D rendering: the top-left of the object is brighter than its bottom-right
    d3 = render("3D rendering", color="white")
    assert float(d3[:, 13, 13].mean()) > float(d3[:, 19, 19].mean()) + 0.05


def test_render_errors():
    kw = dict(shape="circle", radius=4.0, color="red", background="navy", size=SIZE)
    with pytest.raises(ValueError, match=r"render_styled_video: style='Manga' is not allowed; allowed: Ghibli, 3D rendering, .*Chibi"):
        render_styled_video([[8.0, 8.0]], style="Manga", **kw)
    with pytest.raises(ValueError, match=r"style=None is not allowed"):
        render_styled_video([[8.0, 8.0]], style=None, **kw)
    with pytest.raises(ValueError, match=r"style_background: style='x' is not allowed"):
        style_background("x", background="navy", size=SIZE)
    bad = [
        (dict(shape="star"), r"shape='star' is not allowed"),
        (dict(radius=0.0), r"radius=0.0 must be a finite number > 0"),
        (dict(color="pink"), r"color='pink' is not a known colour name"),
        (dict(color=(1.0, 0.5)), r"color=\(1.0, 0.5\) must be a colour name .* or an RGB triple"),
        (dict(background=(0.0, 0.0, 2.0)), r"background=\(0.0, 0.0, 2.0\) must be"),
        (dict(size=(32,)), r"size=\(32,\) must be a pair of ints"),
        (dict(gradient=(0.1, float("nan"))), r"gradient=.* must be a pair of finite numbers"),
    ]
    for over, pat in bad:
        with pytest.raises(ValueError, match="render_styled_video: " + pat):
            render_styled_video([[8.0, 8.0]], style="Lego", **{**kw, **over})
    with pytest.raises(ValueError, match=r"render_styled_video: centroids must be finite \(x, y\) rows of shape \[F, 2\]"):
        render_styled_video([8.0, 8.0, 1.0], style="Lego", **kw)
