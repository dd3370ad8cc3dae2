"""The offline rewards of ospfn.rl.rewards: hand-computed values on tiny constructed clips, the ground truth of the
synthetic world against deliberately degraded versions of it, batching, and the validation of every input."""

import math
import time

import pytest
import torch
import torch.nn.functional as F

from ospfn.data.synthetic import BACKGROUND_COLORS, OBJECT_COLORS, SyntheticMotion, render_video
from ospfn.rl.rewards import (
    FidelityReward,
    FunctionReward,
    MotionReward,
    Reward,
    SharpnessReward,
    check_reward_inputs,
    make_reward,
    register_reward,
    reward_registry,
)

BUILTINS = ("fidelity", "motion", "sharpness")

# ----------------------------------------------------------------------------------------------------------------
# hand-computed values: a flat background, a 4 x 4 square moving by whole pixels (every quantity exact)

BG = torch.tensor([-0.6, -0.6, -0.6])
RED = torch.tensor([0.8, -0.8, -0.6])  # ||RED - BG||^2 = 1.4^2 + 0.2^2 = 2.0
ORANGE = torch.tensor([0.8, 0.2, -0.6])  # ||ORANGE - RED||^2 = 1.0, ||ORANGE - BG||^2 = 1.96 + 0.64


def _frame(boxes, color=RED, size=32):
    """[3, H, W]: BG with each (row0, rows, col0, cols) box painted ``color``."""
    img = BG[:, None, None].expand(3, size, size).clone()
    for r0, nr, c0, nc in boxes:
        img[:, r0 : r0 + nr, c0 : c0 + nc] = color[:, None, None]
    return img


def _clip(frames):
    return torch.stack(frames, 1)[None]  # [1, 3, F, H, W]


def _square(x0, y0=14, color=RED):
    return _frame([(y0, 4, x0, 4)], color)


def test_fidelity_exact_copy_is_one_recolour_reshape_and_vanish_by_hand():
    fid = FidelityReward()
    cap = ["a red square moving right"]
    moving = _clip([_square(4), _square(7), _square(10)])  # 3 px right per frame
    assert fid(moving, cap).item() == pytest.approx(1.0, abs=1e-6)
    # frame 1 recoloured: 1 - ||ORANGE - RED||^2 / ||RED - BG||^2 = 1 - 1.0 / 2.0; frame 2 exact
    recol = _clip([_square(4), _square(7, color=ORANGE), _square(10)])
    assert fid(recol, cap).item() == pytest.approx((0.5 + 1.0) / 2, abs=1e-6)
    # frame 1 a 2 x 8 bar with the square's centre: 8 pixels missing + 8 extra of 16 -> 1 - 16 / 16 = 0
    bar = _frame([(15, 2, 5, 8)])
    assert fid(_clip([_square(4), bar, _square(10)]), cap).item() == pytest.approx(0.5, abs=1e-6)
    # frame 1 with two extra 2 x 2 blobs, point-symmetric about the square (the centroid stays): their 8 pixels
    # against the square's 16 -> 1 - 8 / 16 for that frame
    blobs = _frame([(14, 4, 7, 4), (8, 2, 3, 2), (22, 2, 13, 2)])
    assert fid(_clip([_square(4), blobs]), cap).item() == pytest.approx(0.5, abs=1e-6)
    # frame 2 empty: the error is the object's whole energy -> 0 for that frame
    gone = _clip([_square(4), _square(7), _frame([])])
    assert fid(gone, cap).item() == pytest.approx(0.5, abs=1e-6)
    # everything after frame 0 empty -> 0, and a first frame without an object -> 0
    assert fid(_clip([_square(4), _frame([]), _frame([])]), cap).item() == pytest.approx(0.0, abs=1e-6)
    assert fid(_clip([_frame([]), _square(7)]), cap).item() == 0.0
    # first_frames is the reference: a video whose own frame 0 differs is scored against the condition image
    assert fid(moving, cap, first_frames=_square(4, color=ORANGE)[None]).item() < 0.8


def test_motion_by_hand():
    mot = MotionReward()  # scale = 2 px at 32 x 32
    right = _clip([_square(4), _square(7), _square(10)])  # +6 px along, 0 across
    assert mot(right, ["a red square moving right"]).item() == pytest.approx(math.tanh(3.0), abs=1e-6)
    assert mot(right, ["a red square moving left"]).item() == pytest.approx(-math.tanh(3.0), abs=1e-6)
    assert mot(right, ["a red square moving up"]).item() == pytest.approx(-math.tanh(3.0), abs=1e-6)  # all across
    diag = _clip([_square(4, 12), _square(7, 13), _square(10, 14)])  # 6 px right, 2 px down
    assert mot(diag, ["a red square moving right"]).item() == pytest.approx(math.tanh(3.0) - math.tanh(1.0), abs=1e-6)
    assert mot(diag, ["a red square moving down"]).item() == pytest.approx(math.tanh(1.0) - math.tanh(3.0), abs=1e-6)
    still = _clip([_square(7)] * 3)
    assert mot(still, ["a red square moving right"]).item() == pytest.approx(0.0, abs=1e-6)
    # least-squares slope over the present frames: frame 1 missing does not matter for a straight track
    holed = _clip([_square(4), _frame([]), _square(10)])
    assert mot(holed, ["a red square moving right"]).item() == pytest.approx(math.tanh(3.0), abs=1e-6)
    # fewer than two frames with the object: -1
    assert mot(_clip([_square(4), _frame([]), _frame([])]), ["a red square moving right"]).item() == -1.0
    # scale_px: tanh(6 / 4)
    assert MotionReward(scale_px=4.0)(right, ["moving right"]).item() == pytest.approx(math.tanh(1.5), abs=1e-6)


def test_sharpness_by_hand():
    sh = SharpnessReward()
    cap = ["a red square moving right"]
    assert sh(_clip([_square(4), _square(7), _square(10)]), cap).item() == pytest.approx(1.0, abs=1e-6)
    half = (RED + BG) / 2  # half the contrast: a quarter of the edge energy
    assert sh(_clip([_square(4), _square(7, color=half), _square(10)]), cap).item() == pytest.approx((0.25 + 1) / 2, abs=1e-6)
    twice = _clip([_square(4, color=half), _square(7)])  # frame 1 has 4x the reference's edge energy: min(4, 1/4)
    assert sh(twice, cap).item() == pytest.approx(0.25, abs=1e-6)
    assert sh(_clip([_square(4), _frame([])]), cap).item() == pytest.approx(0.0, abs=1e-9)


def test_single_frame_videos():
    v = _clip([_square(4)])
    assert FidelityReward()(v, ["moving right"]).item() == 1.0
    assert SharpnessReward()(v, ["moving right"]).item() == 1.0
    assert MotionReward()(v, ["moving right"]).item() == -1.0


# ----------------------------------------------------------------------------------------------------------------
# the synthetic world: ground truth near the maximum; degraded clips ordered below it


def test_ground_truth_of_the_synthetic_world_scores_near_the_maximum():
    ds = SyntheticMotion(24, frames=5, size=(32, 32), split="eval", seed=1)
    items = [ds[i] for i in range(len(ds))]
    video = torch.stack([it["video"] for it in items])
    prompts = [it["caption"] for it in items]
    first = video[:, :, 0]
    fid = make_reward("fidelity")(video, prompts, first_frames=first)
    assert fid.dtype == torch.float32 and fid.shape == (24,)
    assert float(fid.min()) > 0.97, fid
    assert float(make_reward("motion")(video, prompts).min()) > 0.9
    sharp = make_reward("sharpness")(video, prompts)  # sub-pixel phase changes a small object's edge energy
    assert float(sharp.min()) > 0.7 and float(sharp.mean()) > 0.9
    # first_frames=None means the video's own frame 0
    assert torch.equal(make_reward("fidelity")(video, prompts), fid)


def _render(shape, color, bg, radius, vel=(1.7, 0.0), frames=5, start=(11.25, 15.5), grad=(0.06, 0.7)):
    cents = torch.tensor([[start[0] + vel[0] * t, start[1] + vel[1] * t] for t in range(frames)])
    return render_video(cents, shape=shape, radius=radius, color=OBJECT_COLORS[color], background=BACKGROUND_COLORS[bg],
                        size=(32, 32), gradient=grad)  # fmt: skip


def _blur(v):
    """A [1, 2, 1]^2 / 16 blur of every frame of [3, F, H, W]."""
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    x = F.pad(v.permute(1, 0, 2, 3), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(x, k.expand(3, 1, 3, 3), groups=3).permute(1, 0, 2, 3)


def _later(ref, other):
    """Frame 0 of ``ref``, the later frames of ``other``."""
    return torch.cat([ref[:, :1], other[:, 1:]], 1)


CONFIGS = [  # shape, colour, background, radius (px), the other shape, the other colour
    ("circle", "red", "navy", 5.4, "square", "green"),
    ("square", "cyan", "gray", 3.5, "circle", "magenta"),
    ("triangle", "yellow", "purple", 5.4, "diamond", "cyan"),
    ("diamond", "white", "brown", 3.5, "triangle", "red"),
    ("triangle", "green", "black", 3.5, "diamond", "yellow"),
]


@pytest.mark.parametrize("shape,color,bg,radius,other_shape,other_color", CONFIGS)
def test_degraded_clips_score_lower(shape, color, bg, radius, other_shape, other_color):
    good = _render(shape, color, bg, radius)
    clips = {
        "good": good,
        "blurred": _later(good, _blur(good)),
        "colour": _later(good, _render(shape, other_color, bg, radius)),
        "shape": _later(good, _render(other_shape, color, bg, radius)),
        "vanished": _later(good, _render(shape, color, bg, 1e-3)),  # no sub-sample inside: background only
        "reversed": _later(good, _render(shape, color, bg, radius, vel=(-1.7, 0.0))),
        "static": _later(good, _render(shape, color, bg, radius, vel=(0.0, 0.0))),
        "sideways": _render(shape, color, bg, radius, vel=(0.0, 1.7)),  # down: the same frame 0
    }
    names = list(clips)
    video = torch.stack([clips[n] for n in names])
    prompts = [f"a {color} {shape} moving right on a {bg} background"] * len(names)
    first = good[:, 0].expand(len(names), -1, -1, -1)
    fid = dict(zip(names, make_reward("fidelity")(video, prompts, first_frames=first).tolist()))
    mot = dict(zip(names, make_reward("motion")(video, prompts).tolist()))
    sharp = dict(zip(names, make_reward("sharpness")(video, prompts, first_frames=first).tolist()))
    # fidelity: the object's looks, wherever it is
    assert fid["good"] > 0.97
    for bad in ("blurred", "colour", "shape", "vanished"):
        assert fid[bad] < fid["good"] - 0.005, (bad, fid)
    assert fid["colour"] < 0.5 and fid["shape"] < 0.95 and abs(fid["vanished"]) < 0.02
    assert min(fid["reversed"], fid["static"], fid["sideways"]) > 0.97  # motion is not fidelity's business
    # motion: the caption's direction
    assert mot["good"] > 0.95 and mot["blurred"] > 0.95 and mot["colour"] > 0.9
    assert mot["reversed"] < -0.9 and mot["sideways"] < -0.9 and abs(mot["static"]) < 0.1 and mot["vanished"] == -1.0
    # sharpness: blur and vanishing
    assert sharp["good"] > 0.85
    assert sharp["blurred"] < 0.6 and sharp["vanished"] < 0.02


def test_order_of_growing_blur_and_of_fading():
    good = _render("circle", "red", "navy", 5.4)
    blurs = [good]
    for _ in range(3):
        blurs.append(_later(good, _blur(blurs[-1])))
    fades = [_later(good, good * (1 - a) + _render("circle", "red", "navy", 1e-3) * a) for a in (0.0, 0.3, 0.6, 0.9)]
    prompts = ["a red circle moving right"] * 4
    for reward in ("fidelity", "sharpness"):
        r = make_reward(reward)
        for clips in (blurs, fades):
            s = r(torch.stack(clips), prompts, first_frames=good[:, 0].expand(4, -1, -1, -1)).tolist()
            assert s == sorted(s, reverse=True) and s[0] - s[-1] > 0.01, (reward, s)


# ----------------------------------------------------------------------------------------------------------------
# batching, determinism, speed, devices


def test_batch_equals_one_by_one_and_is_deterministic():
    ds = SyntheticMotion(6, frames=5, size=(32, 32), split="eval", seed=2)
    items = [ds[i] for i in range(6)]
    g = torch.Generator().manual_seed(0)
    video = torch.stack([it["video"] for it in items])
    video = (video + 0.15 * torch.randn(video.shape, generator=g)).clamp(-1, 1)  # noisy: not all near 1
    video[4, :, 2:] = video[4, :, :1]  # a static one
    prompts = [it["caption"] for it in items]
    first = torch.stack([it["video"][:, 0] for it in items])
    for name in BUILTINS:
        r = make_reward(name)
        whole = r(video, prompts, first_frames=first)
        single = torch.cat([r(video[i : i + 1], prompts[i : i + 1], first_frames=first[i : i + 1]) for i in range(6)])
        assert torch.allclose(whole, single, atol=1e-6), name
        assert torch.equal(whole, r(video, prompts, first_frames=first)), name
        assert whole.std() > 0, name


def test_fast_enough_for_rl():
    """32 videos of 5 x 32 x 32 in well under a second of one core (CPU time: other processes do not count)."""
    ds = SyntheticMotion(32, frames=5, size=(32, 32), split="eval", seed=0)
    video = torch.stack([ds[i]["video"] for i in range(32)])
    prompts = [ds[i]["caption"] for i in range(32)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in BUILTINS:
            r = make_reward(name)
            r(video[:2], prompts[:2])
            t0 = time.process_time()
            r(video, prompts)
            assert time.process_time() - t0 < 0.6, name
    finally:
        torch.set_num_threads(threads)


def test_float64_and_half_inputs_give_float32():
    v = _clip([_square(4), _square(7)])
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        out = FidelityReward()(v.to(dt), ["moving right"])
        assert out.dtype == torch.float32 and out.item() == pytest.approx(1.0, abs=1e-2)


@pytest.mark.cuda
def test_cuda_video_gives_cuda_rewards():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    v = _clip([_square(4), _square(7)]).cuda()
    out = FidelityReward()(v, ["moving right"])
    assert out.device.type == "cuda" and out.item() == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# validation, registry, user rewards

V = _clip([_square(4), _square(7)])


@pytest.mark.parametrize(
    "video,prompts,first,err,match",
    [
        ("no", ["a"], None, TypeError, r"video must be a torch.Tensor \[B, 3, F, H, W\], got str"),
        (V[0], ["a"], None, ValueError, r"video must have shape \[B, 3, F, H, W\] \(RGB\), got \(3, 2, 32, 32\)"),
        (V[:, :2], ["a"], None, ValueError, r"video must have shape .* got \(1, 2, 2, 32, 32\)"),
        ((V * 100).to(torch.uint8), ["a"], None, TypeError, r"video must be a float tensor in \[-1, 1\], got dtype torch.uint8"),
        (V * 127.5 + 127.5, ["a"], None, ValueError, r"video has values in \[.*\]; allowed: \[-1, 1\]"),
        (V.masked_fill(V > 0.7, float("nan")), ["a"], None, ValueError, r"video contains NaN or infinite values"),
        (V[:, :, :, :4, :4], ["a"], None, ValueError, r"video frames are 4 x 4; this reward needs at least 8 x 8"),
        (V, "a moving right", None, TypeError, r"prompts must be a list of 1 str \(one per video\), got str"),
        (V, ["a", "b"], None, ValueError, r"prompts has 2 entries but video has a batch of 1"),
        (V, [3], None, TypeError, r"prompts\[0\] must be a str, got int"),
        (V, ["a"], V[:, :, 0, :16], ValueError, r"first_frames has shape \(1, 3, 16, 32\); it must be \[B, 3, H, W\] = \[1, 3, 32, 32\]"),
        (V, ["a"], V[0, :, 0], ValueError, r"first_frames must have shape \[B, 3, H, W\] \(RGB\), got \(3, 32, 32\)"),
        (V, ["a"], V[:, :, 0] * 3, ValueError, r"first_frames has values in"),
    ],
)
def test_bad_inputs_are_named(video, prompts, first, err, match):
    with pytest.raises(err, match=r"FidelityReward\('fidelity'\): " + match):
        FidelityReward()(video, prompts, first_frames=first)


def test_motion_needs_a_direction_in_every_prompt():
    with pytest.raises(ValueError, match=r"MotionReward: prompts\[1\]: caption_direction: caption 'a red square' contains no direction"):
        MotionReward()(torch.cat([V, V]), ["moving left", "a red square"])


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: FidelityReward(weight=-1.0), r"FidelityReward: weight=-1.0 must be a finite number >= 0"),
        (lambda: FidelityReward(weight=float("nan")), r"weight=nan must be a finite number >= 0"),
        (lambda: MotionReward(weight=True), r"weight=True must be a finite number >= 0"),
        (lambda: FidelityReward(threshold=0), r"FidelityReward: threshold=0 must be a finite number > 0"),
        (lambda: SharpnessReward(min_area=0), r"SharpnessReward: min_area=0 must be None .* or an int >= 1"),
        (lambda: FidelityReward(dilate=-1), r"FidelityReward: dilate=-1 must be an int in \[0, 8\]"),
        (lambda: MotionReward(scale_px=float("inf")), r"MotionReward: scale_px=inf must be a finite number > 0"),
        (lambda: MotionReward(name=""), r"MotionReward: name='' must be a non-empty str"),
        (lambda: make_reward("aesthetic"), r"make_reward: name='aesthetic' is not a known reward; known: \['fidelity', 'first_frame', 'motion', 'sharpness'"),
    ],
)
def test_bad_options_are_named(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_make_reward_and_registry():
    assert set(BUILTINS) <= set(reward_registry)
    r = make_reward("motion", weight=0.5, scale_px=3.0)
    assert isinstance(r, MotionReward) and (r.name, r.weight, r.scale_px) == ("motion", 0.5, 3.0)
    with pytest.raises(TypeError, match=r"make_reward\('fidelity'\): .*scale_px"):
        make_reward("fidelity", scale_px=3.0)
    with pytest.raises(ValueError, match=r"register_reward: name='fidelity' is already registered"):
        register_reward("fidelity", FidelityReward)
    try:
        register_reward("_test_mean", lambda weight, name: FunctionReward(lambda v, p, ff: v.mean((1, 2, 3, 4)), name=name, weight=weight))
        r = make_reward("_test_mean", weight=2.0)
        assert (r.name, r.weight) == ("_test_mean", 2.0)
        assert r(torch.zeros(3, 3, 1, 4, 4), ["a", "b", "c"]).tolist() == [0.0, 0.0, 0.0]
    finally:
        reward_registry.pop("_test_mean", None)


def test_user_rewards_are_checked_too():
    ok = FunctionReward(lambda v, p, ff: [float(len(s)) for s in p], name="length")
    out = ok(torch.zeros(2, 3, 1, 4, 4), ["ab", "abc"])
    assert out.tolist() == [2.0, 3.0] and out.dtype == torch.float32
    seen = {}

    def spy(v, p, ff):
        seen["ff"] = ff
        return torch.zeros(v.shape[0])

    FunctionReward(spy, name="spy")(V, ["a"], first_frames=V[:, :, 0])
    assert torch.equal(seen["ff"], V[:, :, 0])
    with pytest.raises(ValueError, match=r"FunctionReward\('short'\): score returned 1 values for a batch of 2 videos"):
        FunctionReward(lambda v, p, ff: torch.zeros(1), name="short")(torch.zeros(2, 3, 1, 4, 4), ["a", "b"])
    with pytest.raises(ValueError, match=r"FunctionReward\('nan'\): score returned non-finite values"):
        FunctionReward(lambda v, p, ff: torch.full((1,), float("nan")), name="nan")(V, ["a"])
    with pytest.raises(TypeError, match=r"FunctionReward: fn must be callable"):
        FunctionReward("not callable", name="x")

    class Plain(Reward):
        default_name = "plain"

    with pytest.raises(NotImplementedError, match=r"Plain.score is not implemented"):
        Plain()(V, ["a"])


def test_check_reward_inputs_returns_lists():
    v, p, ff = check_reward_inputs(V, ("a",), None)
    assert v is V and p == ["a"] and ff is None


def test_first_frame_reward_is_the_psnr_of_frame_zero():
    """PSNR of frame 0 against the condition image, in [0, 1] pixel units, written out with math here."""
    import math

    g = torch.Generator().manual_seed(0)
    first = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    video = torch.rand(3, 3, 4, 8, 8, generator=g) * 2 - 1
    video[0, :, 0] = first[0]  # exact: the cap
    video[1, :, 0] = (first[1] + 0.1).clamp(-1, 1)
    r = make_reward("first_frame", cap=50.0)(video, ["a", "b", "c"], first_frames=first)
    assert r[0] == 50.0
    for i in (1, 2):
        mse = sum(((float(a) - float(b)) / 2) ** 2 for a, b in zip(video[i, :, 0].flatten(), first[i].flatten())) / first[i].numel()
        assert float(r[i]) == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert float(r[1]) > float(r[2])  # the nearer frame 0 scores higher
    with pytest.raises(ValueError, match="first_frames is required"):
        make_reward("first_frame")(video, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"cap=0 must be a finite number > 0"):
        make_reward("first_frame", cap=0)
