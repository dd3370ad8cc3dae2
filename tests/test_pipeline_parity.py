"""``Pipeline.generate`` against diffusers' ``WanPipeline``, the independent oracle (docs/real_stack.md#sampling).

A tiny random Wan2.1 stack is built with the libraries themselves (diffusers' ``WanTransformer3DModel`` and
``AutoencoderKLWan``, transformers' ``UMT5EncoderModel`` with the offline ``ByT5Tokenizer``).  ospfn's
``Pipeline`` is assembled from the very same in-memory modules (the DiT weights converted from diffusers'
names), and both pipelines start from the same initial ``latents``:

* ``generate(scheduler="unipc")`` equals ``WanPipeline`` with diffusers' flow-matching UniPC scheduler;
* ospfn's Euler, run on the sigma schedule that diffusers' ``FlowMatchEulerDiscreteScheduler`` builds (passed
  as ``sigmas=``), equals ``WanPipeline`` with that scheduler;

with classifier-free guidance on (ospfn batches both branches; diffusers runs them one after the other) and
off, for one prompt and for a list of prompts.  fp32 on the CPU; tolerance 1e-4 relative.  Each comparison
also checks that the alternatives it rules out (the other solver, the other guidance) differ by far more
than the tolerance, so a pass is not a coincidence of a model that ignores its input.
"""

import functools

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (pip install -e .[dev])")
transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[dev])")

import ospfn.model as M  # noqa: E402
from ospfn.model.checkpoint import convert_state_dict  # noqa: E402
from ospfn.model.umt5 import UMT5TextEncoder  # noqa: E402
from ospfn.model.wan_vae import WanVAE  # noqa: E402
from ospfn.pipeline import Pipeline  # noqa: E402
from ospfn.sched import inference_sigmas, sample  # noqa: E402

SHIFT = 3.0
FRAMES, H, W = 5, 32, 48  # latents [16, 2, 4, 6]: 2 x 2 x 3 tokens after the 2 x 2 patch (H != W catches a swap)
STEPS = 3
PROMPT, NEG = "a red fox runs through the snow", "blurry, static, low quality"
TOL = 1e-4
TEXT_LEN = 64  # the tokenizer's max length on both sides (512 in Wan; shorter keeps the test fast)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@functools.cache
def components():
    """(transformer, vae, text encoder, tokenizer): tiny, random, built by the libraries."""
    torch.manual_seed(0)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2,
    ).eval()  # fmt: skip
    with torch.no_grad():  # move off the library's initialisation (zero-ish heads would hide mistakes)
        for prm in transformer.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()  # fmt: skip
    text = transformers.UMT5EncoderModel(
        transformers.UMT5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    ).eval()
    return transformer, vae, text, transformers.ByT5Tokenizer()


@functools.cache
def ospfn_pipeline() -> Pipeline:
    transformer, vae, text, tok = components()
    cfg = M.DiTConfig.from_dict({k: v for k, v in transformer.config.items() if not k.startswith("_")})
    params = convert_state_dict(transformer.state_dict(), "diffusers", "wan")
    defaults = {"frames": FRAMES, "size": [H, W], "steps": STEPS, "guidance": 5.0, "shift": SHIFT, "fourier_ratio": 0.1,
                "fps": 16, "negative_prompt": NEG, "scheduler": "unipc"}  # fmt: skip
    return Pipeline(cfg=cfg, params=params, text=UMT5TextEncoder(text, tok, text_len=TEXT_LEN), vae=WanVAE(vae), vae_spec={"kind": "wan"},
                    defaults=defaults, model_type="wan")  # fmt: skip


def unipc():
    return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT)


def flow_euler():
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT)


def run_wan(scheduler, prompt, guidance, latents):
    """diffusers' own pipeline: (video [B, F, 3, H, W] in [0, 1], final latents)."""
    transformer, vae, text, tok = components()
    pipe = diffusers.WanPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def grab(p, i, t, kw):
        seen["latents"] = kw["latents"]
        return kw

    out = pipe(prompt, negative_prompt=NEG if isinstance(prompt, str) else [NEG] * len(prompt), height=H, width=W,
               num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=guidance, latents=latents, output_type="pt",
               max_sequence_length=TEXT_LEN, callback_on_step_end=grab)  # fmt: skip
    return out.frames, seen["latents"]


def as_diffusers_video(video: torch.Tensor) -> torch.Tensor:
    """ospfn's [B, 3, F, H, W] in [-1, 1] as diffusers' pt output [B, F, 3, H, W] in [0, 1]."""
    return ((video + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)


def noise(batch=1, seed=1):
    return torch.randn(batch, 16, (FRAMES - 1) // 4 + 1, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def run_ospfn(prompt, **kw):
    """(video as diffusers lays it out, final latents)."""
    states = []
    video = ospfn_pipeline().generate(prompt, negative_prompt=NEG, callback=lambda i, z: states.append(z), **kw)
    return as_diffusers_video(video if video.dim() == 5 else video[None]), states[-1]


# ------------------------------------------------------------------------------------------------ UniPC


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_unipc_equals_wanpipeline(guidance):
    lat = noise()
    want_video, want_z = run_wan(unipc(), PROMPT, guidance, lat)
    got_video, got_z = run_ospfn(PROMPT, latents=lat, scheduler="unipc", guidance=guidance)
    assert got_video.shape == want_video.shape == (1, FRAMES, 3, H, W)
    assert rel(got_z, want_z) < TOL
    assert rel(got_video, want_video) < TOL
    info = ospfn_pipeline().last_info
    assert info["scheduler"] == "unipc" and info["steps"] == STEPS and info["teacache_skipped"] == 0
    # what this rules out: Euler on ospfn's schedule, and the other guidance
    euler_z = run_ospfn(PROMPT, latents=lat, scheduler="euler", shift=SHIFT, guidance=guidance)[1]
    other_z = run_ospfn(PROMPT, latents=lat, scheduler="unipc", guidance=6.0 - guidance)[1]
    assert rel(euler_z, want_z) > 100 * TOL and rel(other_z, want_z) > 100 * TOL


def test_unipc_batch_of_prompts_equals_wanpipeline():
    prompts = [PROMPT, "a blue bird over a green lake"]
    lat = noise(2, seed=7)
    want_video, want_z = run_wan(unipc(), prompts, 5.0, lat)
    got_video, got_z = run_ospfn(prompts, latents=lat, scheduler="unipc", guidance=5.0)
    assert got_video.shape == want_video.shape == (2, FRAMES, 3, H, W)
    assert rel(got_z, want_z) < TOL and rel(got_video, want_video) < TOL
    assert rel(got_z[0], got_z[1]) > 100 * TOL  # two different videos


# ------------------------------------------------------------------------------------------------ Euler


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_euler_on_diffusers_sigmas_equals_wanpipeline(guidance):
    sched = flow_euler()
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas.clone()
    # diffusers' schedule is not ospfn's shifted linspace, so the schedule has to be passed in
    assert not torch.allclose(sigmas.double(), inference_sigmas(STEPS, SHIFT), atol=1e-3)
    lat = noise(seed=3)
    want_video, want_z = run_wan(flow_euler(), PROMPT, guidance, lat)
    got_video, got_z = run_ospfn(PROMPT, latents=lat, sigmas=sigmas, guidance=guidance)
    assert rel(got_z, want_z) < TOL
    assert rel(got_video, want_video) < TOL
    info = ospfn_pipeline().last_info
    assert info["scheduler"] == "euler" and info["steps"] == STEPS and info["sigmas"] == pytest.approx(sigmas.tolist())
    own_z = run_ospfn(PROMPT, latents=lat, scheduler="euler", shift=SHIFT, guidance=guidance)[1]
    assert rel(own_z, want_z) > 100 * TOL


# ------------------------------------------------------------------------------------------------ CFG batching


def _split_forward(calls):
    """ospfn.model.forward, but a CFG call [2B] runs as two separate passes of B."""

    def fwd(params, cfg, x, t, context, *, image=None, run=None):
        calls.append(x.shape[0])
        if x.shape[0] == 1:
            return M.forward(params, cfg, x, t, context, image=image, run=run)
        h = x.shape[0] // 2
        halves = []
        for sl in (slice(0, h), slice(h, None)):
            img = None if image is None else M.ImageCond(fourier_feats=image.fourier_feats[sl])
            halves.append(M.forward(params, cfg, x[sl], t[sl], context[sl], image=img, run=run))
        return torch.cat(halves)

    return fwd


def _counting_forward(calls):
    def fwd(params, cfg, x, t, context, *, image=None, run=None):
        calls.append(x.shape[0])
        return M.forward(params, cfg, x, t, context, image=image, run=run)

    return fwd


@pytest.mark.parametrize("scheduler", ["euler", "unipc"])
def test_cfg_batch_of_two_equals_two_passes(scheduler):
    pipe = ospfn_pipeline()
    g = torch.Generator().manual_seed(11)
    lat = torch.randn(2, 16, 2, 4, 4, generator=g)
    ctx, neg = torch.randn(2, 12, 32, generator=g), torch.randn(2, 7, 32, generator=g)  # different lengths: zero-padded
    kw = dict(noise=lat, context=ctx, neg_context=neg, guidance=4.0, steps=3, shift=SHIFT, scheduler=scheduler)
    batched_calls, split_calls = [], []
    batched = sample(pipe.params, pipe.cfg, forward_fn=_counting_forward(batched_calls), **kw)
    split = sample(pipe.params, pipe.cfg, forward_fn=_split_forward(split_calls), **kw)
    assert batched_calls == [4, 4, 4]  # one model call per step, both branches of both samples in it
    torch.testing.assert_close(batched, split, rtol=1e-5, atol=1e-5)
    assert rel(batched, lat) > 0.01


def test_flashi2v_unipc_integrates_the_unshifted_state():
    """UniPC on a FlashI2V model: the solver's state is z (unshifted), the model sees z - phi(s); written out
    here with diffusers' scheduler and separate guidance passes."""
    cfg = M.DiTConfig.preset("tiny", i2v="flashi2v", num_layers=2, num_full_blocks=0)
    g = torch.Generator().manual_seed(5)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in M.init_params(cfg).items()}
    lat, s = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 16, 1, 8, 8, generator=g)
    ctx, neg = torch.randn(1, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    got = sample(params, cfg, noise=lat, context=ctx, neg_context=neg, guidance=3.0, steps=4, shift=5.0,
                 cond_image_latent=s, fourier_ratio=0.1, scheduler="unipc")  # fmt: skip
    p = M.flashi2v_shift(params, cfg, s)
    assert p.abs().max() > 1e-3
    image = M.ImageCond(fourier_feats=M.fourier_features(s, 0.1))
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    sched.set_timesteps(4)
    z = lat.clone()
    for t in sched.timesteps:
        tt = torch.full((1,), float(t))
        vu = M.forward(params, cfg, z - p, tt, neg, image=image)
        vc = M.forward(params, cfg, z - p, tt, ctx, image=image)
        z = sched.step(vu + 3.0 * (vc - vu), t, z, return_dict=False)[0]
    torch.testing.assert_close(got, z, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ contract


def test_generate_contract_and_checks():
    pipe = ospfn_pipeline()
    lat = noise(seed=4)
    a = pipe.generate(PROMPT, latents=lat, guidance=1.0, steps=2)
    assert a.shape == (3, FRAMES, H, W) and float(a.min()) >= -1 and float(a.max()) <= 1
    assert pipe.last_info["scheduler"] == "unipc"  # the pipeline's default
    # frames / height / width come from the latents, or must agree with them
    b = pipe.generate(PROMPT, latents=lat, guidance=1.0, steps=2, frames=FRAMES, height=H, width=W, scheduler="unipc")
    assert torch.equal(a, b)
    # one set of latents [1, ...] serves a batch; a str negative prompt serves every prompt
    ab = pipe.generate([PROMPT, PROMPT], latents=lat, guidance=1.0, steps=2)
    assert ab.shape == (2, 3, FRAMES, H, W)
    torch.testing.assert_close(ab[0], a, rtol=1e-5, atol=1e-5)
    # the default negative prompt is the pipeline's
    c = pipe.generate(PROMPT, latents=lat, guidance=4.0, steps=1)
    assert torch.equal(c, pipe.generate(PROMPT, latents=lat, guidance=4.0, steps=1, negative_prompt=NEG))
    assert not torch.equal(c, pipe.generate(PROMPT, latents=lat, guidance=4.0, steps=1, negative_prompt=""))
    # the same seed gives the same video; latents replace the seed
    assert torch.equal(pipe.generate(PROMPT, seed=3, steps=1), pipe.generate(PROMPT, seed=3, steps=1))

    bad = [
        (dict(latents=lat[:, :8]), ValueError, r"latents must be \[1 or B=1, 16, T_lat, h, w\]"),
        (dict(latents=lat, frames=13), ValueError, r"latents \(1, 16, 2, 4, 6\) do not match frames=13"),
        (dict(latents=lat.double().numpy()), TypeError, r"latents must be a floating-point tensor"),
        (dict(latents=lat * float("nan")), ValueError, r"latents hold NaN or Inf"),
        (dict(scheduler="dpm"), ValueError, r"scheduler must be one of \['euler', 'unipc'\], got 'dpm'"),
        (dict(scheduler="unipc", sigmas=[1.0, 0.0]), ValueError, r"sigmas= is an explicit schedule for the Euler sampler"),
        (dict(sigmas=[1.0, 0.5, 0.0], shift=3.0), ValueError, r"shift=3\.0 does not apply to an explicit sigmas schedule"),
        (dict(sigmas=[1.0, 0.5, 0.0], steps=3), ValueError, r"steps=3 disagrees with sigmas, which has 3 values \(2 steps\)"),
        (dict(sigmas=[0.5, 1.0]), ValueError, r"sigmas must be strictly decreasing"),
        (dict(size=(32, 48), height=32), ValueError, r"as height= and width= or as size=\(H, W\), not both"),
        (dict(height=30), ValueError, r"\(height, width\) \(30, 48\) must be a multiple of \(16, 16\)"),
        (dict(width=0), ValueError, r"width must be an int in \[1, 1000000\], got 0"),
        (dict(negative_prompt=["a", "b"]), ValueError, r"negative_prompt must be a str or a list of 1 str \(one per prompt\), got 2"),
        (dict(negative_prompt=3), TypeError, r"negative_prompt must be a str, a list of str or None, got int"),
        (dict(teacache="fast"), TypeError, r"teacache must be None, a threshold"),
    ]
    for kw, err, msg in bad:
        with pytest.raises(err, match=msg):
            pipe.generate(PROMPT, **kw)
    for prompt, msg in (([], r"prompt must be a str or a non-empty list of str"), ([PROMPT, 3], r"non-empty list of str")):
        with pytest.raises(TypeError, match=msg):
            pipe.generate(prompt)
    with pytest.raises(ValueError, match=r"latents must be \[1 or B=2"):
        pipe.generate([PROMPT, PROMPT], latents=noise(3))


def test_bundled_batch_and_explicit_sigmas():
    """The bundled tiny FlashI2V pipeline: a batch of prompts shares one first frame (or takes one each), and
    an explicit schedule equal to its own gives its own video."""
    from ospfn.pipeline import load_pipeline

    pipe = load_pipeline()
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    one = pipe.generate("a red circle moving left", img, seed=2, steps=1)
    two = pipe.generate(["a red circle moving left", "a blue square moving up"], img, seed=2, steps=1)
    assert one.shape == (3, 5, 32, 32) and two.shape == (2, 3, 5, 32, 32)
    torch.testing.assert_close(two[0], one, rtol=1e-5, atol=1e-5)
    each = pipe.generate(["a red circle moving left", "a blue square moving up"], torch.stack([img, img]), seed=2, steps=1)
    torch.testing.assert_close(each, two, rtol=1e-5, atol=1e-5)
    same = pipe.generate("a red circle moving left", img, seed=2, sigmas=inference_sigmas(1, pipe.defaults["shift"]))
    assert torch.equal(same, one)
    assert pipe.last_info["scheduler"] == "euler" and pipe.last_info["steps"] == 1
    with pytest.raises(ValueError, match=r"a batch of images must be \[B=2, 3, H, W\]"):
        pipe.generate(["a", "b"], torch.stack([img, img, img]), steps=1)


# ------------------------------------------------------------------------------------------------ TeaCache


def test_teacache_option_is_wired_per_branch():
    teacache = pytest.importorskip("ospfn.sched.teacache")
    pipe = ospfn_pipeline()
    lat = noise(seed=9)
    plain = pipe.generate(PROMPT, latents=lat, guidance=4.0, steps=4)
    # threshold 0 never skips: the same video, nothing skipped
    assert torch.equal(pipe.generate(PROMPT, latents=lat, guidance=4.0, steps=4, teacache=0.0), plain)
    assert pipe.last_info["teacache_skipped"] == 0
    # a huge threshold skips every step it may: all but the first (warm-up) and the last, in each CFG branch
    always = teacache.TeaCacheConfig(threshold=1e9, warmup_steps=1, coefficients="identity")
    cached = pipe.generate(PROMPT, latents=lat, guidance=4.0, steps=4, teacache=always)
    assert pipe.last_info["teacache_skipped"] == 2 * 2
    assert pipe.last_info["teacache"]["skipped_steps"] == [[1, 2], [1, 2]]
    assert 0 < rel(cached, plain) < 0.5
    pipe.generate(PROMPT, latents=lat, guidance=1.0, steps=4, teacache=always)
    assert pipe.last_info["teacache_skipped"] == 2  # one branch without guidance


# ------------------------------------------------------------------------------------------------ text offload


class SpyEncoder(UMT5TextEncoder):
    """The UMT5 encoder, logging where it is asked to go and when it encodes."""

    def __init__(self, *args, log, **kw):
        super().__init__(*args, **kw)
        self.log = log

    def to(self, device=None, dtype=None):
        self.log.append(("to", str(device)))
        return super().to(device, dtype)

    def offload(self):
        self.log.append(("offload",))
        return super().offload()

    def release(self):
        self.log.append(("release",))
        super().release()

    def encode(self, prompts):
        self.log.append(("encode", len(prompts)))
        return super().encode(prompts)


@pytest.mark.parametrize("policy", ["cpu", "release"])
def test_text_encoder_is_offloaded_before_the_dit_runs(policy):
    """text_offload: both prompt batches are encoded, then the encoder is offloaded / released, then the DiT runs;
    the video is the one of the pipeline that keeps its encoder."""
    import copy
    import dataclasses

    base = ospfn_pipeline()
    _, _, text, tok = components()
    log = []
    spy = SpyEncoder(copy.deepcopy(text), tok, text_len=TEXT_LEN, log=log)
    pipe = dataclasses.replace(base, text=spy, text_offload=policy)
    lat = noise(seed=4)
    video = pipe.generate(PROMPT, latents=lat, steps=2, callback=lambda i, z: log.append(("step", i)))
    assert torch.equal(video, base.generate(PROMPT, latents=lat, steps=2))
    assert log == [("encode", 1), ("encode", 1), (policy if policy == "release" else "offload",), ("step", 0), ("step", 1)]
    log.clear()
    if policy == "cpu":  # the next call brings the encoder back to where it lived first
        assert torch.equal(pipe.generate(PROMPT, latents=lat, steps=2), video)
        assert log[:3] == [("to", "cpu"), ("encode", 1), ("encode", 1)] and log[3] == ("offload",)
    else:
        with pytest.raises(RuntimeError, match="released"):
            pipe.generate(PROMPT, latents=lat, steps=2)
    with pytest.raises(ValueError, match=r"text_offload must be one of \['none', 'cpu', 'release'\], got 'gpu'"):
        dataclasses.replace(base, text_offload="gpu")


# ------------------------------------------------------------------------------------------------ recipe


def test_sample_recipe_prompt_file_scheduler_and_teacache(tmp_path, capsys):
    """recipes/sample.py --prompt-file: one video per line (same seed) plus a grid; --scheduler, --teacache."""
    import importlib.util
    import json
    from pathlib import Path

    from ospfn.pipeline import BUNDLED

    spec = importlib.util.spec_from_file_location("sample_recipe", Path(__file__).resolve().parents[1] / "recipes" / "sample.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    assert recipe.grid_shape(1) == (1, 1) and recipe.grid_shape(3) == (2, 2) and recipe.grid_shape(5) == (2, 3)
    grid = recipe.tile_videos([torch.zeros(3, 2, 4, 4), torch.ones(3, 2, 4, 4), torch.full((3, 2, 4, 4), 0.5)], 2, 2)
    assert grid.shape == (3, 2, 8, 8) and float(grid[:, :, 4:, 4:].max()) == -1.0 and float(grid[:, :, :4, 4:].min()) == 1.0

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n\n  a blue square moving up \n")
    args = ["--device", "cpu", "--steps", "2", "--scale", "1", "--prompt-file", str(prompts), "--image", str(BUNDLED / "example.png"),
            "--out", str(tmp_path / "b"), "--scheduler", "unipc", "--teacache", "0.0",
            "--text-offload", "release"]  # fmt: skip  (the tiny encoder has nothing to offload: every line still encodes)
    assert recipe.main(args) == 0
    out = capsys.readouterr().out
    info = json.loads(out.splitlines()[0])
    assert info["prompt"] == ["a red circle moving left", "a blue square moving up"]
    assert info["scheduler"] == "unipc" and info["teacache"] == 0.0 and info["teacache_skipped"] == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("b_")) == [
        "b_000.mp4", "b_000_frames.png", "b_001.mp4", "b_001_frames.png", "b_grid.mp4"]  # fmt: skip
    for bad, msg in ((["--prompt", "x"], "--prompt and --prompt-file exclude each other"), ([], "holds no prompt")):
        if not bad:
            prompts.write_text("\n  \n")
        with pytest.raises(SystemExit) as e:
            recipe.main(args + bad)
        assert e.value.code == 2 and msg in capsys.readouterr().err
