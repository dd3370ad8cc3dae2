"""Bad inputs to the public API fail early and clearly; valid but unusual inputs give the ordinary result.

The table: one row per bad input -- (id, call, exception type, regex the message must match).  Every regex names
the argument / key / file and what is allowed, so a generic error from deep inside torch does not pass.  The
model, config, ops, scheduler, data, io and pipeline are covered here; checkpoints, recipes and launches have
their own tables.

Below the table: inputs that are legal but unusual -- NaN / Inf in masked attention keys, non-contiguous,
expanded (stride 0) and empty-batch tensors, uint8 images -- must give exactly what the plain input gives.
"""

import functools

import pytest
import torch
from conftest import backend_device, require

import ospfn.model as M
from ospfn.data import ClipEntry, SyntheticMotion, VideoDataset, load_index
from ospfn.data.sampling import resample_offsets
from ospfn.io import read_image, to_uint8, write_mp4, write_strip_png
from ospfn.model.vae import PixelVAE
from ospfn.ops import (
    apply_rope,
    attention,
    fourier_cutoff,
    fourier_high_freq,
    hif8_amax,
    hif8_decode,
    hif8_encode,
    hif8_fake_quant,
    hif8_linear,
    hif8_matmul,
    hif8_pack,
    hif8_quantize,
    hif8_round,
    hif8_unpack,
    rope_3d,
    rope_cos_sin,
    skiparse_fold,
    skiparse_key_mask,
    skiparse_positions,
    skiparse_switch,
    skiparse_unfold,
)
from ospfn.pipeline import Pipeline, load_pipeline
from ospfn.sched import (
    cfg_combine,
    dynamic_shift,
    euler_sample,
    euler_step,
    flow_matching_loss,
    inference_sigmas,
    sample,
    sde_step,
    shift_sigmas,
    training_sigmas,
)

NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------------------------------------ shared inputs


@functools.cache
def tiny():
    cfg = M.DiTConfig.preset("tiny")
    return cfg, M.init_params(cfg)


@functools.cache
def tiny_i2v():
    cfg = M.DiTConfig.preset("tiny", i2v="flashi2v")
    return cfg, M.init_params(cfg)


def model_inputs(B=2, T=2, H=8, W=8, L=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 16, T, H, W, generator=g), torch.tensor([700.0, 200.0][:B] + [500.0] * max(0, B - 2)), torch.randn(B, L, 32, generator=g)


def fwd(*, params=None, x=None, t=None, context=None, **kw):
    """``forward`` on the tiny T2V model with the default inputs, some replaced."""
    cfg, p = tiny()
    x0, t0, c0 = model_inputs()
    return M.forward(p if params is None else params, cfg, x0 if x is None else x, t0 if t is None else t,
                     c0 if context is None else context, **kw)  # fmt: skip


def fwd_i2v(image):
    cfg, p = tiny_i2v()
    x, t, c = model_inputs()
    return M.forward(p, cfg, x, t, c, image=image)


def with_params(**changes):
    """The tiny model's params with entries replaced (value None: removed)."""
    p = dict(tiny()[1])
    for k, v in changes.items():
        if v is None:
            del p[k]
        else:
            p[k] = v
    return p


@functools.cache
def bundled():
    return load_pipeline()


def img():
    """A valid first frame for the bundled pipeline (3 x 32 x 32 in [-1, 1])."""
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def gen(**kw):
    kw.setdefault("image", img())
    return bundled().generate("a red circle moving left", **kw)


@functools.cache
def t2v_pipeline():
    pipe = bundled()
    cfg = M.DiTConfig.preset("tiny", in_dim=pipe.vae.latent_channels, out_dim=pipe.vae.latent_channels, text_dim=pipe.text.text_dim)
    return Pipeline(cfg, M.init_params(cfg), pipe.text, pipe.vae, pipe.vae_spec, dict(pipe.defaults))


def z(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


Q = z(2, 5, 2, 8)
LATENT = z(1, 16, 1, 8, 8)
CTX = z(1, 4, 32)


def loss(**kw):
    cfg, p = tiny()
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    kw.setdefault("empty_context", CTX)
    return flow_matching_loss(p, cfg, LATENT, CTX, **kw)


def smp(**kw):
    cfg, p = tiny()
    kw.setdefault("noise", LATENT)
    kw.setdefault("context", CTX)
    return sample(p, cfg, **kw)


def garbage_file(tmp):
    path = tmp / "garbage.png"
    path.write_bytes(b"this is not a png")
    return path


# ------------------------------------------------------------------------------------------------ the table

CASES = [
    # --- forward: types, devices, sizes, the parameter dict (checked once per call, before any work)
    ("forward-x-list", lambda: fwd(x=[[0.0]]), TypeError, r"forward: x must be a torch\.Tensor of latents \[B, in_dim, T, H, W\], got list"),
    ("forward-t-list", lambda: fwd(t=[700.0, 200.0]), TypeError, r"forward: t must be a torch\.Tensor of shape \[2\] .*got list"),
    ("forward-context-list", lambda: fwd(context=[[0.0]]), TypeError, r"forward: context must be a torch\.Tensor \[2, L, text_dim=32\], got list"),
    ("forward-params-list", lambda: fwd(params=[1, 2]), TypeError, r"forward: params must be a dict of tensors .*got list"),
    ("forward-x-int", lambda: fwd(x=torch.zeros(2, 16, 2, 8, 8, dtype=torch.long)), TypeError, r"forward: x must be a floating-point tensor, got torch\.int64"),
    ("forward-missing-key", lambda: fwd(params=with_params(**{"head.head.bias": None})), ValueError,
     r"forward: params do not match cfg .*missing 1: \['head\.head\.bias'\]"),
    ("forward-misshaped-key", lambda: fwd(params=with_params(**{"blocks.3.ffn.0.weight": torch.zeros(64, 64)})), ValueError,
     r"mis-shaped 1: \['blocks\.3\.ffn\.0\.weight: got \(64, 64\), expected \(128, 64\)'\]"),
    ("forward-params-of-another-config", lambda: fwd(params=M.init_params(M.DiTConfig.preset("tiny", dim=32))), ValueError,
     r"params do not match cfg \(DiTConfig\(dim=64, .*mis-shaped \d+: \['patch_embedding\.weight: got \(32, 16, 1, 2, 2\), expected \(64, 16, 1, 2, 2\)'"),
    ("forward-param-not-tensor", lambda: fwd(params=with_params(**{"patch_embedding.bias": [0.0] * 64})), ValueError,
     r"mis-shaped 1: \['patch_embedding\.bias: got list, expected \(64,\)'\]"),
    ("forward-params-on-other-device", lambda: fwd(params={k: v.to("meta") for k, v in tiny()[1].items()}), ValueError,
     r"forward: params and inputs must be on one device: x is on cpu but \d+ parameter\(s\) are not: \['patch_embedding\.weight on meta'"),
    ("forward-t-on-other-device", lambda: fwd(t=torch.zeros(2, device="meta")), ValueError, r"forward: t must be on x's device cpu, got meta"),
    ("forward-context-on-other-device", lambda: fwd(context=torch.zeros(2, 4, 32, device="meta")), ValueError,
     r"forward: context must be on x's device cpu, got meta"),
    ("forward-empty-batch", lambda: fwd(x=torch.zeros(0, 16, 2, 8, 8), t=torch.zeros(0), context=torch.zeros(0, 4, 32)), ValueError,
     r"forward: x must have B, T, H, W >= 1 .*got shape \(0, 16, 2, 8, 8\)"),
    ("forward-zero-frames", lambda: fwd(x=torch.zeros(2, 16, 0, 8, 8)), ValueError, r"forward: x must have B, T, H, W >= 1 .*\(2, 16, 0, 8, 8\)"),
    ("forward-zero-width", lambda: fwd(x=torch.zeros(2, 16, 2, 8, 0)), ValueError, r"forward: x must have B, T, H, W >= 1 .*\(2, 16, 2, 8, 0\)"),
    ("forward-empty-context", lambda: fwd(context=torch.zeros(2, 0, 32)), ValueError,
     r"forward: context must hold at least one token \(L >= 1\), got shape \(2, 0, 32\); .*empty prompt"),
    ("forward-image-latent-list", lambda: fwd_i2v(M.ImageCond(latent=[0.0], fourier_ratio=0.1)), TypeError,
     r"forward: image\.latent must be a torch\.Tensor \[2, 16, 1, 8, 8\], got list"),
    ("forward-image-latent-wrong-size", lambda: fwd_i2v(M.ImageCond(latent=torch.zeros(2, 16, 1, 6, 8), fourier_ratio=0.1)), ValueError,
     r"forward: image\.latent must be one frame \[2, 16, 1, 8, 8\] .*got \(2, 16, 1, 6, 8\)"),
    ("forward-image-latent-other-device", lambda: fwd_i2v(M.ImageCond(latent=torch.zeros(2, 16, 1, 8, 8, device="meta"), fourier_ratio=0.1)),
     ValueError, r"forward: image\.latent must be on x's device cpu, got meta"),
    ("forward-image-apply-shift-not-bool", lambda: fwd_i2v(M.ImageCond(latent=torch.zeros(2, 16, 1, 8, 8), fourier_ratio=0.1, apply_shift="yes")),
     TypeError, r"forward: ImageCond\.apply_shift must be a bool, got str"),
    # --- DiTConfig
    ("preset-unknown-override", lambda: M.DiTConfig.preset("tiny", depth=3), ValueError,
     r"DiTConfig\.preset: unknown override key 'depth'; allowed keys: \[.*'num_layers'.*\]"),
    ("preset-unknown-name", lambda: M.DiTConfig.preset("wan3"), ValueError, r"DiTConfig\.preset: unknown preset 'wan3'; known: \[.*'tiny'.*\]"),
    ("preset-name-not-str", lambda: M.DiTConfig.preset(["tiny"]), TypeError, r"DiTConfig\.preset: name must be a str, one of \[.*'tiny'"),
    ("config-eps-nan", lambda: M.DiTConfig.preset("tiny", eps=NAN), ValueError, r"DiTConfig: eps must be a finite number > 0, got nan"),
    ("config-eps-inf", lambda: M.DiTConfig.preset("tiny", eps=INF), ValueError, r"DiTConfig: eps must be a finite number > 0, got inf"),
    ("config-eps-zero", lambda: M.DiTConfig.preset("tiny", eps=0.0), ValueError, r"DiTConfig: eps must be a finite number > 0, got 0\.0"),
    ("config-eps-bool", lambda: M.DiTConfig.preset("tiny", eps=True), ValueError, r"DiTConfig: eps must be a finite number > 0, got True"),
    ("config-rope-theta-inf", lambda: M.DiTConfig.preset("tiny", rope_theta=INF), ValueError, r"DiTConfig: rope_theta must be a finite number > 1, got inf"),
    ("config-rope-theta-nan", lambda: M.DiTConfig.preset("tiny", rope_theta=NAN), ValueError, r"DiTConfig: rope_theta must be a finite number > 1, got nan"),
    ("config-from-dict-not-dict", lambda: M.DiTConfig.from_dict([("dim", 64)]), TypeError, r"DiTConfig\.from_dict: d must be a dict .*got list"),
    # --- ops: lists where tensors belong, head dim 0, absurd Skiparse ratios (refused before allocating)
    ("attention-q-list", lambda: attention([[0.0]], Q, Q), TypeError, r"attention: q must be a torch\.Tensor, got list"),
    ("attention-key-mask-list", lambda: attention(Q, Q, Q, key_mask=[[True] * 5] * 2), TypeError, r"attention: key_mask must be a bool tensor \[batch, Sk\]"),
    ("attention-head-dim-0", lambda: attention(*(torch.zeros(2, 5, 2, 0),) * 3), ValueError,
     r"attention: the head dim \(last dim of q, k, v\) must be >= 1, got 0"),
    ("attention-scale-tensor", lambda: attention(Q, Q, Q, scale=torch.tensor(0.5)), TypeError, r"attention: scale must be a finite number > 0 or None, got Tensor"),
    ("attention-backend-list", lambda: attention(Q, Q, Q, backend=["ref"]), ValueError, r"attention: backend must be one of \('ref', .*got \['ref'\]"),
    ("attention-backend-unknown", lambda: attention(Q, Q, Q, backend="gpu"), ValueError, r"attention: backend must be one of \('ref', .*got 'gpu'"),
    ("skiparse-fold-list", lambda: skiparse_fold([[0.0]], (1, 2, 2), 2, "token"), TypeError, r"skiparse_fold: x must be a torch\.Tensor, got list"),
    ("skiparse-fold-absurd-ratio", lambda: skiparse_fold(torch.zeros(1, 5 * 5, 1), (1, 5, 5), 5, "token"), ValueError,
     r"skiparse_fold: ratio 5 would pad grid \(T, H, W\) = \(1, 5, 5\) to H x W = 25 x 25, 25\.0 times .*at most 16 times"),
    ("skiparse-key-mask-absurd-ratio", lambda: skiparse_key_mask((4, 100_000, 100_000), 100_000, "token", 1), ValueError,
     r"skiparse_key_mask: ratio 100000 would pad grid \(T, H, W\) = \(4, 100000, 100000\)"),
    ("skiparse-positions-absurd-ratio", lambda: skiparse_positions((1, 7, 9), 7, "group"), ValueError, r"skiparse_positions: ratio 7 would pad grid \(T, H, W\) = \(1, 7, 9\) to H x W = 49 x 49"),
    ("skiparse-unfold-absurd-ratio", lambda: skiparse_unfold(torch.zeros(25, 25, 1), (1, 5, 5), 5, "token"), ValueError, r"skiparse_unfold: ratio 5 would pad"),
    ("skiparse-switch-list", lambda: skiparse_switch((1, 2), (1, 2, 2), 2), TypeError, r"skiparse_switch: y must be a torch\.Tensor, got tuple"),
    ("fourier-s-list", lambda: fourier_high_freq([[[[0.0]]]], 0.1), TypeError, r"fourier_high_freq: s must be a torch\.Tensor of shape \[B, C, H, W\], got list"),
    ("fourier-ratio-list", lambda: fourier_high_freq(torch.zeros(2, 1, 4, 4), [0.1, 0.2]), TypeError, r"fourier_high_freq: ratio must be a float in \[0, 1\] or a float tensor"),
    ("fourier-ratio-nan", lambda: fourier_high_freq(torch.zeros(2, 1, 4, 4), NAN), ValueError, r"fourier_high_freq: ratio must be in \[0, 1\], got nan"),
    ("hif8-quantize-list", lambda: hif8_quantize([1.0, 2.0]), TypeError, r"hif8_quantize: x must be a torch\.Tensor, got list"),
    ("hif8-encode-list", lambda: hif8_encode([1.0]), TypeError, r"hif8_encode: x must be a torch\.Tensor, got list"),
    ("hif8-decode-list", lambda: hif8_decode([8]), TypeError, r"hif8_decode: codes must be a torch\.Tensor of dtype uint8, got list"),
    ("hif8-amax-list", lambda: hif8_amax([1.0]), TypeError, r"hif8_amax: x must be a torch\.Tensor, got list"),
    ("hif8-linear-weight-list", lambda: hif8_linear(torch.zeros(2, 3), [[0.0] * 3]), TypeError, r"hif8_linear: weight must be a torch\.Tensor, got list"),
    ("hif8-pack-list", lambda: hif8_pack([[1.0]]), TypeError, r"hif8_pack: weight must be a torch\.Tensor, got list"),
    ("hif8-matmul-x-list", lambda: hif8_matmul([[1.0]], hif8_pack(torch.ones(2, 1))), TypeError, r"hif8_matmul: x must be a torch\.Tensor, got list"),
    ("hif8-round-list", lambda: hif8_round([1.0]), TypeError, r"hif8_round: x must be a torch\.Tensor, got list"),
    ("hif8-fake-quant-list", lambda: hif8_fake_quant([1.0]), TypeError, r"hif8_fake_quant: x must be a torch\.Tensor, got list"),
    ("hif8-unpack-tensor", lambda: hif8_unpack(torch.zeros(2, 2)), TypeError, r"hif8_unpack: packed must be a HiF8Tensor \(from hif8_pack\), got Tensor"),
    ("fourier-cutoff-list", lambda: fourier_cutoff([[[[0.0]]]], 0.1), TypeError, r"fourier_cutoff: s must be a torch\.Tensor of shape \[B, C, H, W\], got list"),
    ("rope-3d-x-list", lambda: rope_3d([[0.0]], torch.zeros(2, 3, dtype=torch.long)), TypeError, r"rope_3d: x must be a float tensor \[B, S, H, D\], got list"),
    ("rope-3d-positions-list", lambda: rope_3d(torch.zeros(1, 2, 1, 8), [[0, 0, 0], [0, 0, 1]]), TypeError,
     r"rope_3d: positions must be an integer tensor \[\.\.\., S, 3\] of \(t, h, w\), got list"),
    ("rope-3d-theta-nan", lambda: rope_3d(torch.zeros(1, 2, 1, 8), torch.zeros(2, 3, dtype=torch.long), theta=NAN), ValueError,
     r"rope_3d: theta must be a finite number > 1, got nan"),
    ("rope-cos-sin-theta-zero", lambda: rope_cos_sin(torch.zeros(2, 3, dtype=torch.long), 8, theta=0.0), ValueError,
     r"rope_cos_sin: theta must be a finite number > 1, got 0\.0"),
    ("apply-rope-cos-list", lambda: apply_rope(torch.zeros(1, 2, 1, 8), [[1.0] * 4] * 2, torch.zeros(2, 4)), TypeError,
     r"apply_rope: cos must be a float tensor \[G, S, D/2\] \(from rope_cos_sin\), got list"),
    # --- scheduler: zero is not the default, non-finite and out-of-range numbers
    ("sample-steps-0", lambda: smp(steps=0), ValueError, r"sample: steps must be an int in \[1, 1000000\], got 0"),
    ("sample-steps-float", lambda: smp(steps=2.5), TypeError, r"sample: steps must be an int in \[1, 1000000\], got float"),
    ("sample-guidance-nan", lambda: smp(guidance=NAN), ValueError, r"sample: guidance \(1 = no guidance\) must be a finite number in \[0, inf\), got nan"),
    ("sample-guidance-negative", lambda: smp(guidance=-2.0), ValueError, r"sample: guidance .*must be a finite number in \[0, inf\), got -2\.0"),
    ("sample-shift-0", lambda: smp(shift=0.0), ValueError, r"sample: shift must be a finite number in \(0, inf\), got 0\.0"),
    ("sample-shift-negative", lambda: smp(shift=-3), ValueError, r"sample: shift must be a finite number in \(0, inf\), got -3"),
    ("sample-noise-list", lambda: smp(noise=[0.0]), TypeError, r"sample: noise must be a floating-point tensor \[B, C, T, H, W\], got list"),
    ("sample-sigmas-increasing", lambda: smp(sigmas=torch.tensor([0.0, 0.5, 1.0])), ValueError, r"sample: sigmas must be strictly decreasing"),
    ("sample-neg-context-batch", lambda: smp(neg_context=z(3, 4, 32)), ValueError, r"sample: neg_context must be \[B=1, L, text_dim\] .*got \(3, 4, 32\)"),
    ("inference-sigmas-0", lambda: inference_sigmas(0), ValueError, r"inference_sigmas: steps must be an int in \[1, 1000000\], got 0"),
    ("inference-sigmas-shift-nan", lambda: inference_sigmas(10, NAN), ValueError, r"inference_sigmas: shift must be a finite number > 0, got nan"),
    ("training-sigmas-negative", lambda: training_sigmas(-1), ValueError, r"training_sigmas: batch must be an int >= 0, got -1"),
    ("training-sigmas-float", lambda: training_sigmas(2.0), TypeError, r"training_sigmas: batch must be an int >= 0, got float"),
    ("training-sigmas-std-0", lambda: training_sigmas(4, std=0.0), ValueError, r"training_sigmas: std must be a finite number in \(0, inf\), got 0\.0"),
    ("shift-sigmas-bool", lambda: shift_sigmas(torch.tensor(0.5), True), ValueError, r"shift_sigmas: shift must be a finite number > 0, got True"),
    ("dynamic-shift-zero", lambda: dynamic_shift((0, 104)), ValueError, r"dynamic_shift: latent_hw must be a pair of positive ints .*got \(0, 104\)"),
    ("dynamic-shift-patch", lambda: dynamic_shift((60, 104), (2,)), ValueError, r"dynamic_shift: patch_hw must be a pair of positive ints .*got \(2,\)"),
    ("sde-step-sigma-0", lambda: sde_step(LATENT, LATENT, 0.0, 0.0), ValueError, r"sde_step: sigma must be a finite number in \(0, 1\], got 0\.0"),
    ("euler-step-list", lambda: euler_step([0.0], LATENT, 1.0, 0.5), TypeError, r"euler_step: z must be a torch\.Tensor, got list"),
    ("cfg-combine-list", lambda: cfg_combine(LATENT, [0.0], 3.0), TypeError, r"cfg_combine: v_cond must be a torch\.Tensor, got list"),
    ("euler-sample-one-sigma", lambda: euler_sample(lambda z, s, i: z, LATENT, [1.0]), ValueError, r"euler_sample: sigmas must hold at least 2 values"),
    ("loss-text-drop-above-1", lambda: loss(text_drop=1.5), ValueError, r"flow_matching_loss: text_drop must be a finite number in \[0, 1\], got 1\.5"),
    ("loss-text-drop-nan", lambda: loss(text_drop=NAN), ValueError, r"flow_matching_loss: text_drop must be a finite number in \[0, 1\], got nan"),
    ("loss-text-drop-without-empty", lambda: loss(empty_context=None, text_drop=0.1), ValueError,
     r"flow_matching_loss: text_drop > 0 \(got 0\.1\) needs empty_context"),
    ("loss-ratio-range-reversed", lambda: loss(ratio_range=(0.9, 0.1)), ValueError,
     r"flow_matching_loss: ratio_range must be a pair \(lo, hi\) with 0 <= lo <= hi <= 1, got \(0\.9, 0\.1\)"),
    ("loss-ratio-range-negative", lambda: loss(ratio_range=(-0.1, 0.5)), ValueError, r"flow_matching_loss: ratio_range\[0\] must be a finite number in \[0, 1\], got -0\.1"),
    ("loss-shift-0", lambda: loss(shift=0.0), ValueError, r"flow_matching_loss: shift \(a number, 'dynamic' or None\) must be a finite number in \(0, inf\)"),
    ("loss-generator-none", lambda: loss(generator=None), TypeError, r"flow_matching_loss: generator must be a torch\.Generator"),
    # --- data: zero samples, absurd sizes refused before allocating
    ("synthetic-num-samples-0", lambda: SyntheticMotion(0), ValueError, r"SyntheticMotion: num_samples=0 must be an int in \[1, 100000000\]"),
    ("synthetic-num-samples-absurd", lambda: SyntheticMotion(10**13), ValueError, r"SyntheticMotion: num_samples=10000000000000 must be an int in \[1, "),
    ("synthetic-size-absurd", lambda: SyntheticMotion(4, frames=9, size=(100_000, 100_000)), ValueError,
     r"SyntheticMotion: frames=9, size=\(100000, 100000\) gives items of 1080\.0 GB .*at most 8\.6 GB"),
    ("video-dataset-bucket-absurd", lambda: VideoDataset([], num_frames=49, buckets=[(480, 832), (60_000, 60_000)]), ValueError,
     r"VideoDataset: num_frames=49 with bucket \(60000, 60000\) gives items of"),
    ("resample-offsets-absurd-frames", lambda: resample_offsets(10**10, 24), ValueError,
     r"resample_offsets: num_frames=10000000000 is more than the 100000 frames a clip may have"),
    ("resample-offsets-overflowing-ratio", lambda: resample_offsets(5, 1e308, 1e-300), ValueError, r"resample_offsets: fps=1e\+308 / train_fps=1e-300 .*too large a ratio"),
    ("clip-entry-caption-str", lambda: ClipEntry("/v/a.mp4", "a cat"), ValueError, r"ClipEntry: captions must be a non-empty tuple of str, got 'a cat'"),
    ("clip-entry-fps-0", lambda: ClipEntry("/v/a.mp4", ("a cat",), fps=0.0), ValueError, r"ClipEntry: fps must be None or a positive finite number, got 0\.0"),
    ("load-index-none", lambda: load_index(None), TypeError, r"load_index: index_file must be a path \(str or os\.PathLike\), got NoneType"),
    # --- io: layouts and ranges named
    ("write-mp4-list", lambda tmp: write_mp4(tmp / "a.mp4", [[0.0]]), TypeError, r"write_mp4: video must be a torch\.Tensor \[3, F, H, W\] \(channels first, RGB\)"),
    ("write-mp4-channels-last", lambda tmp: write_mp4(tmp / "a.mp4", torch.zeros(2, 8, 8, 3)), ValueError,
     r"write_mp4: video must be \[3, F, H, W\] \(channels first, RGB\), got shape \(2, 8, 8, 3\) \(channels last\?"),
    ("write-mp4-image", lambda tmp: write_mp4(tmp / "a.mp4", torch.zeros(3, 8, 8)), ValueError, r"write_mp4: video must be \[3, F, H, W\] .*got shape \(3, 8, 8\)"),
    ("write-mp4-float-0-255", lambda tmp: write_mp4(tmp / "a.mp4", torch.full((3, 2, 8, 8), 200.0)), ValueError,
     r"write_mp4: video values must be in \[-1, 1\] for a float tensor, got min 200, max 200 \(a 0\.\.255 video or image must be torch\.uint8\)"),
    ("write-mp4-int64", lambda tmp: write_mp4(tmp / "a.mp4", torch.zeros(3, 2, 8, 8, dtype=torch.long)), TypeError,
     r"write_mp4: video must hold floats in \[-1, 1\] or uint8 in 0\.\.255, got dtype torch\.int64"),
    ("write-mp4-nan", lambda tmp: write_mp4(tmp / "a.mp4", torch.full((3, 2, 8, 8), NAN)), ValueError, r"write_mp4: video holds NaN or Inf"),
    ("write-mp4-scale-0", lambda tmp: write_mp4(tmp / "a.mp4", torch.zeros(3, 2, 8, 8), scale=0), ValueError, r"write_mp4: scale must be an int in \[1, 64\] .*got 0"),
    ("write-mp4-fps-0", lambda tmp: write_mp4(tmp / "a.mp4", torch.zeros(3, 2, 8, 8), fps=0), ValueError, r"write_mp4: fps must be an int in \[1, 240\], got 0"),
    ("write-strip-channels-last", lambda tmp: write_strip_png(tmp / "a.png", torch.zeros(2, 8, 8, 3)), ValueError,
     r"write_strip_png: video must be \[3, F, H, W\] \(channels first, RGB\), got shape \(2, 8, 8, 3\)"),
    ("write-strip-no-frames", lambda tmp: write_strip_png(tmp / "a.png", torch.zeros(3, 0, 8, 8)), ValueError, r"write_strip_png: video must have F, H, W >= 1"),
    ("write-strip-scale-float", lambda tmp: write_strip_png(tmp / "a.png", torch.zeros(3, 1, 8, 8), scale=2.0), TypeError, r"write_strip_png: scale must be an int >= 1"),
    ("to-uint8-list", lambda: to_uint8([0.0]), TypeError, r"to_uint8: video must be a torch\.Tensor of floats in \[-1, 1\] or uint8 in 0\.\.255"),
    ("read-image-missing", lambda tmp: read_image(tmp / "nope.png"), FileNotFoundError, r"read_image: image not found: .*nope\.png"),
    ("read-image-garbage", lambda tmp: read_image(garbage_file(tmp)), ValueError, r"read_image: .*garbage\.png is not an image file PIL can read"),
    ("read-image-size-zero", lambda tmp: read_image(tmp / "nope.png", size=(0, 32)), ValueError, r"read_image: size must be None or \(H, W\), a pair of positive ints, got \(0, 32\)"),
    # --- Pipeline.generate: zero is zero, the image's layout and range
    ("generate-steps-0", lambda: gen(steps=0), ValueError, r"Pipeline\.generate: steps must be an int in \[1, 1000000\], got 0"),
    ("generate-frames-0", lambda: gen(frames=0), ValueError, r"Pipeline\.generate: frames must be an int in \[1, 100000\], got 0"),
    ("generate-frames-negative", lambda: gen(frames=-3), ValueError, r"Pipeline\.generate: frames must be an int in \[1, 100000\], got -3"),
    ("generate-frames-float", lambda: gen(frames=9.0), TypeError, r"Pipeline\.generate: frames must be an int in \[1, 100000\], got float"),
    ("generate-size-zero", lambda: gen(size=(0, 0)), ValueError, r"Pipeline\.generate: size must be \(H, W\), a pair of positive ints, got \(0, 0\)"),
    ("generate-size-not-multiple", lambda: gen(size=(30, 30)), ValueError, r"Pipeline\.generate: size \(30, 30\) must be a multiple of \(4, 4\) \(VAE stride x patch\)"),
    ("generate-guidance-nan", lambda: gen(guidance=NAN), ValueError, r"Pipeline\.generate: guidance \(1 = no guidance\) must be a finite number in \[0, inf\), got nan"),
    ("generate-shift-0", lambda: gen(shift=0), ValueError, r"Pipeline\.generate: shift must be a finite number in \(0, inf\), got 0"),
    ("generate-fourier-ratio", lambda: gen(fourier_ratio=1.5), ValueError, r"Pipeline\.generate: fourier_ratio must be a finite number in \[0, 1\], got 1\.5"),
    ("generate-seed-str", lambda: gen(seed="0"), TypeError, r"Pipeline\.generate: seed must be an int, got str"),
    ("generate-prompt-none", lambda: bundled().generate(None, image=img()), TypeError, r"Pipeline\.generate: prompt must be a str, got NoneType"),
    ("generate-no-image", lambda: gen(image=None), ValueError, r"Pipeline\.generate: this is an image-to-video model; pass image=\[3, H, W\] in \[-1, 1\]"),
    ("generate-image-float-0-255", lambda: gen(image=torch.full((3, 32, 32), 128.0)), ValueError,
     r"Pipeline\.check_image: image values must be in \[-1, 1\], got min 128, max 128 \(a 0\.\.255 image must be torch\.uint8\)"),
    ("generate-image-channels-last", lambda: gen(image=torch.zeros(32, 32, 3)), ValueError,
     r"Pipeline\.check_image: image must be \[3, 32, 32\] \(channels first, RGB\) .*got \(32, 32, 3\) \(channels last\?"),
    ("generate-image-list", lambda: gen(image=[[0.0]]), TypeError, r"Pipeline\.check_image: image must be a torch\.Tensor \[3, H, W\]"),
    ("generate-image-nan", lambda: gen(image=torch.full((3, 32, 32), NAN)), ValueError, r"Pipeline\.check_image: image holds NaN or Inf"),
    ("generate-image-int64", lambda: gen(image=torch.zeros(3, 32, 32, dtype=torch.long)), TypeError,
     r"Pipeline\.check_image: image must hold floats in \[-1, 1\] or uint8 in 0\.\.255, got dtype torch\.int64"),
    ("generate-image-on-t2v", lambda: t2v_pipeline().generate("x", image=img(), steps=1), ValueError,
     r"Pipeline\.generate: image= is the first frame of an image-to-video model, but this pipeline is text-to-video"),
    ("check-image-size", lambda: bundled().check_image(img(), (32,)), ValueError, r"Pipeline\.check_image: size must be \(H, W\), a pair of positive ints, got \(32,\)"),
]


def test_the_table_is_big_and_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 45 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("call,exc,message", [pytest.param(c, e, m, id=i) for i, c, e, m in CASES])
def test_bad_input(call, exc, message, tmp_path):
    takes_tmp = call.__code__.co_argcount == 1
    with pytest.raises(exc, match=message):
        call(tmp_path) if takes_tmp else call()
    if takes_tmp:  # a refused write leaves nothing behind
        assert [p.name for p in tmp_path.iterdir() if p.name != "garbage.png"] == []


def test_forward_checks_run_before_any_work():
    """A bad call never reaches a block (the hook would see it)."""
    seen = []
    run = M.RunOptions(block_hook=lambda i, kind, x: seen.append(i))
    with pytest.raises(ValueError, match="missing 1"):
        fwd(params=with_params(**{"blocks.7.ffn.2.bias": None}), run=run)
    assert seen == []
    fwd(run=run)
    assert seen == list(range(8))


# ------------------------------------------------------------------------------------------------ masked keys

ATTN_BACKENDS = ("ref", "torch", "triton")


def _attn(backend, q, k, v, mask, do):
    """Output and gradients of attention on the backend's device."""
    dev = backend_device(backend)
    q, k, v = (t.to(dev).requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, key_mask=mask.to(dev), backend=backend)
    out.backward(do.to(dev))
    return [t.detach().cpu() for t in (out, q.grad, k.grad, v.grad)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy matmul
@pytest.mark.parametrize("fill", [NAN, INF, -INF])
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_masked_keys_never_influence_the_result(backend, fill):
    """NaN / Inf in masked K and V rows: the output and all gradients equal those with zeros there (bit for bit),
    and the masked rows get zero dK, dV -- including a batch entry with no real key at all."""
    require(backend)
    g = torch.Generator().manual_seed(3)
    B, Sq, Sk, H, D = 3, 17, 21, 2, 16  # Triton: several 16-blocks and a partial one
    q, k, v, do = (torch.randn(*s, generator=g) for s in ((B, Sq, H, D), (B, Sk, H, D), (B, Sk, H, D), (B, Sq, H, D)))
    mask = torch.rand(B, Sk, generator=g) > 0.4
    mask[:, 0] = True
    mask[1, 16:] = False  # one whole key block of entry 1 masked
    mask[2] = False  # entry 2: no key at all
    drop = ~mask[:, :, None, None]
    clean = _attn(backend, q, k.masked_fill(drop, 0), v.masked_fill(drop, 0), mask, do)
    dirty = _attn(backend, q, k.masked_fill(drop, fill), v.masked_fill(drop, fill), mask, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), dirty, clean):
        assert torch.equal(a, b), name
    assert all(bool(t.isfinite().all()) for t in dirty)
    assert bool((dirty[2][~mask] == 0).all()) and bool((dirty[3][~mask] == 0).all())
    assert bool((dirty[0][2] == 0).all())
    # and the real keys do matter: the masked result differs from attending to the zeros as keys
    unmasked = attention(q, k.masked_fill(drop, 0), v.masked_fill(drop, 0), backend="ref")
    assert (unmasked[0] - clean[0][0]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ valid but unusual


def _layouts(shape, seed=0):
    """Non-contiguous views with the values of a fresh tensor: transposed, sliced (strided last dim), expanded."""
    g = torch.Generator().manual_seed(seed)
    a, b = shape[-2], shape[-1]
    tr = torch.randn(*shape[:-2], b, a, generator=g).transpose(-1, -2)
    sl = torch.randn(*shape[:-1], 2 * b, generator=g)[..., ::2]
    ex = torch.randn(1, *shape[1:], generator=g).expand(*shape)
    return {"transposed": tr, "sliced": sl, "expanded": ex}


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_attention_any_strides_equal_contiguous(backend, masked):
    require(backend)
    dev = backend_device(backend)
    mask = None
    if masked:
        mask = torch.rand(2, 17, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[:, 0] = True
        mask = mask.t().contiguous().t().to(dev)  # a non-contiguous mask too
    for name, t in _layouts((2, 17, 2, 16)).items():
        t = t.to(dev)
        got = attention(t, t, t, key_mask=mask, backend=backend)
        want = attention(t.contiguous(), t.contiguous(), t.contiguous(), key_mask=None if mask is None else mask.contiguous(), backend=backend)
        assert torch.equal(got, want), name
    # heads strided too (a slice of a wider head axis)
    wide = torch.randn(2, 17, 4, 16, generator=torch.Generator().manual_seed(2)).to(dev)[:, :, ::2]
    assert torch.equal(attention(wide, wide, wide, key_mask=mask, backend=backend),
                       attention(wide.contiguous(), wide.contiguous(), wide.contiguous(), key_mask=mask, backend=backend))


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_attention_empty_sizes(backend):
    require(backend)
    dev = backend_device(backend)
    for qs, ks in (((0, 5, 2, 16), (0, 7, 2, 16)), ((2, 0, 2, 16), (2, 7, 2, 16)), ((2, 5, 2, 16), (2, 0, 2, 16))):
        q, k = torch.randn(qs).to(dev), torch.randn(ks).to(dev)
        for mask in (None, torch.ones(ks[0], ks[1], dtype=torch.bool, device=dev)):
            out = attention(q, k, k, key_mask=mask, backend=backend)
            assert out.shape == qs and bool((out == 0).all())  # no keys at all: zeros (Sk = 0), else empty


SKIPARSE_BACKENDS = ("ref", "triton")


@pytest.mark.parametrize("kind", ["token", "group"])
@pytest.mark.parametrize("backend", SKIPARSE_BACKENDS)
def test_skiparse_any_strides_and_empty_batch(backend, kind):
    require(backend)
    dev = backend_device(backend)
    grid = (2, 5, 7)
    for name, x in _layouts((3, 70, 8)).items():
        x = x.to(dev)
        y = skiparse_fold(x, grid, 2, kind, backend=backend)
        assert torch.equal(y, skiparse_fold(x.contiguous(), grid, 2, kind, backend=backend)), name
        yt = y.transpose(0, 1).contiguous().transpose(0, 1)  # folded data in another layout
        assert torch.equal(skiparse_unfold(yt, grid, 2, kind, backend=backend), x.contiguous()), name
        assert torch.equal(skiparse_switch(yt, grid, 2, backend=backend), skiparse_switch(y, grid, 2, backend=backend)), name
    empty = torch.zeros(0, 70, 8, device=dev)
    y = skiparse_fold(empty, grid, 2, kind, backend=backend)
    assert y.shape == (0, 32, 8) and skiparse_unfold(y, grid, 2, kind, backend=backend).shape == (0, 70, 8)


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_fourier_any_strides_and_empty_batch(backend):
    require(backend)
    dev = backend_device(backend)
    for name, s in _layouts((3, 4, 10, 12)).items():
        s = s.to(dev)
        assert torch.equal(fourier_high_freq(s, 0.3, backend=backend), fourier_high_freq(s.contiguous(), 0.3, backend=backend)), name
    assert fourier_high_freq(torch.zeros(0, 4, 10, 12, device=dev), 0.3, backend=backend).shape == (0, 4, 10, 12)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("backend", ["ref", "cpp", "triton"])
def test_hif8_quantize_any_strides_and_empty(backend, granularity):
    require(backend)
    dev = backend_device(backend)
    for name, x in _layouts((2, 3, 5, 6)).items():
        x = x.to(dev)
        got = hif8_quantize(x, granularity=granularity, backend=backend)
        assert torch.equal(got, hif8_quantize(x.contiguous(), granularity=granularity, backend=backend)), name
    for shape in ((0, 5), (4, 0)):
        assert hif8_quantize(torch.zeros(shape, device=dev), granularity=granularity, backend=backend).shape == shape


def test_forward_any_strides_equals_contiguous():
    cfg, params = tiny_i2v()
    g = torch.Generator().manual_seed(5)
    x, t, ctx = model_inputs()
    s = torch.randn(2, 16, 1, 8, 8, generator=g)

    def run(x, t, ctx, s):
        return M.forward(params, cfg, x, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.3, apply_shift=True))

    want = run(x, t, ctx, s)
    # transposed x, context and latent at once; channels-last x
    tr = run(x.transpose(3, 4).contiguous().transpose(3, 4), t, ctx.transpose(1, 2).contiguous().transpose(1, 2),
             s.transpose(3, 4).contiguous().transpose(3, 4))  # fmt: skip
    assert torch.equal(tr, want)
    assert torch.equal(run(x.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3), t, ctx, s), want)
    # expanded (stride 0 batch) x, t, context and latent
    ex = (torch.randn(1, 16, 2, 8, 8, generator=g).expand(2, -1, -1, -1, -1), torch.tensor(400.0).expand(2),
          ctx[:1].expand(2, -1, -1), s[:1].expand(2, -1, -1, -1, -1))  # fmt: skip
    assert torch.equal(run(*ex), run(*(e.contiguous() for e in ex)))


def test_forward_ignores_keys_of_other_models():
    cfg, params = tiny()
    x, t, ctx = model_inputs()
    extra = dict(params, **{"lora.blocks.0.down": torch.zeros(3), "ema_step": torch.tensor(4)})
    assert torch.equal(M.forward(extra, cfg, x, t, ctx), M.forward(params, cfg, x, t, ctx))


# ------------------------------------------------------------------------------------------------ uint8 images


def test_uint8_video_is_written_as_its_values(tmp_path):
    """A uint8 video is written as 0..255, the same file as the equivalent [-1, 1] float video; read back
    (PNG is lossless) it gives the uint8 values themselves."""
    g = torch.Generator().manual_seed(7)
    u8 = torch.randint(0, 256, (3, 2, 6, 5), generator=g, dtype=torch.uint8)
    as_float = u8.double() / 127.5 - 1  # exact inverse of the documented (v + 1) * 127.5 rounding
    write_strip_png(tmp_path / "u8.png", u8)
    write_strip_png(tmp_path / "f.png", as_float.float())
    assert (tmp_path / "u8.png").read_bytes() == (tmp_path / "f.png").read_bytes()
    from PIL import Image

    with Image.open(tmp_path / "u8.png") as im:
        back = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8).view(6, 10, 3)
    assert torch.equal(back.permute(2, 0, 1), torch.cat([u8[:, 0], u8[:, 1]], dim=-1))
    assert torch.equal(read_image(tmp_path / "u8.png")[:, :, :5], u8[:, 0].float() / 127.5 - 1)


def test_check_image_converts_uint8_exactly():
    pipe = bundled()
    u8 = torch.randint(0, 256, (3, 32, 32), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    got = pipe.check_image(u8, (32, 32))
    assert got.dtype == torch.float32 and torch.equal(got, u8.float() / 127.5 - 1)
    assert float(got.min()) >= -1 and float(got.max()) <= 1
    f = torch.rand(3, 32, 32) * 2 - 1
    assert torch.equal(pipe.check_image(f, (32, 32)), f)
    assert torch.equal(pipe.check_image(f.double(), [32, 32]), f)


def test_generate_with_a_uint8_image_equals_the_float_image():
    pipe = bundled()
    u8 = torch.randint(0, 256, (3, 32, 32), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    a = pipe.generate("a red circle moving left", image=u8, steps=1, frames=2, seed=1)
    b = pipe.generate("a red circle moving left", image=u8.float() / 127.5 - 1, steps=1, frames=2, seed=1)
    assert a.shape == (3, 2, 32, 32) and torch.equal(a, b)


def test_generate_takes_explicit_values_not_defaults():
    """A value given is used (a falsy 0 guidance included), None takes the pipeline default."""
    pipe = bundled()
    kw = dict(image=img(), steps=1, frames=1, seed=2)
    zero = pipe.generate("x", guidance=0.0, **kw)
    default = pipe.generate("x", **kw)
    assert pipe.defaults["guidance"] != 0 and not torch.equal(zero, default)
    assert torch.equal(default, pipe.generate("x", guidance=float(pipe.defaults["guidance"]), **kw))


def test_pixel_vae_decode_refuses_a_list():
    with pytest.raises(ValueError, match=r"PixelVAE\.decode: latents must be \[B, 48, T, h, w\], got list"):
        PixelVAE(4).decode([0.0])


def test_absurd_ratio_is_refused_without_allocating():
    """The padded grid of ratio 10^5 on a 10^5 x 10^5 grid would be 10^20 slots: the refusal is arithmetic only."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"ratio 100000 would pad"):
        skiparse_positions((1, 100_000, 100_000), 100_000, "token")
    assert time.perf_counter() - t0 < 1.0
