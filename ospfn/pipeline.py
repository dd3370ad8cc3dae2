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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ospfn._fs import atomic_path, write_text_atomic
from ospfn.model.checkpoint import load_checkpoint, save_checkpoint
from ospfn.model.config import DiTConfig
from ospfn.model.text import TinyTextConfig, TinyTextEncoder
from ospfn.model.vae import PixelVAE

__all__ = ["Pipeline", "load_pipeline", "save_pipeline", "BUNDLED"]

BUNDLED = Path(__file__).resolve().parent / "assets" / "tiny_flashi2v"

DEFAULTS = {"frames": 9, "size": [32, 32], "steps": 30, "guidance": 3.0, "shift": 3.0, "fourier_ratio": 0.1, "fps": 8,
            "negative_prompt": ""}  # fmt: skip


def _make_vae(spec: dict):
    kind = spec.get("kind")
    if kind == "pixel":
        return PixelVAE(int(spec.get("spatial", 4)))
    raise ValueError(f"pipeline: unknown vae kind {kind!r} (supported: 'pixel'; the Wan2.1 VAE plugs in behind ospfn.model.vae.VideoVAE)")


@dataclass
class Pipeline:
    cfg: DiTConfig
    params: dict[str, torch.Tensor]
    text: TinyTextEncoder
    vae: PixelVAE
    vae_spec: dict
    defaults: dict = field(default_factory=lambda: dict(DEFAULTS))

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            feats, _ = self.text.encode(prompts)
        return feats

    def check_image(self, image: torch.Tensor, size) -> None:
        if image.shape != (3, *size):
            raise ValueError(f"image must be [3, {size[0]}, {size[1]}] to match the requested size, got {tuple(image.shape)}")

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
        """A video [3, F, H, W] in [-1, 1].  ``image`` [3, H, W] in [-1, 1] is the first frame (I2V models).

        The noise comes from a CPU generator seeded with ``seed``: the same seed gives the same video.
        """
        from ospfn.sched import sample

        d = self.defaults
        frames = int(frames or d["frames"])
        size = tuple(size or d["size"])
        neg = d["negative_prompt"] if negative_prompt is None else negative_prompt
        st, sh, sw = self.vae.stride
        if size[0] % (sh * self.cfg.patch_size[1]) or size[1] % (sw * self.cfg.patch_size[2]):
            raise ValueError(f"size {size} must be a multiple of {sh * self.cfg.patch_size[1]} (VAE stride x patch)")
        t_lat = (frames - 1) // st + 1
        shape = (1, self.vae.latent_channels, t_lat, size[0] // sh, size[1] // sw)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))
        ctx = self.encode_prompts([prompt])
        neg_ctx = self.encode_prompts([neg])
        cond = None
        if self.cfg.i2v == "flashi2v":
            if image is None:
                raise ValueError("generate: this is an image-to-video model; pass image=[3, H, W] in [-1, 1]")
            self.check_image(image, size)
            cond = self.vae.encode(image[None, :, None].float())
        z = sample(
            self.params, self.cfg, noise=noise, context=ctx, neg_context=neg_ctx,
            guidance=float(guidance if guidance is not None else d["guidance"]),
            steps=int(steps or d["steps"]), shift=float(shift if shift is not None else d["shift"]),
            cond_image_latent=cond, fourier_ratio=float(fourier_ratio if fourier_ratio is not None else d["fourier_ratio"]),
            callback=callback,
        )  # fmt: skip
        return self.vae.decode(z)[0].clamp(-1, 1)


def load_pipeline(path=BUNDLED, *, dtype: Optional[torch.dtype] = None, device="cpu") -> Pipeline:
    """Load a pipeline directory (default: the bundled tiny FlashI2V model)."""
    path = Path(path)
    meta_file = path / "pipeline.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"load_pipeline: {path} is not a pipeline directory (no pipeline.json)")
    meta = json.loads(meta_file.read_text())
    unknown = set(meta) - {"text_encoder", "vae", "defaults", "info"}
    if unknown:
        raise ValueError(f"load_pipeline: unknown key(s) {sorted(unknown)} in {meta_file}")
    cfg = DiTConfig.from_dict(json.loads((path / "config.json").read_text()))
    params = load_checkpoint(path / "diffusion_pytorch_model.safetensors", cfg, dtype=dtype, device=device)
    te = meta["text_encoder"]
    if te.get("kind") != "tiny":
        raise ValueError(f"load_pipeline: unknown text_encoder kind {te.get('kind')!r} in {meta_file} (supported: 'tiny')")
    tcfg = TinyTextConfig(**{k: v for k, v in te.items() if k != "kind"})
    from safetensors.torch import load_file

    text = TinyTextEncoder({k: v.to(device) for k, v in load_file(path / "text_encoder.safetensors").items()}, tcfg)
    defaults = {**DEFAULTS, **meta.get("defaults", {})}
    return Pipeline(cfg, params, text, _make_vae(meta["vae"]), meta["vae"], defaults)


def save_pipeline(path, *, cfg: DiTConfig, params: dict, text_params: dict, text_cfg: TinyTextConfig, vae: dict,
                  defaults: Optional[dict] = None, info: Optional[dict] = None) -> Path:  # fmt: skip
    """Write a pipeline directory (every file atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_checkpoint(params, path / "diffusion_pytorch_model.safetensors")
    with atomic_path(path / "text_encoder.safetensors") as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in text_params.items()}, tmp)
    meta = {"text_encoder": {"kind": "tiny", **{k: getattr(text_cfg, k) for k in ("text_dim", "text_len", "vocab", "heads")}},
            "vae": vae, "defaults": {**DEFAULTS, **(defaults or {})}, "info": info or {}}  # fmt: skip
    for name, obj in (("config.json", cfg.to_dict()), ("pipeline.json", meta)):
        write_text_atomic(path / name, json.dumps(obj, indent=2) + "\n")
    return path
