"""A generation pipeline: DiT + text encoder + VAE + sampling defaults, saved as one directory.

Layout of a pipeline directory::

    config.json                          DiTConfig
    diffusion_pytorch_model.safetensors  DiT weights (Wan2.1 names)
    text_encoder.safetensors             text encoder weights (tiny encoder)
    pipeline.json                        {"text_encoder": {...}, "vae": {...}, "defaults": {...}}

The bundled tiny FlashI2V model (``ospfn/assets/tiny_flashi2v``) is one; ``recipes/train.py`` exports one.

    >>> from ospfn.pipeline import load_pipeline, BUNDLED
    >>> pipe = load_pipeline(BUNDLED)                       # doctest: +SKIP
    >>> video = pipe.generate("a red circle moving left on a blue background", image=img, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ospfn._fs import atomic_path, write_text_atomic
from ospfn.model.checkpoint import (
    CheckpointError,
    CheckpointMissingError,
    _read_json_object,
    load_checkpoint,
    load_config,
    read_safetensors,
    save_checkpoint,
)
from ospfn.model.config import DiTConfig
from ospfn.model.params import param_shapes
from ospfn.model.text import TinyTextConfig, TinyTextEncoder
from ospfn.model.vae import PixelVAE

__all__ = ["Pipeline", "load_pipeline", "save_pipeline", "BUNDLED"]

BUNDLED = Path(__file__).resolve().parent / "assets" / "tiny_flashi2v"

DEFAULTS = {"frames": 9, "size": [32, 32], "steps": 30, "guidance": 3.0, "shift": 3.0, "fourier_ratio": 0.1, "fps": 8,
            "negative_prompt": ""}  # fmt: skip


def _make_vae(spec: dict):
    """The VAE of a pipeline's ``vae`` spec: ``{"kind": "pixel", "spatial": <int in [1, 64]>}``; ``ValueError``
    naming the key for anything else."""
    if not isinstance(spec, dict):
        raise ValueError(f"pipeline: vae must be an object such as {{'kind': 'pixel', 'spatial': 2}}, got {spec!r:.80}")
    kind = spec.get("kind")
    if kind == "pixel":
        unknown = sorted(set(spec) - {"kind", "spatial"})
        if unknown:
            raise ValueError(f"pipeline: unknown key(s) {unknown} in vae; a 'pixel' vae takes 'kind' and 'spatial'")
        spatial = spec.get("spatial", 4)
        if isinstance(spatial, bool) or not isinstance(spatial, int) or not 1 <= spatial <= 64:
            raise ValueError(f"pipeline: vae.spatial must be an int in [1, 64], got {spatial!r}")
        return PixelVAE(spatial)
    raise ValueError(f"pipeline: unknown vae kind {kind!r} (supported: 'pixel'; the Wan2.1 VAE plugs in behind ospfn.model.vae.VideoVAE)")


@dataclass
class Pipeline:
    """A loaded pipeline: the DiT (``cfg``, ``params``), the text encoder, the VAE and the sampling defaults.

    ``generate`` runs on the device the DiT parameters live on (``load_pipeline(device=...)``); the noise is
    drawn on the CPU from ``seed``, so a seed gives the same video on every device (up to the device's rounding).
    """

    cfg: DiTConfig
    params: dict[str, torch.Tensor]
    text: TinyTextEncoder
    vae: PixelVAE
    vae_spec: dict
    defaults: dict = field(default_factory=lambda: dict(DEFAULTS))

    @property
    def device(self) -> torch.device:
        """The device of the DiT parameters (where ``generate`` runs)."""
        w = self.params.get("patch_embedding.weight")
        return w.device if isinstance(w, torch.Tensor) else torch.device("cpu")

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"Pipeline.encode_prompts: prompts must be a list of str, got {prompts!r:.80}")
        with torch.no_grad():
            feats, _ = self.text.encode(prompts)
        return feats

    def check_image(self, image: torch.Tensor, size) -> torch.Tensor:
        """Check a first-frame ``image`` for a video of ``size`` (H, W) and return it as float32 [3, H, W] in
        [-1, 1].

        Accepted: floats in [-1, 1] (a rounding error of 1e-3 beyond is clamped) or ``torch.uint8`` in 0..255
        (converted exactly, as ``read_image`` does).  ``TypeError`` for a non-tensor or another dtype,
        ``ValueError`` for another layout or size, NaN / Inf, or floats outside [-1, 1] (a 0..255 image must be
        uint8; one in [0, 1] must be mapped with ``2 * image - 1``).
        """
        fn = "Pipeline.check_image"
        H, W = _check_size(size, fn, "size")
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"{fn}: image must be a torch.Tensor [3, H, W] (channels first, RGB) of floats in [-1, 1] or "
                            f"uint8 in 0..255, got {type(image).__name__}")  # fmt: skip
        if tuple(image.shape) != (3, H, W):
            hint = " (channels last? pass image.permute(2, 0, 1))" if image.dim() == 3 and image.shape[-1] == 3 else ""
            raise ValueError(f"{fn}: image must be [3, {H}, {W}] (channels first, RGB) to match the requested size, "
                             f"got {tuple(image.shape)}{hint}")  # fmt: skip
        img = image.detach()
        if img.dtype == torch.uint8:
            return img.float() / 127.5 - 1  # exactly read_image's mapping
        if not img.dtype.is_floating_point:
            raise TypeError(f"{fn}: image must hold floats in [-1, 1] or uint8 in 0..255, got dtype {img.dtype}")
        img = img.float()
        if not bool(torch.isfinite(img).all()):
            raise ValueError(f"{fn}: image holds NaN or Inf; expected floats in [-1, 1]")
        lo, hi = (float(a) for a in torch.aminmax(img))
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"{fn}: image values must be in [-1, 1], got min {lo:g}, max {hi:g} (a 0..255 image must be "
                             "torch.uint8)")  # fmt: skip
        return img.clamp(-1, 1)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        *,
        image: Optional[torch.Tensor] = None,
        negative_prompt: Optional[str] = None,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        shift: Optional[float] = None,
        seed: int = 0,
        frames: Optional[int] = None,
        size: Optional[tuple[int, int]] = None,
        fourier_ratio: Optional[float] = None,
        callback: Optional[Callable[[int, torch.Tensor], None]] = None,
    ) -> torch.Tensor:
        """A video [3, F, H, W] in [-1, 1], on the pipeline's device.

        ``image`` [3, H, W] is the first frame (image-to-video models only: a text-to-video pipeline refuses
        it), floats in [-1, 1] or uint8 in 0..255 (see ``check_image``).  ``None`` for ``steps``,
        ``guidance``, ``shift``, ``frames``, ``size``, ``fourier_ratio`` or ``negative_prompt`` takes the
        pipeline's default; any value given is used as given, 0 included, and checked before any work:
        ``steps`` and ``frames`` ints >= 1 (``frames - 1`` a multiple of the VAE time stride), ``size``
        (H, W) multiples of the VAE stride x patch, ``guidance`` finite and >= 0, ``shift`` finite and > 0,
        ``fourier_ratio`` in [0, 1], ``seed`` an int.

        The noise comes from a CPU generator seeded with ``seed``: the same seed gives the same video.
        """
        from ospfn.sched import sample
        from ospfn.sched.flow import MAX_STEPS, check_number

        fn = "Pipeline.generate"
        d = self.defaults

        def pick(value, name):
            return (d[name], f"the pipeline default {name}") if value is None else (value, name)

        if not isinstance(prompt, str):
            raise TypeError(f"{fn}: prompt must be a str, got {type(prompt).__name__}")
        neg, neg_name = pick(negative_prompt, "negative_prompt")
        if not isinstance(neg, str):
            raise TypeError(f"{fn}: {neg_name} must be a str or None, got {type(neg).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{fn}: seed must be an int, got {type(seed).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"{fn}: callback must be callable as callback(i, z) or None, got {type(callback).__name__}")
        frames_v, frames_name = pick(frames, "frames")
        frames_v = _check_int(frames_v, fn, frames_name, 1, 100_000)
        steps_v, steps_name = pick(steps, "steps")
        steps_v = _check_int(steps_v, fn, steps_name, 1, MAX_STEPS)
        size_v, size_name = pick(size, "size")
        H, W = _check_size(size_v, fn, size_name)
        g_v, g_name = pick(guidance, "guidance")
        g_v = check_number(g_v, fn, f"{g_name} (1 = no guidance)", lo=0)
        sh_v, sh_name = pick(shift, "shift")
        sh_v = check_number(sh_v, fn, sh_name, lo=0, lo_open=True)
        fr_v, fr_name = pick(fourier_ratio, "fourier_ratio")
        fr_v = check_number(fr_v, fn, fr_name, lo=0, hi=1)
        st, sh, sw = self.vae.stride
        mh, mw = sh * self.cfg.patch_size[1], sw * self.cfg.patch_size[2]
        if H % mh or W % mw:
            raise ValueError(f"{fn}: {size_name} {(H, W)} must be a multiple of ({mh}, {mw}) (VAE stride x patch)")
        pt = self.cfg.patch_size[0]
        if (frames_v - 1) % st or ((frames_v - 1) // st + 1) % pt:
            raise ValueError(f"{fn}: {frames_name}={frames_v} must be 1 + a multiple of the VAE time stride {st}, giving a "
                             f"multiple of the temporal patch {pt} latent frames")  # fmt: skip
        cond_image = None
        if self.cfg.i2v == "flashi2v":
            if image is None:
                raise ValueError(f"{fn}: this is an image-to-video model; pass image=[3, H, W] in [-1, 1] (or uint8 0..255)")
            cond_image = self.check_image(image, (H, W))
        elif image is not None:
            raise ValueError(f"{fn}: image= is the first frame of an image-to-video model, but this pipeline is "
                             f"text-to-video (cfg.i2v = {self.cfg.i2v!r}); drop it")  # fmt: skip

        dev = self.device
        t_lat = (frames_v - 1) // st + 1
        shape = (1, self.vae.latent_channels, t_lat, H // sh, W // sw)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dev)
        ctx = self.encode_prompts([prompt]).to(dev)
        neg_ctx = self.encode_prompts([neg]).to(dev)
        cond = None if cond_image is None else self.vae.encode(cond_image[None, :, None]).to(dev)
        z = sample(
            self.params, self.cfg, noise=noise, context=ctx, neg_context=neg_ctx, guidance=g_v, steps=steps_v, shift=sh_v,
            cond_image_latent=cond, fourier_ratio=fr_v, callback=callback,
        )  # fmt: skip
        return self.vae.decode(z)[0].clamp(-1, 1)


def _check_int(v, fn: str, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{fn}: {name} must be an int in [{lo}, {hi}], got {type(v).__name__} {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{fn}: {name} must be an int in [{lo}, {hi}], got {v}")
    return v


def _check_size(size, fn: str, name: str) -> tuple[int, int]:
    ok = isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size)
    if not ok:
        raise ValueError(f"{fn}: {name} must be (H, W), a pair of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _pipeline_defaults(d, where: str, err=ValueError) -> dict:
    """``DEFAULTS`` updated with ``d``, every value checked (the types and ranges ``Pipeline.generate`` accepts)."""
    if not isinstance(d, dict):
        raise err(f"{where}: defaults must be an object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(DEFAULTS))
    if unknown:
        raise err(f"{where}: unknown key(s) {unknown} in defaults; allowed: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **d}

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    checks = {
        "frames": (lambda v: is_int(v) and 1 <= v <= 100_000, "an int in [1, 100000]"),
        "size": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(is_int(n) and n >= 1 for n in v), "[H, W], positive ints"),
        "steps": (lambda v: is_int(v) and 1 <= v <= 1_000_000, "an int in [1, 1000000]"),
        "guidance": (lambda v: is_num(v) and v >= 0, "a finite number >= 0"),
        "shift": (lambda v: is_num(v) and v > 0, "a finite number > 0"),
        "fourier_ratio": (lambda v: is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "fps": (lambda v: is_int(v) and 1 <= v <= 1000, "an int in [1, 1000]"),
        "negative_prompt": (lambda v: isinstance(v, str), "a str"),
    }  # fmt: skip
    for k, (ok, allowed) in checks.items():
        if not ok(out[k]):
            raise err(f"{where}: defaults.{k} must be {allowed}, got {out[k]!r:.80}")
    return out


def _check_text_weights(w: dict, tcfg: TinyTextConfig, where: str, err=ValueError) -> None:
    """The tiny text encoder's weights must be exactly the tensors ``tcfg`` describes (names and shapes, those
    of ``init_tiny_text_params``; computed here without allocating them)."""
    D = tcfg.text_dim
    want = {"tok_emb": (tcfg.vocab, D), "pos_emb": (tcfg.text_len, D), "qkv.weight": (3 * D, D), "qkv.bias": (3 * D,),
            "proj.weight": (D, D), "proj.bias": (D,), "mlp.0.weight": (2 * D, D), "mlp.0.bias": (2 * D,),
            "mlp.2.weight": (D, 2 * D), "mlp.2.bias": (D,),
            **{f"{n}.{wb}": (D,) for n in ("ln1", "ln2") for wb in ("weight", "bias")}}  # fmt: skip
    missing = sorted(set(want) - set(w))
    unexpected = sorted(set(w) - set(want))
    misshaped = [f"{k}: {tuple(w[k].shape)} vs {want[k]}" for k in sorted(set(w) & set(want)) if tuple(w[k].shape) != want[k]]
    if missing or unexpected or misshaped:
        parts = [f"{n} {len(v)}: {v[:10]}" for n, v in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if v]
        raise err(f"{where}: text encoder weights do not match the text_encoder config {tcfg}: " + "; ".join(parts))


def load_pipeline(path=BUNDLED, *, dtype: Optional[torch.dtype] = None, device="cpu") -> Pipeline:
    """Load a pipeline directory (default: the bundled tiny FlashI2V model).

    Everything cheap is checked before any weights are read: ``pipeline.json`` (a JSON object with
    ``text_encoder`` and ``vae``, optionally ``defaults`` and ``info``; known kinds; every default of the type
    and range ``generate`` accepts), ``config.json``, that the text encoder, VAE and DiT configs agree, and that
    the weight files exist and are well-formed.  Anything wrong raises ``CheckpointError`` naming the file
    (``CheckpointMissingError``, also a ``FileNotFoundError``, for a missing one); a ``path`` without
    ``pipeline.json`` raises ``FileNotFoundError``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_pipeline: path must be a str or os.PathLike, got {type(path).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"load_pipeline: dtype must be a floating torch.dtype or None, got {dtype!r}")
    path = Path(path)
    meta_file = path / "pipeline.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"load_pipeline: {path} is not a pipeline directory (no pipeline.json)")
    meta = _read_json_object(meta_file, "pipeline.json")
    unknown = set(meta) - {"text_encoder", "vae", "defaults", "info"}
    if unknown:
        raise CheckpointError(f"load_pipeline: unknown key(s) {sorted(unknown)} in {meta_file}; allowed: defaults, info, text_encoder, vae")
    absent = [k for k in ("text_encoder", "vae") if k not in meta]
    if absent:
        raise CheckpointError(f"load_pipeline: {meta_file} lacks {absent} (a pipeline.json has text_encoder, vae, defaults, info)")
    te = meta["text_encoder"]
    if not isinstance(te, dict):
        raise CheckpointError(f"load_pipeline: {meta_file}: text_encoder must be an object such as {{'kind': 'tiny', ...}}, got {type(te).__name__}")
    if te.get("kind") != "tiny":
        raise CheckpointError(f"load_pipeline: unknown text_encoder kind {te.get('kind')!r:.80} in {meta_file} (supported: 'tiny')")
    try:
        tcfg = TinyTextConfig(**{k: v for k, v in te.items() if k != "kind"})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"load_pipeline: {meta_file}: text_encoder: {e}") from None
    try:
        vae = _make_vae(meta["vae"])
    except ValueError as e:
        raise CheckpointError(f"load_pipeline: {meta_file}: {e}") from None
    defaults = _pipeline_defaults(meta.get("defaults", {}), f"load_pipeline: {meta_file}", CheckpointError)
    if not isinstance(meta.get("info", {}), dict):
        raise CheckpointError(f"load_pipeline: {meta_file}: info must be an object, got {type(meta['info']).__name__}")
    absent = [n for n in ("config.json", "diffusion_pytorch_model.safetensors", "text_encoder.safetensors") if not (path / n).is_file()]
    if absent:
        raise CheckpointMissingError(f"load_pipeline: {path} lacks {absent}: an incomplete pipeline directory")
    cfg = load_config(path / "config.json")
    if cfg.text_dim != tcfg.text_dim:
        raise CheckpointError(f"load_pipeline: the text encoder in {meta_file} gives text_dim {tcfg.text_dim}, "
                              f"{path / 'config.json'} expects {cfg.text_dim}")  # fmt: skip
    if (cfg.in_dim, cfg.out_dim) != (vae.latent_channels, vae.latent_channels):
        raise CheckpointError(f"load_pipeline: the vae in {meta_file} has {vae.latent_channels} latent channels, "
                              f"{path / 'config.json'} has in_dim {cfg.in_dim}, out_dim {cfg.out_dim}")  # fmt: skip
    text_file = path / "text_encoder.safetensors"
    text_w = read_safetensors(text_file)
    _check_text_weights(text_w, tcfg, f"load_pipeline: {text_file}", CheckpointError)
    params = load_checkpoint(path / "diffusion_pytorch_model.safetensors", cfg, dtype=dtype, device=device)
    text = TinyTextEncoder({k: v.to(device) for k, v in text_w.items()}, tcfg)
    return Pipeline(cfg, params, text, vae, meta["vae"], defaults)


def save_pipeline(path, *, cfg: DiTConfig, params: dict, text_params: dict, text_cfg: TinyTextConfig, vae: dict,
                  defaults: Optional[dict] = None, info: Optional[dict] = None) -> Path:  # fmt: skip
    """Write a pipeline directory (every file atomically, with the permissions of ``open(path, "w")``).

    Everything is checked before anything is written, so that what is written loads with ``load_pipeline``:
    the configs' types, ``params`` against ``cfg`` (names and shapes), ``text_params`` against ``text_cfg``,
    the ``vae`` spec and ``defaults`` (``ValueError`` / ``TypeError`` naming the argument).
    """
    from safetensors.torch import save_file

    fn = "save_pipeline"
    if not isinstance(cfg, DiTConfig):
        raise TypeError(f"{fn}: cfg must be a DiTConfig, got {type(cfg).__name__}")
    if not isinstance(text_cfg, TinyTextConfig):
        raise TypeError(f"{fn}: text_cfg must be a TinyTextConfig, got {type(text_cfg).__name__}")
    for name, d in (("params", params), ("text_params", text_params)):
        if not isinstance(d, dict) or not all(isinstance(v, torch.Tensor) for v in d.values()):
            raise TypeError(f"{fn}: {name} must be a dict of tensors, got {type(d).__name__}")
    if info is not None and not isinstance(info, dict):
        raise TypeError(f"{fn}: info must be a dict or None, got {type(info).__name__}")
    vae_model = _make_vae(vae)
    full_defaults = _pipeline_defaults({} if defaults is None else defaults, fn)
    want = param_shapes(cfg)
    missing = sorted(set(want) - set(params))
    bad = sorted(set(params) - set(want)) + [f"{k}: {tuple(params[k].shape)} vs {want[k]}" for k in sorted(set(params) & set(want))
                                            if tuple(params[k].shape) != want[k]]  # fmt: skip
    if missing or bad:
        raise ValueError(f"{fn}: params do not match cfg: missing {missing[:10]}, unexpected or mis-shaped {bad[:10]}")
    _check_text_weights(text_params, text_cfg, f"{fn}: text_params", ValueError)
    if cfg.text_dim != text_cfg.text_dim:
        raise ValueError(f"{fn}: text_cfg.text_dim {text_cfg.text_dim} must equal cfg.text_dim {cfg.text_dim}")
    if (cfg.in_dim, cfg.out_dim) != (vae_model.latent_channels, vae_model.latent_channels):
        raise ValueError(f"{fn}: the vae {vae} has {vae_model.latent_channels} latent channels; cfg has in_dim {cfg.in_dim}, out_dim {cfg.out_dim}")

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(params, path / "diffusion_pytorch_model.safetensors")
    with atomic_path(path / "text_encoder.safetensors") as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in text_params.items()}, tmp)
    meta = {"text_encoder": {"kind": "tiny", **{k: getattr(text_cfg, k) for k in ("text_dim", "text_len", "vocab", "heads")}},
            "vae": vae, "defaults": full_defaults, "info": info or {}}  # fmt: skip
    for name, obj in (("config.json", cfg.to_dict()), ("pipeline.json", meta)):
        write_text_atomic(path / name, json.dumps(obj, indent=2) + "\n")
    return path
