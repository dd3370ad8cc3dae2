"""A generation pipeline: DiT + text encoder + VAE + sampling defaults, saved as one directory.

Layout of a pipeline directory::

    config.json                          DiTConfig
    diffusion_pytorch_model.safetensors  DiT weights (Wan2.1 names)
    text_encoder.safetensors             text encoder weights (tiny encoder)
    pipeline.json                        {"text_encoder": {...}, "vae": {...}, "defaults": {...}}

The bundled tiny FlashI2V model (``ospfn/assets/tiny_flashi2v``) is one; ``recipes/train.py`` exports one.
``load_pipeline`` also reads the layouts users download: diffusers Wan pipelines (``model_index.json``) and Wan
original directories, with an optional replacement DiT (OSP-Next, FlashI2V) and model type on top
(docs/real_stack.md#pipelines).

Model type ``"uniworld"`` (Uniworld-OSP2.0, docs/i2sv.md#vlm-conditioning-uniworld-osp20): a FlashI2V DiT whose
context is a trained adapter over a frozen Qwen2.5-VL's features of (first frame, prompt) -- ``load_pipeline(<a
uniworld export>)`` or ``load_pipeline(<FlashI2V dir>, model_type="uniworld", vlm=<Qwen2.5-VL dir>,
adapter=<adapter file>)``; ``save_vlm_adapter`` / ``load_vlm_adapter`` write and read the adapter file.

    >>> from ospfn.pipeline import load_pipeline, BUNDLED
    >>> pipe = load_pipeline(BUNDLED)                       # doctest: +SKIP
    >>> video = pipe.generate("a red circle moving left on a blue background", image=img, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ospfn._fs import atomic_path, write_text_atomic
from ospfn.model.checkpoint import (
    CheckpointError,
    CheckpointMissingError,
    _read_json_object,
    checkpoint_shapes,
    load_checkpoint,
    load_config,
    read_safetensors,
    save_checkpoint,
)
from ospfn.model.config import DiTConfig
from ospfn.model.params import param_shapes
from ospfn.model.text import TextEncoder, TinyTextConfig, TinyTextEncoder
from ospfn.model.vae import PixelVAE, VideoVAE
from ospfn.styles import STYLES, style_name, style_prompt

__all__ = ["Pipeline", "load_pipeline", "load_i2v_checkpoint", "save_pipeline", "detect_layout", "BUNDLED", "BUNDLED_I2SV", "WAN_NEGATIVE_PROMPT", "LAYOUTS",
           "save_vlm_adapter", "read_vlm_adapter", "load_vlm_adapter"]

BUNDLED = Path(__file__).resolve().parent / "assets" / "tiny_flashi2v"
# the bundled model fine-tuned for image-to-stylised-video in the 12 styles (docs/i2sv.md; recipes/sample.py --style)
BUNDLED_I2SV = Path(__file__).resolve().parent / "assets" / "tiny_flashi2v_i2sv"

DEFAULTS = {"frames": 9, "size": [32, 32], "steps": 30, "guidance": 3.0, "shift": 3.0, "fourier_ratio": 0.1, "fps": 8,
            "negative_prompt": "", "scheduler": "euler", "teacache": None}  # fmt: skip
SCHEDULERS = ("euler", "unipc")


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


# Pipeline.model_type: ospfn's own tiny models, then the families; "uniworld" = FlashI2V + a VLM through an adapter
MODEL_TYPES = ("ospfn", "wan", "osp-next", "flashi2v", "uniworld")


@dataclass
class Pipeline:
    """A loaded pipeline: the DiT (``cfg``, ``params``), the text encoder, the VAE and the sampling defaults.

    ``text`` is any ``TextEncoder`` (the tiny bundled one or ``ospfn.model.umt5.UMT5TextEncoder``), ``vae`` any
    ``VideoVAE`` (``PixelVAE`` or ``ospfn.model.wan_vae.WanVAE``); ``vae_spec`` describes the VAE (``{"kind":
    "pixel", ...}``, ``{"kind": "wan"}``).  ``model_type`` names the model family (``"wan"``, ``"osp-next"``,
    ``"flashi2v"`` or ``"ospfn"`` for ospfn's own tiny models) and ``info`` holds what the loader recorded.
    ``text_offload`` (``"none"``, ``"cpu"``, ``"release"``): what ``generate`` does with an encoder that can be
    offloaded (UMT5, a uniworld pipeline's VLM) once the prompts are encoded, before the DiT runs (see ``load_pipeline``).
    ``generate`` runs on the device the DiT parameters live on (``load_pipeline(device=...)``); the noise is
    drawn on the CPU from ``seed``, so a seed gives the same video on every device (up to the device's
    rounding).  After each ``generate``, ``last_info`` describes the run (steps, scheduler, TeaCache skips).

    ``model_type="uniworld"`` (Uniworld-OSP2.0): ``text`` is a VLM encoder (``ospfn.model.vlm.QwenVLEncoder``:
    ``encode(images, prompts)``, ``vlm_dim``) and ``adapter`` / ``adapter_cfg`` the trained context adapter
    (``init_adapter`` names, ``VLMAdapterConfig``; on the DiT's device): ``generate`` encodes every prompt WITH
    its first frame and maps the features through ``ospfn.model.vlm.uniworld_context`` (see ``generate``).
    Other model types take no adapter.
    """

    cfg: DiTConfig
    params: dict[str, torch.Tensor]
    text: TextEncoder
    vae: VideoVAE
    vae_spec: dict
    defaults: dict = field(default_factory=lambda: dict(DEFAULTS))
    model_type: str = "ospfn"
    info: dict = field(default_factory=dict)
    text_offload: str = "none"
    adapter: Optional[dict] = field(default=None, repr=False)
    adapter_cfg: Optional[object] = None
    last_info: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _text_home: Optional[torch.device] = field(default=None, init=False, repr=False, compare=False)
    _vlm_released: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model_type, str) or self.model_type not in MODEL_TYPES:
            raise ValueError(f"Pipeline: model_type must be one of {list(MODEL_TYPES)}, got {self.model_type!r:.80}")
        if not isinstance(self.text_offload, str) or self.text_offload not in TEXT_OFFLOAD:
            raise ValueError(f"Pipeline: text_offload must be one of {list(TEXT_OFFLOAD)}, got {self.text_offload!r:.80}")
        for name in ("defaults", "info", "vae_spec"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"Pipeline: {name} must be a dict, got {type(getattr(self, name)).__name__}")
        if self.model_type != "uniworld":
            if self.adapter is not None or self.adapter_cfg is not None:
                raise ValueError(f"Pipeline: adapter / adapter_cfg (the VLM context adapter) apply to model_type 'uniworld' only, "
                                 f"got model_type {self.model_type!r}")  # fmt: skip
            return
        from ospfn.model.vlm import VLMAdapterConfig, check_adapter_params

        if not isinstance(self.adapter_cfg, VLMAdapterConfig):
            raise TypeError(f"Pipeline: model_type 'uniworld' needs adapter_cfg, a VLMAdapterConfig, got {type(self.adapter_cfg).__name__}")
        check_adapter_params(self.adapter, self.adapter_cfg, "Pipeline: adapter")
        if self.cfg.i2v != "flashi2v":
            raise ValueError(f"Pipeline: model_type 'uniworld' is a FlashI2V model; the DiT config has i2v={self.cfg.i2v!r}")
        if not callable(getattr(self.text, "encode", None)) or not isinstance(getattr(self.text, "vlm_dim", None), int):
            raise TypeError(f"Pipeline: model_type 'uniworld' needs a VLM text encoder (ospfn.model.vlm.QwenVLEncoder: "
                            f"encode(images, prompts), vlm_dim), got {type(self.text).__name__}")  # fmt: skip
        a = self.adapter_cfg
        pairs = [("vlm_dim", a.vlm_dim, "the VLM's width", self.text.vlm_dim), ("text_dim", a.text_dim, "the DiT's text_dim", self.cfg.text_dim)]
        if a.first_frame_tokens:
            pairs.append(("latent_channels", a.latent_channels, "the VAE's latent channels", self.vae.latent_channels))
        bad = [f"adapter {k} {x} != {what} {y}" for k, x, what, y in pairs if x != y]
        if bad:
            raise ValueError(f"Pipeline: the context adapter does not fit this pipeline: {'; '.join(bad)}")

    @property
    def device(self) -> torch.device:
        """The device of the DiT parameters (where ``generate`` runs)."""
        w = self.params.get("patch_embedding.weight")
        return w.device if isinstance(w, torch.Tensor) else torch.device("cpu")

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        if self.model_type == "uniworld":
            raise ValueError("Pipeline.encode_prompts: a uniworld pipeline encodes each prompt with its image: use "
                             "uniworld_contexts(prompts, negatives, images, cond)")  # fmt: skip
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

    def _adapters(self, lora, fn: str) -> list:
        """``generate``'s ``lora=`` as [(adapter on the DiT's device, weight), ...], checked against the DiT."""
        if lora is None:
            return []
        from ospfn.lora import LoraAdapter, load_lora
        from ospfn.lora.adapter import lora_pairs

        def read(p):
            return load_lora(p, self.cfg) if isinstance(p, (str, os.PathLike)) else p

        if isinstance(lora, (str, os.PathLike)):
            lora = read(lora)
        elif isinstance(lora, (list, tuple)) and not (len(lora) == 2 and isinstance(lora[0], LoraAdapter) and isinstance(lora[1], (int, float))):
            lora = [read(x) for x in lora]
        pairs = lora_pairs(lora, fn, "lora")
        dev = self.device
        out = []
        for adapter, w in pairs:
            try:
                adapter.check(self.cfg)
            except ValueError as e:
                raise ValueError(f"{fn}: lora does not fit this pipeline's DiT: {e}") from None
            out.append((adapter.to(dev), w))
        return out

    def _encode_for_run(self, prompts: list[str], negs: Optional[list[str]], dev: torch.device):
        """(context, negative context or None) on ``dev``; with ``text_offload`` the encoder is brought back to its
        device first (after an earlier "cpu" offload) and offloaded / released afterwards, before the DiT runs."""
        offloadable = self.text_offload != "none" and callable(getattr(self.text, "offload", None))
        if offloadable and self._text_home is not None:
            self.text.to(self._text_home)
        ctx = self.encode_prompts(prompts).to(dev)
        neg_ctx = self.encode_prompts(negs).to(dev) if negs is not None else None
        if offloadable:
            home = self.text.device
            if self.text_offload == "cpu":
                self.text.offload()
                self._text_home = home
            else:
                self.text.release()
        return ctx, neg_ctx

    @torch.no_grad()
    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        image: Optional[torch.Tensor] = None,
        *,
        negative_prompt: Union[None, str, Sequence[str]] = None,
        frames: Optional[int] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        steps: Optional[int] = None,
        guidance: Optional[float] = None,
        shift: Optional[float] = None,
        seed: int = 0,
        latents: Optional[torch.Tensor] = None,
        scheduler: Optional[str] = None,
        sigmas=None,
        teacache=None,
        fourier_ratio: Optional[float] = None,
        callback: Optional[Callable[[int, torch.Tensor], None]] = None,
        size: Optional[tuple[int, int]] = None,
        lora=None,
        style=None,
    ) -> torch.Tensor:
        """A video [3, F, H, W] in [-1, 1] for a str ``prompt``; [B, 3, F, H, W] for a list of B prompts.

        ``image`` is the first frame (image-to-video models only: a text-to-video pipeline refuses it):
        [3, H, W] (shared by a batch) or [B, 3, H, W], floats in [-1, 1] or uint8 in 0..255 (see
        ``check_image``).  ``negative_prompt``: a str (for every prompt) or a list of B str.

        ``None`` takes the pipeline default (``defaults``) for ``negative_prompt``, ``frames``, ``height`` /
        ``width`` (``size`` (H, W) is the same pair in one argument), ``steps``, ``guidance``, ``shift``,
        ``scheduler`` and ``fourier_ratio``; any value given is used as given, 0 included, and checked before
        any work: ``steps`` and ``frames`` ints >= 1 (``frames - 1`` a multiple of the VAE time stride), H, W
        multiples of the VAE stride x patch, ``guidance`` finite and >= 0 (1 = no guidance: one branch),
        ``shift`` finite and > 0, ``fourier_ratio`` in [0, 1], ``seed`` an int.

        ``latents`` fixes the initial noise instead of ``seed``: a finite float tensor [1 or B, C, T_lat, h, w] in
        the DiT's latent space (C the VAE's latent channels, T_lat = (frames - 1) / time stride + 1, h, w = H, W
        / spatial stride); frames / height / width left at None are taken from its shape.

        ``scheduler``: ``"euler"`` (ospfn's Euler on the shifted linspace schedule) or ``"unipc"`` (diffusers'
        ``UniPCMultistepScheduler`` in flow-prediction mode with ``flow_shift=shift``, driven by ospfn's loop).
        ``sigmas``: an explicit Euler schedule (>= 2 values in [0, 1], strictly decreasing; ``steps`` is then
        ``len(sigmas) - 1`` and ``shift`` does not apply).  ``teacache``: None, a threshold (float) or an
        ``ospfn.sched.teacache.TeaCacheConfig``; skips blocks on steps whose input barely changed (separate
        caches for the two guidance branches).  ``callback(i, z)`` sees the latent state after each step.

        Classifier-free guidance runs both branches as one batch of 2B.  FlashI2V integrates the unshifted
        state with either scheduler.  Without ``latents`` the noise comes from a CPU generator seeded with
        ``seed``: the same seed gives the same video.

        ``lora``: LoRA adapters applied to the DiT for this call (``ospfn.lora``; docs/lora.md): a
        ``LoraAdapter`` (e.g. ``load_lora(path)``), an ``(adapter, weight)`` pair, a list of adapters / pairs, or
        a path / list of paths (read with ``load_lora``, weight 1).  Checked against the DiT before any work;
        adapters on another device are moved to the DiT's.  None: the base model.

        ``style``: image-to-stylised-video (docs/i2sv.md): one of the 12 names of ``ospfn.styles.STYLES`` (any
        case; ``"pixel_art"`` works), or a list of B names / None (one per prompt).  Each prompt is wrapped in
        its style's template (``ospfn.styles.style_prompt``); the negative prompt is not.  An unknown name
        raises ``ValueError`` listing the 12.  None: the prompt as given.

        ``model_type="uniworld"``: the context is ``uniworld_context(adapter, text.encode(images, prompts),
        first_frame=<the first-frame latent> if the adapter has first-frame tokens, style=<the styles' ids> if it
        has style tokens)`` -- the VLM sees each (styled) prompt with its image; the unconditional context is the
        same with the negative prompts and the SAME images (one VLM call of 2B rows, prompts then negatives).
        With style tokens either every prompt has a style or none does (none: no style tokens).
        """
        import time

        from ospfn.model import forward
        from ospfn.sched import SCHEDULERS, sample
        from ospfn.sched.flow import MAX_STEPS, check_number, check_sigmas

        t0 = time.perf_counter()
        fn = "Pipeline.generate"
        d = self.defaults
        self.last_info = {}  # filled when this call succeeds

        def pick(value, name):
            return (d[name], f"the pipeline default {name}") if value is None else (value, name)

        # -- prompts ------------------------------------------------------------------------------------
        batched = not isinstance(prompt, str)
        if batched:
            if not isinstance(prompt, (list, tuple)):
                raise TypeError(f"{fn}: prompt must be a str, got {type(prompt).__name__} (or a non-empty list of str for a batch)")
            if not prompt or not all(isinstance(p, str) for p in prompt):
                raise TypeError(f"{fn}: prompt must be a str or a non-empty list of str, got {prompt!r:.80}")
            prompts = list(prompt)
        else:
            prompts = [prompt]
        B = len(prompts)
        styles = _check_styles(style, B, fn)
        prompts = [style_prompt(p, s) for p, s in zip(prompts, styles)]
        neg, neg_name = pick(negative_prompt, "negative_prompt")
        if isinstance(neg, str):
            negs = [neg] * B
        elif isinstance(neg, (list, tuple)) and all(isinstance(p, str) for p in neg):
            if len(neg) != B:
                raise ValueError(f"{fn}: {neg_name} must be a str or a list of {B} str (one per prompt), got {len(neg)}")
            negs = list(neg)
        else:
            raise TypeError(f"{fn}: {neg_name} must be a str, a list of str or None, got {type(neg).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{fn}: seed must be an int, got {type(seed).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"{fn}: callback must be callable as callback(i, z) or None, got {type(callback).__name__}")

        # -- solver ---------------------------------------------------------------------------------------
        # a pipeline whose defaults predate the "scheduler" key samples with Euler, as it always did
        sched_v, sched_name = (d.get("scheduler", "euler"), "the pipeline default scheduler") if scheduler is None else (scheduler, "scheduler")
        if sigmas is not None and scheduler is None:
            sched_v, sched_name = "euler", "scheduler"  # an explicit schedule is an Euler schedule
        if not isinstance(sched_v, str) or sched_v not in SCHEDULERS:
            raise ValueError(f"{fn}: {sched_name} must be one of {list(SCHEDULERS)}, got {sched_v!r:.80}")
        sig_list = None
        if sigmas is not None:
            if sched_v != "euler":
                raise ValueError(f"{fn}: sigmas= is an explicit schedule for the Euler sampler; UniPC builds its own from steps "
                                 "and shift (pass scheduler='euler' or drop sigmas)")  # fmt: skip
            sig_list = check_sigmas(sigmas, fn)
            if shift is not None:
                raise ValueError(f"{fn}: shift={shift!r} does not apply to an explicit sigmas schedule (it is used as given); "
                                 "drop one of them")  # fmt: skip
            if steps is not None and _check_int(steps, fn, "steps", 1, MAX_STEPS) != len(sig_list) - 1:
                raise ValueError(f"{fn}: steps={steps!r} disagrees with sigmas, which has {len(sig_list)} values "
                                 f"({len(sig_list) - 1} steps); drop steps or make them agree")  # fmt: skip
            steps_v = len(sig_list) - 1
            sh_v = None
        else:
            steps_v, steps_name = pick(steps, "steps")
            steps_v = _check_int(steps_v, fn, steps_name, 1, MAX_STEPS)
            sh_v, sh_name = pick(shift, "shift")
            sh_v = check_number(sh_v, fn, sh_name, lo=0, lo_open=True)
        g_v, g_name = pick(guidance, "guidance")
        g_v = check_number(g_v, fn, f"{g_name} (1 = no guidance)", lo=0)
        fr_v, fr_name = pick(fourier_ratio, "fourier_ratio")
        fr_v = check_number(fr_v, fn, fr_name, lo=0, hi=1)

        # -- shape: frames, H, W (from the arguments, the latents or the defaults) ------------------------
        st, sh, sw = self.vae.stride
        C = self.vae.latent_channels
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or not latents.dtype.is_floating_point:
                raise TypeError(f"{fn}: latents must be a floating-point tensor [1 or B, {C}, T_lat, h, w], got "
                                f"{getattr(latents, 'dtype', type(latents).__name__)}")  # fmt: skip
            if latents.dim() != 5 or latents.shape[1] != C or latents.shape[0] not in (1, B) or min(latents.shape[2:]) < 1:
                raise ValueError(f"{fn}: latents must be [1 or B={B}, {C}, T_lat, h, w] (the VAE's {C} latent channels), "
                                 f"got {tuple(latents.shape)}")  # fmt: skip
        if size is not None and (height is not None or width is not None):
            raise ValueError(f"{fn}: pass the video size as height= and width= or as size=(H, W), not both")
        if size is not None:
            H, W = _check_size(size, fn, "size")
            size_name = "size"
        else:
            lat_hw = None if latents is None else (latents.shape[3] * sh, latents.shape[4] * sw)
            hw = []
            for i, (v, name) in enumerate(((height, "height"), (width, "width"))):
                if v is None:
                    v = d["size"][i] if lat_hw is None else lat_hw[i]
                hw.append(_check_int(v, fn, name, 1, 1_000_000))
            H, W = hw
            size_name = "(height, width)" if (height, width) != (None, None) or latents is not None else "the pipeline default size"
        if frames is None and latents is not None:
            frames_v, frames_name = (latents.shape[2] - 1) * st + 1, "frames"
        else:
            frames_v, frames_name = pick(frames, "frames")
        frames_v = _check_int(frames_v, fn, frames_name, 1, 100_000)
        mh, mw = sh * self.cfg.patch_size[1], sw * self.cfg.patch_size[2]
        if H % mh or W % mw:
            raise ValueError(f"{fn}: {size_name} {(H, W)} must be a multiple of ({mh}, {mw}) (VAE stride x patch)")
        pt = self.cfg.patch_size[0]
        if (frames_v - 1) % st or ((frames_v - 1) // st + 1) % pt:
            raise ValueError(f"{fn}: {frames_name}={frames_v} must be 1 + a multiple of the VAE time stride {st}, giving a "
                             f"multiple of the temporal patch {pt} latent frames")  # fmt: skip
        t_lat = (frames_v - 1) // st + 1
        shape = (B, C, t_lat, H // sh, W // sw)
        if latents is not None:
            if tuple(latents.shape[1:]) != shape[1:]:
                raise ValueError(f"{fn}: latents {tuple(latents.shape)} do not match frames={frames_v}, size {(H, W)}: expected "
                                 f"[1 or {B}, {C}, {t_lat}, {H // sh}, {W // sw}]")  # fmt: skip
            if not bool(torch.isfinite(latents).all()):
                raise ValueError(f"{fn}: latents hold NaN or Inf")

        # -- image condition ------------------------------------------------------------------------------
        cond_images = None
        if self.cfg.i2v == "flashi2v":
            if image is None:
                raise ValueError(f"{fn}: this is an image-to-video model; pass image=[3, H, W] in [-1, 1] (or uint8 0..255)")
            if isinstance(image, torch.Tensor) and image.dim() == 4:
                if image.shape[0] != B:
                    raise ValueError(f"{fn}: a batch of images must be [B={B}, 3, H, W] (one per prompt), got {tuple(image.shape)}")
                cond_images = torch.stack([self.check_image(im, (H, W)) for im in image])
            else:
                cond_images = self.check_image(image, (H, W))[None]
        elif image is not None:
            raise ValueError(f"{fn}: image= is the first frame of an image-to-video model, but this pipeline is "
                             f"text-to-video (cfg.i2v = {self.cfg.i2v!r}); drop it")  # fmt: skip
        style_ids = None
        if self.model_type == "uniworld" and self.adapter_cfg.style_tokens and any(s is not None for s in styles):
            if any(s is None for s in styles):
                raise ValueError(f"{fn}: this uniworld model has style tokens: give every prompt a style or none, got {styles}")
            from ospfn.styles import style_id

            style_ids = [style_id(s) for s in styles]

        adapters = self._adapters(lora, fn)

        # -- TeaCache ------------------------------------------------------------------------------------
        use_cfg = g_v != 1.0
        tc = None
        if teacache is None and d.get("teacache") is not None:  # the pipeline's default (e.g. the I2SV recipe's 0.10)
            from ospfn.sched.teacache import TeaCacheConfig

            teacache = TeaCacheConfig(**{k: (tuple(c) if isinstance(c, list) else c) for k, c in d["teacache"].items()})
        if teacache is not None:
            tc = _make_teacache(teacache, fn, branches=2 if use_cfg else 1, steps=steps_v)

        # -- run -------------------------------------------------------------------------------------------
        dev = self.device
        if latents is None:
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dev)
        else:
            noise = latents.detach().to(device=dev, dtype=torch.float32).expand(shape).clone()
        cond = None
        if cond_images is not None:
            cond = self.vae.encode(cond_images[:, :, None]).to(dev)
            if cond.shape[0] != B:
                cond = cond.expand(B, *cond.shape[1:])
        if self.model_type == "uniworld":
            ctx, neg_ctx = self.uniworld_contexts(prompts, negs if use_cfg else None, cond_images, cond, style_ids)
        else:
            ctx, neg_ctx = self._encode_for_run(prompts, negs if use_cfg else None, dev)
        schedule = {"sigmas": sig_list} if sig_list is not None else {"steps": steps_v, "shift": sh_v}
        fwd = forward if not adapters else functools.partial(forward, lora=adapters)
        z = sample(
            self.params, self.cfg, noise=noise, context=ctx, neg_context=neg_ctx, guidance=g_v, scheduler=sched_v, **schedule,
            cond_image_latent=cond, fourier_ratio=fr_v, callback=callback, forward_fn=fwd if tc is None else tc.wrap(fwd),
        )  # fmt: skip
        video = self.vae.decode(z).clamp(-1, 1)
        self.last_info = {
            "steps": steps_v, "scheduler": sched_v, "shift": sh_v, "sigmas": sig_list, "guidance": g_v, "cfg_batched": use_cfg,
            "batch": B, "frames": frames_v, "size": [H, W], "seed": None if latents is not None else seed,
            "teacache_skipped": 0 if tc is None else int(tc.skipped), "teacache": None if tc is None else tc.stats(),
            "lora": [{"rank": a.config.rank, "alpha": a.config.alpha, "weight": w} for a, w in adapters],
            "styles": styles, "prompts": prompts, "seconds": round(time.perf_counter() - t0, 4),
        }  # fmt: skip
        return video if batched else video[0]

    @torch.no_grad()
    def uniworld_contexts(self, prompts: list[str], negs: Optional[list[str]], images: torch.Tensor, cond: Optional[torch.Tensor],
                          style_ids: Optional[list[int]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # fmt: skip
        """(context, negative context or None) of a uniworld pipeline on the DiT's device: the VLM encodes
        (image_b, prompt_b) and, with ``negs``, (image_b, neg_b) in one call; ``images`` [1 or B, 3, H, W] in
        [-1, 1] (the first frames), ``cond`` the first-frame latents [B, C, 1, h, w] (used when the adapter has
        first-frame tokens), ``style_ids`` one style id per prompt (style tokens) or None."""
        from ospfn.model.vlm import uniworld_context

        if self.model_type != "uniworld":
            raise ValueError(f"Pipeline.uniworld_contexts: a uniworld pipeline's method; this one is {self.model_type!r}")
        B = len(prompts)
        imgs = images if images.shape[0] == B else images.expand(B, *images.shape[1:])
        rows = list(prompts) + (list(negs) if negs is not None else [])
        vlm_model = getattr(self.text, "model", None) if self.text_offload != "none" else None  # QwenVLEncoder's module
        if self._vlm_released:
            raise RuntimeError("Pipeline.generate: the VLM was released after an earlier call (text_offload='release'); "
                               "load the pipeline again")  # fmt: skip
        if vlm_model is not None and self._text_home is not None:
            vlm_model.to(self._text_home)  # back from an earlier "cpu" offload
        feats = self.text.encode(torch.cat([imgs] * (2 if negs is not None else 1)), rows)
        if vlm_model is not None and self.text_offload == "cpu":
            self._text_home = self.text.device
            vlm_model.to("cpu")
        elif vlm_model is not None and self.text_offload == "release":
            self.text.model = None
            self._vlm_released = True
        a, ac = self.adapter, self.adapter_cfg
        first = cond if ac.first_frame_tokens else None
        dev = self.device
        ctx = uniworld_context(a, ac, feats[:B], first_frame=first, style=style_ids).to(dev)
        neg = uniworld_context(a, ac, feats[B:], first_frame=first, style=style_ids).to(dev) if negs is not None else None
        return ctx, neg


def _check_styles(style, batch: int, fn: str) -> list:
    """``generate(style=)`` as one canonical style name or None per prompt."""
    if style is None or isinstance(style, str):
        names = [style] * batch
    elif isinstance(style, (list, tuple)):
        if len(style) != batch:
            raise ValueError(f"{fn}: style must be a style name or a list of {batch} (one per prompt), got {len(style)} entries")
        names = list(style)
    else:
        raise TypeError(f"{fn}: style must be a style name ({', '.join(STYLES)}), a list of them (None entries allowed) or None, "
                        f"got {type(style).__name__}")  # fmt: skip
    out = []
    for v in names:
        if v is None:
            out.append(None)
            continue
        if not isinstance(v, str):
            raise TypeError(f"{fn}: style entries must be style names or None, got {type(v).__name__} {v!r:.40}")
        try:
            out.append(style_name(v))
        except ValueError:
            raise ValueError(f"{fn}: unknown style {v!r}; the 12 styles are: {', '.join(STYLES)}") from None
    return out


def _make_teacache(teacache, fn: str, *, branches: int, steps: int):
    """The ``TeaCache`` of ``generate(teacache=...)``: a threshold (a number >= 0, the other settings at
    ``TeaCacheConfig``'s defaults) or a ``TeaCacheConfig``; one cache state per guidance branch."""
    import numbers

    try:
        from ospfn.sched.teacache import TeaCache, TeaCacheConfig
    except ImportError as e:
        raise ImportError(f"{fn}: teacache= needs ospfn.sched.teacache, which could not be imported: {e}") from e
    if isinstance(teacache, TeaCacheConfig):
        config = teacache
    elif isinstance(teacache, numbers.Real) and not isinstance(teacache, bool):
        from ospfn.sched.flow import check_number

        config = TeaCacheConfig(threshold=check_number(teacache, fn, "teacache (a threshold; 0 = never skip)", lo=0))
    else:
        raise TypeError(f"{fn}: teacache must be None, a threshold (a number >= 0) or an ospfn.sched.teacache.TeaCacheConfig, "
                        f"got {type(teacache).__name__}")  # fmt: skip
    return TeaCache(config, branches=branches, steps=steps)


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
        "scheduler": (lambda v: v in SCHEDULERS, f"one of {list(SCHEDULERS)}"),
        "teacache": (_teacache_default_ok, "null or {\"threshold\": number >= 0, \"warmup_steps\": int >= 0, "
                     "\"coefficients\": a preset name (optional)} (ospfn.sched.teacache.TeaCacheConfig)"),
    }  # fmt: skip
    for k, (ok, allowed) in checks.items():
        if not ok(out[k]):
            raise err(f"{where}: defaults.{k} must be {allowed}, got {out[k]!r:.80}")
    return out


def _teacache_default_ok(v) -> bool:
    """A pipeline's default TeaCache: None, or the keyword arguments of a valid ``TeaCacheConfig``."""
    if v is None:
        return True
    if not isinstance(v, dict) or not set(v) <= {"threshold", "warmup_steps", "coefficients"} or "threshold" not in v:
        return False
    from ospfn.sched.teacache import TeaCacheConfig

    try:
        TeaCacheConfig(**{k: (tuple(c) if k == "coefficients" and isinstance(c, list) else c) for k, c in v.items()})
    except (TypeError, ValueError):
        return False
    return True


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


# -- loading: ospfn, diffusers and Wan original layouts ------------------------------------------------------

# Wan2.1's default negative prompt (Chinese, as Wan, OSP-Next and FlashI2V ship it); in English: bright tones,
# overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall gray, worst
# quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, poorly drawn
# faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three legs, many
# people in the background, walking backwards
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)  # fmt: skip  # noqa: RUF001 (full-width commas are part of the prompt)

LAYOUTS = ("diffusers", "wan", "ospfn", "export")
EXPORT_FILE = "ospfn_export.json"  # what recipes/train.py writes beside a DiT trained on the real encoders
TEXT_OFFLOAD = ("none", "cpu", "release")  # what generate does with the text encoder once the prompts are encoded
LOAD_MODEL_TYPES = ("wan", "osp-next", "flashi2v", "uniworld")  # what load_pipeline(model_type=...) accepts
ADAPTER_META_KEY = "ospfn_vlm_adapter"  # the VLMAdapterConfig (JSON) in a vlm_adapter.safetensors file's metadata

# the sampling defaults of a Wan-family pipeline (diffusers' WanPipeline at 480p); "shift" and "scheduler" come
# from the diffusers layout's scheduler config when there is one
WAN_DEFAULTS = {"frames": 81, "size": [480, 832], "steps": 50, "guidance": 5.0, "shift": 3.0, "fourier_ratio": 0.1,
                "fps": 16, "negative_prompt": WAN_NEGATIVE_PROMPT, "scheduler": "unipc"}  # fmt: skip
# OSP-Next and FlashI2V sample with Euler on the shifted linspace schedule, shift 7 (their released inference)
_METHOD_SAMPLING = {"scheduler": "euler", "shift": 7.0}

# the Wan original directory (Wan-AI/Wan2.1-T2V-*)
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"
_WAN_DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_WAN_DIT_FILE = "diffusion_pytorch_model.safetensors"
_DIFFUSERS_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer")


def _listing(path: Path, limit: int = 12) -> str:
    """What a directory holds, for error messages: ``['a.json', 'sub/', ...]``."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        return "(unreadable)"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}" if names else "nothing (empty directory)"


def detect_layout(path) -> str:
    """The layout of a pipeline directory: ``"ospfn"`` (``pipeline.json``), ``"export"`` (``ospfn_export.json``: a
    DiT trained by ``recipes/train.py`` on the real encoders, which it names), ``"diffusers"``
    (``model_index.json``) or ``"wan"`` (Wan original files: ``models_t5_umt5-xxl-enc-bf16.pth``,
    ``Wan2.1_VAE.pth`` or a ``WanModel`` ``config.json``).  ``FileNotFoundError`` naming what the directory holds when none matches."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"detect_layout: path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_pipeline: {path} is not a pipeline directory (no pipeline.json): no such directory")
    if not path.is_dir():
        raise FileNotFoundError(f"load_pipeline: {path} is not a pipeline directory (no pipeline.json): it is a file; pass the "
                                "directory of a pipeline, and a DiT checkpoint file as dit=")  # fmt: skip
    if (path / "pipeline.json").is_file():
        return "ospfn"
    if (path / EXPORT_FILE).is_file():
        return "export"
    if (path / "model_index.json").is_file():
        return "diffusers"
    if (path / WAN_T5_FILE).is_file() or (path / WAN_VAE_FILE).is_file():
        return "wan"
    if (path / "config.json").is_file():
        try:
            if json.loads((path / "config.json").read_text(encoding="utf-8")).get("_class_name") == "WanModel":
                return "wan"
        except (ValueError, OSError, AttributeError):
            pass
    raise FileNotFoundError(
        f"load_pipeline: {path} is not a pipeline directory (no pipeline.json), nor a diffusers Wan pipeline "
        f"(model_index.json) nor a Wan original directory ({WAN_T5_FILE}, {WAN_VAE_FILE}, a WanModel config.json); "
        f"it holds {_listing(path)}. A DiT checkpoint alone goes in dit= on top of a pipeline directory"
    )


def _check_device(device, name: str) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, (str, int)) or isinstance(device, bool):
        raise TypeError(f"load_pipeline: {name} must be a torch.device, a str such as 'cuda:0' or None, got {type(device).__name__}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"load_pipeline: {name}={device!r} is not a device ({e})") from None


def _osp_next_settings(num_layers: int) -> dict:
    """The Skiparse settings of the ``osp-next-*`` presets (dual_end, sparse ratio 2, 8 full blocks), with the
    full blocks capped for models of fewer than 16 layers (a multiple of 4, at most half the layers)."""
    from ospfn.model.config import PRESETS

    p = PRESETS["osp-next-1.3b"]
    full = min(p["num_full_blocks"], (num_layers // 2) // 4 * 4)
    return {"skiparse_model_type": p["skiparse_model_type"], "sparse_ratio": p["sparse_ratio"], "num_full_blocks": full}


def _wan_dit_source(path: Path) -> Optional[Path]:
    """The DiT weights of a Wan original directory (the index of a sharded set, or the single file)."""
    for name in (_WAN_DIT_INDEX, _WAN_DIT_FILE):
        if (path / name).is_file():
            return path / name
    return None


def _dit_config_from(file: Path, who: str) -> DiTConfig:
    """A DiTConfig from a Wan (``WanModel``) or diffusers (``WanTransformer3DModel``) config.json, refusing the
    variants ospfn does not run (image-to-video conditioning through CLIP features, other attention norms)."""
    d = _read_json_object(file, "config.json")
    cls = d.get("_class_name")
    unsupported = []
    if d.get("model_type", "t2v") != "t2v":
        unsupported.append(f"model_type {d['model_type']!r} (Wan's image-to-video / first-last-frame / VACE models)")
    for key, ok in (("image_dim", None), ("added_kv_proj_dim", None)):
        if d.get(key, ok) is not ok:
            unsupported.append(f"{key} {d[key]!r} (Wan2.1-I2V's CLIP image branch)")
    if d.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        unsupported.append(f"qk_norm {d['qk_norm']!r} (ospfn's DiT normalises q and k across heads)")
    if d.get("cross_attn_norm", True) is not True:
        unsupported.append("cross_attn_norm false (ospfn's DiT has the affine cross-attention norm)")
    if unsupported:
        raise CheckpointError(f"{who}: {file} describes a {cls or 'DiT'} ospfn does not run (text-to-video Wan2.1 DiTs only): "
                              + "; ".join(unsupported))  # fmt: skip
    try:
        return DiTConfig.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{who}: {file}: not a valid DiT config: {e}") from None


def _scheduler_defaults(file: Path, who: str) -> dict:
    """``{"scheduler", "shift"}`` from a diffusers ``scheduler_config.json`` (UniPC in flow-prediction mode or
    the flow-matching Euler scheduler)."""
    d = _read_json_object(file, "scheduler_config.json")
    cls = d.get("_class_name")
    if cls == "UniPCMultistepScheduler":
        if d.get("prediction_type") != "flow_prediction" or d.get("use_flow_sigmas") is not True:
            raise CheckpointError(f"{who}: {file}: a UniPCMultistepScheduler must have prediction_type 'flow_prediction' and "
                                  f"use_flow_sigmas true for a flow-matching DiT, got {d.get('prediction_type')!r} / "
                                  f"{d.get('use_flow_sigmas')!r}")  # fmt: skip
        kind, key = "unipc", "flow_shift"
    elif cls == "FlowMatchEulerDiscreteScheduler":
        kind, key = "euler", "shift"
    else:
        raise CheckpointError(f"{who}: {file}: scheduler {cls!r} is not one ospfn drives (supported: "
                              "UniPCMultistepScheduler in flow-prediction mode, FlowMatchEulerDiscreteScheduler)")  # fmt: skip
    shift = d.get(key, 1.0)
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise CheckpointError(f"{who}: {file}: {key} must be a finite number > 0, got {shift!r}")
    return {"scheduler": kind, "shift": float(shift)}


def _load_diffusers_layout(path: Path, who: str) -> dict:
    """Cheap checks of a diffusers Wan pipeline directory; the components are read later."""
    index_file = path / "model_index.json"
    index = _read_json_object(index_file, "model_index.json")
    cls = index.get("_class_name")
    if cls != "WanPipeline":
        raise CheckpointError(f"{who}: {index_file} describes a {cls!r}; ospfn reads text-to-video WanPipeline directories "
                              "(Wan2.1-T2V-*-Diffusers); an image-to-video model is a FlashI2V DiT on top of one: "
                              "load_pipeline(<WanPipeline dir>, dit=<FlashI2V checkpoint>)")  # fmt: skip
    second = index.get("transformer_2")
    if isinstance(second, list) and any(v is not None for v in second):
        raise CheckpointError(f"{who}: {index_file} names a second transformer (transformer_2, Wan2.2's two experts): not supported")
    absent = [c for c in _DIFFUSERS_COMPONENTS if not (path / c).is_dir()]
    absent += [f"{c}/config.json" for c in ("transformer", "vae", "text_encoder") if c not in absent and not (path / c / "config.json").is_file()]
    if absent:
        raise CheckpointMissingError(f"{who}: the diffusers pipeline {path} lacks {absent}; it holds {_listing(path)}")
    cfg = _dit_config_from(path / "transformer" / "config.json", who)
    defaults = dict(WAN_DEFAULTS)
    sched = path / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        defaults.update(_scheduler_defaults(sched, who))
    return {"cfg": cfg, "dit": path / "transformer", "defaults": defaults, "vae_spec": {"kind": "wan", "layout": "diffusers", "path": str(path / "vae")}}


def _load_wan_layout(path: Path, who: str) -> dict:
    """Cheap checks of a Wan original directory; the components are read later."""
    dit = _wan_dit_source(path)
    absent = [n for n, ok in (("config.json", (path / "config.json").is_file()),
                              (f"{_WAN_DIT_FILE} or {_WAN_DIT_INDEX} (the DiT)", dit is not None),
                              (f"{WAN_T5_FILE} (the text encoder)", (path / WAN_T5_FILE).is_file()),
                              (f"{WAN_TOKENIZER_DIR}/ (the tokenizer)", (path / WAN_TOKENIZER_DIR).is_dir()),
                              (f"{WAN_VAE_FILE} (the VAE)", (path / WAN_VAE_FILE).is_file())) if not ok]  # fmt: skip
    if absent:
        raise CheckpointMissingError(f"{who}: the Wan original directory {path} lacks {absent}; it holds {_listing(path)}")
    cfg = _dit_config_from(path / "config.json", who)
    return {"cfg": cfg, "dit": dit, "defaults": dict(WAN_DEFAULTS), "vae_spec": {"kind": "wan", "layout": "wan", "path": str(path / WAN_VAE_FILE)}}


def _load_ospfn_layout(path: Path, who: str) -> dict:
    """Cheap checks of an ospfn pipeline directory (pipeline.json); the weights are read later."""
    meta_file = path / "pipeline.json"
    meta = _read_json_object(meta_file, "pipeline.json")
    unknown = set(meta) - {"text_encoder", "vae", "defaults", "info"}
    if unknown:
        raise CheckpointError(f"{who}: unknown key(s) {sorted(unknown)} in {meta_file}; allowed: defaults, info, text_encoder, vae")
    absent = [k for k in ("text_encoder", "vae") if k not in meta]
    if absent:
        raise CheckpointError(f"{who}: {meta_file} lacks {absent} (a pipeline.json has text_encoder, vae, defaults, info)")
    te = meta["text_encoder"]
    if not isinstance(te, dict):
        raise CheckpointError(f"{who}: {meta_file}: text_encoder must be an object such as {{'kind': 'tiny', ...}}, got {type(te).__name__}")
    if te.get("kind") != "tiny":
        raise CheckpointError(f"{who}: unknown text_encoder kind {te.get('kind')!r:.80} in {meta_file} (supported: 'tiny')")
    try:
        tcfg = TinyTextConfig(**{k: v for k, v in te.items() if k != "kind"})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{who}: {meta_file}: text_encoder: {e}") from None
    try:
        vae = _make_vae(meta["vae"])
    except ValueError as e:
        raise CheckpointError(f"{who}: {meta_file}: {e}") from None
    defaults = _pipeline_defaults(meta.get("defaults", {}), f"{who}: {meta_file}", CheckpointError)
    if not isinstance(meta.get("info", {}), dict):
        raise CheckpointError(f"{who}: {meta_file}: info must be an object, got {type(meta['info']).__name__}")
    absent = [n for n in ("config.json", "diffusion_pytorch_model.safetensors", "text_encoder.safetensors") if not (path / n).is_file()]
    if absent:
        raise CheckpointMissingError(f"{who}: {path} lacks {absent}: an incomplete pipeline directory")
    cfg = load_config(path / "config.json")
    if cfg.text_dim != tcfg.text_dim:
        raise CheckpointError(f"{who}: the text encoder in {meta_file} gives text_dim {tcfg.text_dim}, "
                              f"{path / 'config.json'} expects {cfg.text_dim}")  # fmt: skip
    if (cfg.in_dim, cfg.out_dim) != (vae.latent_channels, vae.latent_channels):
        raise CheckpointError(f"{who}: the vae in {meta_file} has {vae.latent_channels} latent channels, "
                              f"{path / 'config.json'} has in_dim {cfg.in_dim}, out_dim {cfg.out_dim}")  # fmt: skip
    text_file = path / "text_encoder.safetensors"
    text_w = read_safetensors(text_file)
    _check_text_weights(text_w, tcfg, f"{who}: {text_file}", CheckpointError)
    return {"cfg": cfg, "dit": path / "diffusion_pytorch_model.safetensors", "defaults": defaults, "vae_spec": meta["vae"],
            "vae": vae, "text_weights": text_w, "text_cfg": tcfg, "info": dict(meta.get("info", {}))}  # fmt: skip


def _load_export_layout(path: Path, who: str) -> dict:
    """Cheap checks of a training export (``ospfn_export.json`` + the DiT's ``config.json`` and weights): the
    encoders it names are read later (``_export_encoders``)."""
    meta_file = path / EXPORT_FILE
    meta = _read_json_object(meta_file, EXPORT_FILE)
    unknown = set(meta) - {"model_type", "text_encoder", "vae", "defaults", "info", "adapter", "lora"}
    if unknown:
        raise CheckpointError(f"{who}: unknown key(s) {sorted(unknown)} in {meta_file}; allowed: adapter, defaults, info, lora, "
                              "model_type, text_encoder, vae")  # fmt: skip
    te, vae = meta.get("text_encoder"), meta.get("vae")
    if not isinstance(te, dict) or te.get("kind") not in ("tiny", "umt5", "qwen_vl"):
        raise CheckpointError(f"{who}: {meta_file}: text_encoder must be an object with kind 'tiny', 'umt5' or 'qwen_vl', got {te!r:.80}")
    if not isinstance(vae, dict) or vae.get("kind") not in ("pixel", "wan"):
        raise CheckpointError(f"{who}: {meta_file}: vae must be an object with kind 'pixel' or 'wan', got {vae!r:.80}")
    if meta.get("model_type", "flashi2v") not in LOAD_MODEL_TYPES:
        raise CheckpointError(f"{who}: {meta_file}: model_type must be one of {list(LOAD_MODEL_TYPES)}, got {meta['model_type']!r:.80}")
    if (te["kind"] == "qwen_vl") != (meta.get("model_type") == "uniworld"):
        raise CheckpointError(f"{who}: {meta_file}: a text_encoder of kind 'qwen_vl' goes with model_type 'uniworld' and only with it, "
                              f"got kind {te['kind']!r} and model_type {meta.get('model_type')!r}")  # fmt: skip
    if meta.get("model_type") == "uniworld":
        ad = meta.get("adapter")
        if not isinstance(ad, dict) or not isinstance(ad.get("file"), str) or not ad["file"] or "/" in ad["file"]:
            raise CheckpointError(f"{who}: {meta_file}: a uniworld export needs adapter {{'file': <a file name beside it>, ...}}, got {ad!r:.80}")
        lora = meta.get("lora")
        if lora is not None and (not isinstance(lora, str) or not lora or "/" in lora):
            raise CheckpointError(f"{who}: {meta_file}: lora must name a LoRA file beside it, got {lora!r:.80}")
    elif "adapter" in meta or "lora" in meta:
        raise CheckpointError(f"{who}: {meta_file}: adapter / lora belong to a uniworld export (model_type 'uniworld')")
    base = WAN_DEFAULTS if te["kind"] in ("umt5", "qwen_vl") else DEFAULTS  # Wan-family models: Wan's negative prompt
    defaults = _pipeline_defaults({**{k: base[k] for k in ("negative_prompt",)}, "scheduler": "euler", **meta.get("defaults", {})},
                                  f"{who}: {meta_file}", CheckpointError)  # fmt: skip
    absent = [n for n in ("config.json", "diffusion_pytorch_model.safetensors") if not (path / n).is_file()]
    if absent:
        raise CheckpointMissingError(f"{who}: {path} lacks {absent}: an incomplete export")
    spec = {"kind": "wan"} if vae["kind"] == "wan" else {k: v for k, v in vae.items() if k in ("kind", "spatial")}
    return {"cfg": load_config(path / "config.json"), "dit": path / "diffusion_pytorch_model.safetensors", "defaults": defaults,
            "vae_spec": spec, "meta": meta, "info": dict(meta.get("info", {}) if isinstance(meta.get("info"), dict) else {}),
            "model_type": meta.get("model_type")}  # fmt: skip


def _export_source(spec: dict, what: str, path: Path, who: str) -> Path:
    """The ``path`` an export's ``text_encoder`` / ``vae`` entry names, which must exist here."""
    redirect = f"(or load the Wan2.1 pipeline it was trained from with this DiT on top: load_pipeline(<Wan2.1 dir>, dit={str(path)!r}))"
    p = spec.get("path")
    if not isinstance(p, str) or not p:
        raise CheckpointError(f"{who}: {path / EXPORT_FILE}: {what}.path must name the weights the model was trained with, got {p!r:.80}")
    if not Path(p).exists():
        raise CheckpointMissingError(f"{who}: the {what} named by {path / EXPORT_FILE} is not here: {p} {redirect}")
    return Path(p)


def _export_encoders(parts: dict, path: Path, dev, text_dev, text_dtype, who: str):
    """(text encoder, VAE) of a training export: the tiny encoder saved beside the DiT, or the UMT5 / Wan VAE
    files the training config named (``text.path`` / ``vae.path``)."""
    meta = parts["meta"]
    te = meta["text_encoder"]

    def source(spec, what):
        return _export_source(spec, what, path, who)

    if te["kind"] == "tiny":
        if text_dtype is not None:
            raise ValueError(f"{who}: text_dtype is for the UMT5 encoder of Wan-family pipelines; the tiny text encoder of {path} runs in fp32")
        try:
            tcfg = TinyTextConfig(**{k: v for k, v in te.items() if k in ("text_dim", "text_len", "vocab", "heads")})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{who}: {path / EXPORT_FILE}: text_encoder: {e}") from None
        f = path / str(te.get("file", "text_encoder.safetensors"))
        if not f.is_file():
            raise CheckpointMissingError(f"{who}: {path} lacks {f.name}, the tiny text encoder {path / EXPORT_FILE} names")
        w = read_safetensors(f)
        _check_text_weights(w, tcfg, f"{who}: {f}", CheckpointError)
        text = TinyTextEncoder({k: v.float().to(text_dev) for k, v in w.items()}, tcfg)
    else:
        from ospfn.model.umt5 import UMT5TextEncoder

        p, tok = source(te, "text_encoder"), te.get("tokenizer")
        text_len = te.get("text_len", parts["cfg"].text_len)
        if p.is_dir():
            text = UMT5TextEncoder.from_pretrained(p, tokenizer=tok, dtype=text_dtype, device=text_dev, text_len=text_len)
        elif tok is None:
            raise CheckpointError(f"{who}: {path / EXPORT_FILE}: the UMT5 file {p} needs text_encoder.tokenizer (the google/umt5-xxl folder)")
        else:
            text = UMT5TextEncoder.from_wan(p, tok, dtype=text_dtype, device=text_dev, text_len=text_len)
    return text, _export_vae(parts, path, dev, who)


def _export_vae(parts: dict, path: Path, dev, who: str):
    """The VAE a training export names: the pixel VAE, or the Wan2.1 VAE of the recorded ``vae.path``."""
    vs = parts["meta"]["vae"]
    if vs["kind"] == "pixel":
        try:
            return _make_vae(parts["vae_spec"])
        except ValueError as e:
            raise CheckpointError(f"{who}: {path / EXPORT_FILE}: {e}") from None
    from ospfn.model.wan_vae import WanVAE

    p = _export_source(vs, "vae", path, who)
    return WanVAE.from_pretrained(p, device=dev) if p.is_dir() else WanVAE.from_wan(p, device=dev)


def _layout_vae(layout: str, parts: dict, path: Path, dev, vae_config, who: str):
    """The VAE of a pipeline directory of ``layout`` without its text encoder (a uniworld pipeline brings a VLM)."""
    if layout == "ospfn":
        return parts["vae"]
    if layout == "export":
        return _export_vae(parts, path, dev, who)
    from ospfn.model.wan_vae import WanVAE

    if layout == "diffusers":
        return WanVAE.from_pretrained(path, device=dev)
    return WanVAE.from_wan(path / WAN_VAE_FILE, config=vae_config, device=dev)


# -- the VLM context adapter of a uniworld pipeline -----------------------------------------------------------


def save_vlm_adapter(path, params: dict, cfg, *, metadata: Optional[dict] = None) -> Path:
    """Write a VLM context adapter (``ospfn.model.vlm`` names: ``adapter.*``, ``first_frame.*``, ``style_tokens``)
    as one fp32 safetensors file (atomically) with its ``VLMAdapterConfig`` as JSON in the metadata
    (``ospfn_vlm_adapter``), so ``load_vlm_adapter`` needs nothing else.  Checked first (``check_adapter_params``)."""
    from safetensors.torch import save_file

    from ospfn.model.vlm import VLMAdapterConfig, check_adapter_params

    if not isinstance(cfg, VLMAdapterConfig):
        raise TypeError(f"save_vlm_adapter: cfg must be a VLMAdapterConfig, got {type(cfg).__name__}")
    check_adapter_params(params, cfg, "save_vlm_adapter")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise TypeError("save_vlm_adapter: metadata must be a dict of str -> str or None")
    import dataclasses

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in params.items()}
    meta = {**(metadata or {}), ADAPTER_META_KEY: json.dumps(dataclasses.asdict(cfg), sort_keys=True)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


_ADAPTER_NAMES = ("adapter.", "first_frame.", "style_tokens")


def read_vlm_adapter(path, who: str = "read_vlm_adapter") -> tuple[dict, Optional[dict]]:
    """(tensors under ospfn's names, the ``VLMAdapterConfig`` fields recorded in the file or None) of an adapter
    file: an ospfn ``vlm_adapter.safetensors`` (``save_vlm_adapter``) or the released Uniworld-OSP2.0 adapter
    (``fc1.*`` / ``fc2.*``, a ``torch.save`` state dict or a safetensors file; ``convert_released_adapter``).
    ``CheckpointMissingError`` for a missing file, ``CheckpointError`` for anything else wrong, naming it."""
    from ospfn.model.umt5 import read_torch_state_dict
    from ospfn.model.vlm import convert_released_adapter

    path = Path(path)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "no such file"
        raise CheckpointMissingError(f"{who}: {path}: {what}; expected a VLM adapter file (vlm_adapter.safetensors, or the released "
                                     "adapter's .pt / .safetensors)")  # fmt: skip
    recorded = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(ADAPTER_META_KEY)
        except Exception as e:  # noqa: BLE001  (not a safetensors file)
            raise CheckpointError(f"{who}: {path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
        if raw is not None:
            try:
                recorded = json.loads(raw)
            except ValueError as e:
                raise CheckpointError(f"{who}: {path}: the {ADAPTER_META_KEY} metadata is not JSON ({e})") from None
            if not isinstance(recorded, dict):
                raise CheckpointError(f"{who}: {path}: the {ADAPTER_META_KEY} metadata must be an object, got {type(recorded).__name__}")
    try:
        sd = read_torch_state_dict(path, who)
    except FileNotFoundError as e:
        raise CheckpointMissingError(str(e)) from None
    if any(isinstance(k, str) and k.startswith(_ADAPTER_NAMES) for k in sd):
        unknown = sorted(str(k) for k in sd if not (isinstance(k, str) and k.startswith(_ADAPTER_NAMES)))
        if unknown:
            raise CheckpointError(f"{who}: {path}: unknown key(s) {unknown[:10]} beside ospfn's adapter names (adapter.*, first_frame.*, style_tokens)")
        bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point)
        if bad:
            raise CheckpointError(f"{who}: {path}: {bad[:10]} must be floating-point tensors")
        return {k: v.float() for k, v in sd.items()}, recorded
    return {k: v.float() for k, v in convert_released_adapter(sd, source=str(path)).items()}, recorded


def load_vlm_adapter(path, *, vlm_dim: Optional[int] = None, text_dim: Optional[int] = None,
                     latent_channels: Optional[int] = None, who: str = "load_vlm_adapter"):  # fmt: skip
    """(params, ``VLMAdapterConfig``) of an adapter file (``read_vlm_adapter``).  The config is the one recorded in
    the file, else read off the shapes (``adapter.0.weight`` [hidden, vlm_dim], ``adapter.2.weight`` [text_dim,
    hidden], ``first_frame.0.weight`` [hidden, C * 2 * 2], ``style_tokens`` [styles, n, text_dim]).  ``vlm_dim`` /
    ``text_dim`` / ``latent_channels`` (the VLM's width, the DiT's, the VAE's channels) are checked against it:
    ``CheckpointError`` naming the file and the mismatch."""
    from ospfn.model.vlm import VLMAdapterConfig, check_adapter_params

    params, recorded = read_vlm_adapter(path, who)
    if recorded is not None:
        try:
            cfg = VLMAdapterConfig(**recorded)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{who}: {path}: the recorded adapter config is not valid: {e}") from None
    else:
        try:
            w0, w2 = params["adapter.0.weight"], params["adapter.2.weight"]
            kw = {"vlm_dim": int(w0.shape[1]), "hidden_dim": int(w0.shape[0]), "text_dim": int(w2.shape[0])}
            if "first_frame.0.weight" in params:
                n = int(params["first_frame.0.weight"].shape[1])
                if n % 4:
                    raise ValueError(f"first_frame.0.weight has {n} input features, not C * 2 * 2")
                kw.update(first_frame_tokens=True, latent_channels=n // 4)
            elif latent_channels is not None:
                kw["latent_channels"] = int(latent_channels)
            if "style_tokens" in params:
                t = params["style_tokens"]
                kw.update(num_styles=int(t.shape[0]), style_tokens=int(t.shape[1]))
            cfg = VLMAdapterConfig(**kw)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise CheckpointError(f"{who}: {path}: cannot read an adapter configuration off its tensors: {type(e).__name__}: {e}") from None
    try:
        check_adapter_params(params, cfg, who)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{who}: {path}: {e}") from None
    bad = [f"{k} {getattr(cfg, k)} != {want}" for k, want in (("vlm_dim", vlm_dim), ("text_dim", text_dim)) if want is not None and getattr(cfg, k) != want]
    if cfg.first_frame_tokens and latent_channels is not None and cfg.latent_channels != latent_channels:
        bad.append(f"latent_channels {cfg.latent_channels} != {latent_channels}")
    if bad:
        raise CheckpointError(f"{who}: the adapter {path} does not fit (adapter vs model): {'; '.join(bad)}")
    return params, cfg


def _uniworld_parts(parts: dict, layout: str, path: Path, vlm, adapter, cfg: DiTConfig, vae, dev, text_dev, text_dtype, who: str):
    """(VLM encoder, adapter params on ``dev``, VLMAdapterConfig, info) of a uniworld pipeline: the VLM and the
    adapter the export names, or ``vlm=`` / ``adapter=``."""
    from ospfn.model.vlm import DEFAULT_IMAGE_SIZE, DEFAULT_MAX_CAPTION_TOKENS, DEFAULT_MAX_LENGTH, QwenVLEncoder

    meta = parts.get("meta") if layout == "export" else None
    te = meta["text_encoder"] if meta is not None and meta.get("model_type") == "uniworld" else None
    settings = {"text_only": False, "image_size": DEFAULT_IMAGE_SIZE, "max_caption_tokens": DEFAULT_MAX_CAPTION_TOKENS,
                "max_length": DEFAULT_MAX_LENGTH}  # fmt: skip
    if te is not None:
        settings = {"text_only": bool(te.get("text_only", False)), "image_size": tuple(te.get("image_size", DEFAULT_IMAGE_SIZE)),
                    "max_caption_tokens": int(te.get("max_caption_tokens", DEFAULT_MAX_CAPTION_TOKENS)),
                    "max_length": int(te.get("text_len", DEFAULT_MAX_LENGTH))}  # fmt: skip
    info = {}
    if vlm is None:
        p = te.get("path") if te is not None else None
        if te is None:
            raise ValueError(f"{who}: model_type='uniworld' needs vlm= (a local Qwen2.5-VL directory or an ospfn.model.vlm.QwenVLEncoder): "
                             f"{path} does not name one")  # fmt: skip
        if not isinstance(p, str) or not p:
            raise CheckpointError(f"{who}: {path / EXPORT_FILE} names no VLM (text_encoder.path is {p!r}); pass vlm=")
        if not Path(p).exists():
            raise CheckpointMissingError(f"{who}: the Qwen2.5-VL named by {path / EXPORT_FILE} is not here: {p} (pass vlm=<its directory>)")
        vlm = p
    if isinstance(vlm, (str, os.PathLike)):
        info["vlm"] = str(vlm)
        vlm = QwenVLEncoder.from_pretrained(vlm, device=text_dev, dtype=text_dtype, **settings)
    elif not (callable(getattr(vlm, "encode", None)) and isinstance(getattr(vlm, "vlm_dim", None), int)):
        raise TypeError(f"{who}: vlm must be a path to a local Qwen2.5-VL directory or an ospfn.model.vlm.QwenVLEncoder, got {type(vlm).__name__}")
    else:
        info["vlm"] = "given"
        if te is not None:  # an encoder built elsewhere must read images and captions as the training cache did
            have = {"text_only": getattr(vlm, "text_only", None), "image_size": tuple(getattr(vlm, "image_size", ()) or ()),
                    "max_caption_tokens": getattr(vlm, "max_caption_tokens", None), "max_length": getattr(vlm, "max_length", None)}  # fmt: skip
            bad = [f"{k}: {have[k]!r} vs {settings[k]!r}" for k in settings if have[k] != settings[k]]
            if bad:
                raise ValueError(f"{who}: vlm= does not read inputs as the model was trained ({path / EXPORT_FILE}): {'; '.join(bad)}")
    if adapter is None:
        if meta is None or meta.get("model_type") != "uniworld":
            raise ValueError(f"{who}: model_type='uniworld' needs adapter= (the trained VLM adapter file: vlm_adapter.safetensors or the "
                             f"released adapter); {path} does not name one")  # fmt: skip
        adapter = path / meta["adapter"]["file"]
        if not adapter.is_file():
            raise CheckpointMissingError(f"{who}: {path} lacks {adapter.name}, the VLM adapter {path / EXPORT_FILE} names")
    elif not isinstance(adapter, (str, os.PathLike)):
        raise TypeError(f"{who}: adapter must be a path to an adapter file, got {type(adapter).__name__}")
    info["adapter"] = str(adapter)
    params, acfg = load_vlm_adapter(adapter, vlm_dim=vlm.vlm_dim, text_dim=cfg.text_dim, latent_channels=vae.latent_channels, who=who)
    return vlm, {k: v.to(dev) for k, v in params.items()}, acfg, info


def _apply_model_type(cfg: DiTConfig, model_type: Optional[str], shapes: dict, source: Path, who: str) -> tuple[DiTConfig, bool]:
    """The DiT config for ``model_type`` on top of ``cfg`` and whether the FlashI2V branches must be created
    (the weights hold none), from the names and shapes of the DiT's weights (``shapes``)."""
    has_branches = "fourier_embedding.0.weight" in shapes or "learnable_proj.proj.0.weight" in shapes
    if has_branches:
        if model_type == "wan":
            raise CheckpointError(f"{who}: {source} holds the FlashI2V branches (fourier_embedding.*, learnable_proj.*), "
                                  "a FlashI2V model: use model_type='flashi2v' (or None)")  # fmt: skip
        proj = shapes.get("learnable_proj.proj.0.weight", ())
        cfg = cfg.replace(i2v="flashi2v", conv3x3x3_proj=len(proj) == 5 and proj[2] == 3)
    changes: dict = {}
    if model_type == "wan":
        changes = {"skiparse_model_type": "full", "sparse_ratio": 1, "num_full_blocks": 0, "i2v": "none", "conv3x3x3_proj": False}
    elif model_type == "osp-next":
        changes = _osp_next_settings(cfg.num_layers)
    elif model_type == "flashi2v" and not has_branches:
        changes = {"i2v": "flashi2v", "conv3x3x3_proj": cfg.conv3x3x3_proj if cfg.i2v == "flashi2v" else False}
    try:
        cfg = cfg.replace(**changes)
    except ValueError as e:
        raise ValueError(f"{who}: model_type={model_type!r} does not fit the DiT of {source}: {e}") from None
    return cfg, cfg.i2v == "flashi2v" and not has_branches


def load_pipeline(path=BUNDLED, *, model_type: Optional[str] = None, dit=None, dtype: Optional[torch.dtype] = None,
                  device=None, text_device=None, text_dtype=None, vae_config=None, text_offload: str = "none", vlm=None,
                  adapter=None) -> Pipeline:  # fmt: skip
    """Load a pipeline from a directory in one of three layouts (default: the bundled tiny FlashI2V model).

    * ``"diffusers"``: a diffusers Wan pipeline (``model_index.json``, ``transformer/``, ``vae/``,
      ``text_encoder/``, ``tokenizer/``, ``scheduler/``; e.g. ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``): the DiT's
      diffusers names are converted to Wan names, the UMT5 encoder and the Wan VAE come from the library models,
      the sampling shift and scheduler from ``scheduler/scheduler_config.json``;
    * ``"wan"``: a Wan original directory (``config.json``, the DiT shards and index, ``models_t5_umt5-xxl-enc-
      bf16.pth``, ``Wan2.1_VAE.pth``, ``google/umt5-xxl/``; e.g. ``Wan-AI/Wan2.1-T2V-14B``);
    * ``"ospfn"``: ospfn's own directory (``pipeline.json``; the bundled model, ``recipes/train.py`` exports of
      the tiny encoders);
    * ``"export"``: what ``recipes/train.py`` exports from a run on the real encoders (``ospfn_export.json``
      beside the DiT's ``config.json`` and weights): the UMT5 encoder and the Wan VAE are read from the paths
      the training config named (``text.path`` / ``vae.path``; when they are not on this machine, load the
      Wan2.1 pipeline with the DiT on top: ``load_pipeline(<Wan2.1 dir>, dit=<export dir>)``), the sampling
      defaults are the run's.

    The layout is recognised from the files (``detect_layout``).  ``dit`` (a path ``load_checkpoint`` reads: an
    OSP-Next ``model.pt`` or DCP directory, FlashI2V safetensors, ...) replaces the layout's DiT weights; its
    ``config.json``, when it has one, replaces the layout's DiT config.  ``model_type`` sets the model on top:

    * ``"wan"``: text-to-video with full attention (Wan2.1);
    * ``"osp-next"``: the same weights with OSP-Next's Skiparse schedule (``dual_end``, sparse ratio 2, 8 full
      blocks; fewer for models under 16 layers);
    * ``"flashi2v"``: the FlashI2V image-to-video model (``i2v="flashi2v"``).  Weights without the FlashI2V
      branches (Wan2.1-T2V) get them created with their zero-output initialisation (``add_flashi2v_branches``,
      seed 0), so the model starts as the T2V model;
    * ``"uniworld"``: Uniworld-OSP2.0 -- the FlashI2V model (as ``"flashi2v"``) conditioned through a frozen
      Qwen2.5-VL and a trained context adapter instead of the layout's text encoder (which is not loaded):
      ``vlm=`` a local Qwen2.5-VL directory (``QwenVLEncoder.from_pretrained`` on ``text_device`` in
      ``text_dtype``) or a ``QwenVLEncoder``, ``adapter=`` an adapter file (``load_vlm_adapter``: ospfn's
      ``vlm_adapter.safetensors`` or the released ``fc1`` / ``fc2`` file).  A uniworld training export
      (``recipes/train.py`` with ``text.kind: qwen_vl``) names both and is read as such without
      ``model_type``; ``vlm=`` / ``adapter=`` then replace what it names (a given encoder must read images and
      captions with the export's settings), and a LoRA trained with it (``lora`` in ``ospfn_export.json``) is
      merged into the DiT (``ospfn.lora.merge_lora``);
    * None: what the weights are (FlashI2V when they hold the branches; else ``"wan"``, or the ospfn
      directory's own config; ``"uniworld"`` for a uniworld export).

    A Wan-family pipeline samples 81 frames at 480 x 832 with 50 steps, guidance 5 and Wan's negative prompt;
    ``"wan"`` with the layout's scheduler (UniPC, shift 3 unless ``scheduler_config.json`` says otherwise),
    ``"osp-next"``, ``"flashi2v"`` and ``"uniworld"`` with Euler at shift 7, as they were released (a training
    export samples with the run's ``sample`` section).

    ``dtype`` / ``device`` place the DiT (None: the stored dtype, the CPU); the VAE is fp32 on ``device``; the
    text encoder lives on ``text_device`` (None: ``device``) in ``text_dtype`` (None: the stored dtype; UMT5
    only).  ``text_offload`` says what ``generate`` does with the UMT5 encoder once the prompts are encoded,
    before the DiT runs: ``"none"`` (keep it where it is), ``"cpu"`` (move it to the CPU; the next ``generate``
    moves it back first) or ``"release"`` (drop it: for one-shot scripts; a later ``generate`` raises).  The
    tiny text encoder has nothing to offload; a uniworld pipeline's VLM is offloaded the same way.  By hand: ``pipe.text.offload()`` / ``pipe.text.release()``.  ``vae_config``: the ``AutoencoderKLWan`` arguments of a Wan original directory's
    VAE file when it is not the released Wan2.1 VAE (dict, config.json or a directory holding one).

    Everything cheap is checked before any weights are read (files present, configs valid and in agreement,
    ``model_type`` / ``dit`` consistent with the weights' names); errors name the file.  ``FileNotFoundError``
    for a path that is no pipeline directory (it lists what the directory holds); ``CheckpointMissingError``
    (also a ``FileNotFoundError``) for a missing component; ``CheckpointError`` for a bad one.
    """
    who = "load_pipeline"
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{who}: path must be a str or os.PathLike, got {type(path).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"{who}: dtype must be a floating torch.dtype or None, got {dtype!r}")
    if model_type is not None and model_type not in LOAD_MODEL_TYPES:
        families = [t for t in LOAD_MODEL_TYPES if t != "uniworld"]
        raise ValueError(f"{who}: model_type must be one of {families} or None, got {model_type!r} (or 'uniworld': FlashI2V "
                         "conditioned through a Qwen2.5-VL, with vlm= and adapter=)")  # fmt: skip
    if dit is not None and not isinstance(dit, (str, os.PathLike)):
        raise TypeError(f"{who}: dit must be a path (str or os.PathLike) to a DiT checkpoint or None, got {type(dit).__name__}")
    dev = _check_device("cpu" if device is None else device, "device")
    text_dev = dev if text_device is None else _check_device(text_device, "text_device")
    path = Path(path)
    layout = detect_layout(path)
    if vae_config is not None and layout != "wan":
        raise ValueError(f"{who}: vae_config is for the VAE file of a Wan original directory; {path} is a {layout} pipeline")
    if not isinstance(text_offload, str) or text_offload not in TEXT_OFFLOAD:
        raise ValueError(f"{who}: text_offload must be one of {list(TEXT_OFFLOAD)}, got {text_offload!r:.80}")
    load = {"diffusers": _load_diffusers_layout, "wan": _load_wan_layout, "ospfn": _load_ospfn_layout, "export": _load_export_layout}[layout]
    parts = load(path, who)
    export_type = parts.get("model_type") if layout == "export" else None
    if export_type == "uniworld" and model_type not in (None, "uniworld"):
        raise ValueError(f"{who}: {path} is a uniworld export (a VLM-conditioned FlashI2V model); model_type={model_type!r} does not apply")
    uniworld = model_type == "uniworld" or export_type == "uniworld"
    if not uniworld and (vlm is not None or adapter is not None):
        raise ValueError(f"{who}: vlm= / adapter= are the VLM and the context adapter of model_type 'uniworld'; {path} is loaded as "
                         f"{model_type or 'what its weights are'} (pass model_type='uniworld')")  # fmt: skip
    if text_dtype is not None and layout == "ospfn" and not uniworld:
        raise ValueError(f"{who}: text_dtype is for the UMT5 encoder of Wan-family pipelines; the tiny text encoder of {path} runs in fp32")

    cfg, source = parts["cfg"], parts["dit"]
    if dit is not None:
        source = Path(dit)
        if not source.exists():
            raise FileNotFoundError(f"{who}: dit={str(dit)!r}: no such file or directory")
        own = source / "config.json" if source.is_dir() else source.parent / "config.json"
        if own.is_file():
            cfg = _dit_config_from(own, f"{who}: dit")
    shapes = checkpoint_shapes(source)
    cfg, create_branches = _apply_model_type(cfg, "flashi2v" if uniworld else model_type, shapes, source, who)

    adapter_params = acfg = None
    uni_info: dict = {}
    if uniworld:  # the layout's VAE; the VLM and the adapter instead of its text encoder
        vae = _layout_vae(layout, parts, path, dev, vae_config, who)
        if (cfg.in_dim, cfg.out_dim) != (vae.latent_channels,) * 2:
            raise CheckpointError(f"{who}: the DiT config of {source} has in_dim {cfg.in_dim}, out_dim {cfg.out_dim}; the VAE of {path} "
                                  f"has {vae.latent_channels} latent channels")  # fmt: skip
        text, adapter_params, acfg, uni_info = _uniworld_parts(parts, layout, path, vlm, adapter, cfg, vae, dev, text_dev, text_dtype, who)
    elif layout == "ospfn":
        vae, tcfg = parts["vae"], parts["text_cfg"]
        if cfg.text_dim != tcfg.text_dim or (cfg.in_dim, cfg.out_dim) != (vae.latent_channels,) * 2:
            raise CheckpointError(f"{who}: the DiT config of {source} (text_dim {cfg.text_dim}, in/out_dim {cfg.in_dim}/{cfg.out_dim}) "
                                  f"does not fit the pipeline's text encoder (text_dim {tcfg.text_dim}) and vae "
                                  f"({vae.latent_channels} latent channels)")  # fmt: skip
        text = TinyTextEncoder({k: v.to(text_dev) for k, v in parts["text_weights"].items()}, tcfg)
    elif layout == "export":
        text, vae = _export_encoders(parts, path, dev, text_dev, text_dtype, who)
        if text.text_dim != cfg.text_dim or (cfg.in_dim, cfg.out_dim) != (vae.latent_channels,) * 2:
            raise CheckpointError(f"{who}: the DiT config of {source} (text_dim {cfg.text_dim}, in/out_dim {cfg.in_dim}/{cfg.out_dim}) "
                                  f"does not fit the encoders {path / EXPORT_FILE} names (text_dim {text.text_dim}, "
                                  f"{vae.latent_channels} latent channels)")  # fmt: skip
    else:
        vae_channels = 16  # AutoencoderKLWan's z_dim; checked again on the loaded VAE
        if (cfg.in_dim, cfg.out_dim) != (vae_channels, vae_channels):
            raise CheckpointError(f"{who}: the DiT config of {source} has in_dim {cfg.in_dim}, out_dim {cfg.out_dim}; the Wan "
                                  f"VAE has {vae_channels} latent channels")  # fmt: skip
        from ospfn.model.umt5 import UMT5TextEncoder
        from ospfn.model.wan_vae import WanVAE

        if layout == "diffusers":
            text = UMT5TextEncoder.from_pretrained(path, dtype=text_dtype, device=text_dev, text_len=cfg.text_len)
            vae = WanVAE.from_pretrained(path, device=dev)
        else:
            text = UMT5TextEncoder.from_wan(path / WAN_T5_FILE, path / WAN_TOKENIZER_DIR, dtype=text_dtype, device=text_dev,
                                            text_len=cfg.text_len)  # fmt: skip
            vae = WanVAE.from_wan(path / WAN_VAE_FILE, config=vae_config, device=dev)
        if text.text_dim != cfg.text_dim:
            raise CheckpointError(f"{who}: the text encoder of {path} gives {text.text_dim}-dim features; the DiT config of "
                                  f"{source} expects text_dim {cfg.text_dim}")  # fmt: skip
        if vae.latent_channels != cfg.in_dim:
            raise CheckpointError(f"{who}: the VAE of {path} has {vae.latent_channels} latent channels; the DiT config of "
                                  f"{source} has in_dim {cfg.in_dim}")  # fmt: skip
    params = load_checkpoint(source, cfg, dtype=dtype, device=dev, init_missing="flashi2v" if create_branches else None)
    if uniworld and layout == "export" and dit is None and parts["meta"].get("lora"):  # trained with the adapter: merged in
        from ospfn.lora import load_lora
        from ospfn.lora.merge import merge_lora

        lora_file = path / parts["meta"]["lora"]
        if not lora_file.is_file():
            raise CheckpointMissingError(f"{who}: {path} lacks {lora_file.name}, the LoRA {path / EXPORT_FILE} names")
        params = merge_lora(params, load_lora(lora_file, cfg, device=dev))
        uni_info["lora"] = {"file": str(lora_file), "merged": True}

    if uniworld:
        kind = "uniworld"
    elif model_type is not None:
        kind = model_type
    elif layout == "ospfn":
        kind = "ospfn"
    elif layout == "export":
        kind = "flashi2v" if cfg.i2v == "flashi2v" else ("osp-next" if cfg.skiparse_model_type == "dual_end" else "wan")
    else:
        kind = "flashi2v" if cfg.i2v == "flashi2v" else "wan"
    defaults = parts["defaults"]
    if layout in ("diffusers", "wan") and kind in ("osp-next", "flashi2v", "uniworld"):
        defaults = {**defaults, **_METHOD_SAMPLING}
    info = {**parts.get("info", {}), "layout": layout, "path": str(path), "dit": None if dit is None else str(dit),
            "flashi2v_branches": None if cfg.i2v != "flashi2v" else ("initialised" if create_branches else "loaded"), **uni_info}  # fmt: skip
    return Pipeline(cfg=cfg, params=params, text=text, vae=vae, vae_spec=parts["vae_spec"], defaults=defaults,
                    model_type=kind, info=info, text_offload=text_offload, adapter=adapter_params, adapter_cfg=acfg)  # fmt: skip


def load_i2v_checkpoint(checkpoint, default: Path, purpose: str) -> "Pipeline":
    """The FlashI2V pipeline an evaluation recipe's ``--checkpoint`` names (``default`` when None), or
    ``ValueError`` with the message the recipe prints (naming ``--checkpoint``; ``purpose`` ends the text-to-video
    refusal, e.g. "this evaluation conditions on a first frame (FlashI2V)")."""
    ckpt = Path(checkpoint) if checkpoint is not None else Path(default)
    if not (ckpt / "pipeline.json").exists():
        raise ValueError(f"--checkpoint: {ckpt} is not a pipeline directory (expected pipeline.json, config.json and weights)")
    try:
        pipe = load_pipeline(ckpt)
    except (OSError, ValueError, KeyError) as e:  # CheckpointError is a ValueError
        raise ValueError(f"--checkpoint: cannot load the pipeline {ckpt}: {e}") from None
    if pipe.cfg.i2v != "flashi2v":
        raise ValueError(f"--checkpoint: {ckpt} is a text-to-video model; {purpose}")
    return pipe


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
