"""The Wan2.1 causal video VAE behind the ``VideoVAE`` interface (diffusers ``AutoencoderKLWan``).

``WanVAE.encode(video [B, 3, F, H, W] in [-1, 1])`` returns the posterior mean (no sampling) normalised per
channel with the VAE config's ``latents_mean`` / ``latents_std``: ``z = (mu - mean) / std``, shape
``[B, 16, (F - 1) / 4 + 1, H / 8, W / 8]``.  ``decode(z)`` undoes the normalisation (``z * std + mean``), runs
the decoder and clamps the video to [-1, 1].  F must be 4k + 1 (frame 0 alone, then chunks of 4) and H, W
multiples of 8; anything else raises ``ValueError`` naming the shape.  Both return float32 on the VAE's device;
the VAE itself runs in its own dtype (fp32 by default, bf16 / fp16 allowed).

Options: ``tiling`` (the library's spatial tiling, default tiles of 256 px every 192 px, for large frames) and
``slicing`` (one video of the batch at a time).

Two layouts are read:

* ``from_pretrained(path)``: a diffusers pipeline directory (``vae/``) or a ``vae`` directory;
* ``from_wan(pth)``: Wan's original ``Wan2.1_VAE.pth`` through diffusers' own Wan-VAE conversion
  (``convert_wan_vae_to_diffusers``), with the Wan2.1 VAE config unless another one is given.

diffusers' conversion table is written for the released Wan2.1 VAE (three residual blocks and one upsampler per
decoder level, a channel-changing shortcut only in the second level).  ``wan_vae_to_diffusers`` first renumbers
the decoder's flat ``upsamples`` list of any other config (fewer residual blocks per level, shortcuts in other
levels: the small test configs) into that layout, so one table serves both; for the released file the
renumbering is the identity.  diffusers is an optional dependency, imported only when a VAE is built.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch

from ospfn.model.checkpoint import CheckpointError
from ospfn.model.umt5 import _free_accelerator, _natural, _require, read_torch_state_dict

__all__ = ["WanVAE", "wan_vae_to_diffusers"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
_CLASS = "AutoencoderKLWan"


def _diffusers_vae_class():
    diffusers = _require("diffusers", "diffusers", "WanVAE")
    return diffusers.AutoencoderKLWan


def _check_dtype(dtype, who: str) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype, dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{who}: dtype must be torch.float32, torch.bfloat16 or torch.float16 (or 'fp32' / 'bf16' / 'fp16'), got {dtype!r}")
    return dtype


def _pair(value, name: str, who: str) -> tuple[int, int]:
    v = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
        raise ValueError(f"{who}: {name} must be a positive int or a (height, width) pair of positive ints, got {value!r}")
    return int(v[0]), int(v[1])


# ----------------------------------------------------------------------------------------------------------
# Wan original names -> diffusers names


def _decoder_layout(config: dict) -> Optional[dict[int, tuple[int, str, int]]]:
    """Wan's flat ``decoder.upsamples`` index -> (level, "res" | "up", position in level), or None when the
    config puts attention blocks in the decoder levels (no renumbering then)."""
    if config.get("attn_scales"):
        return None
    levels, per_level = len(config["dim_mult"]), int(config["num_res_blocks"]) + 1
    layout, i = {}, 0
    for level in range(levels):
        for j in range(per_level):
            layout[i] = (level, "res", j)
            i += 1
        if level != levels - 1:
            layout[i] = (level, "up", 0)
            i += 1
    return layout


def wan_vae_to_diffusers(sd: dict, config: Optional[dict] = None) -> dict:
    """Rename a Wan original VAE state dict (``Wan2.1_VAE.pth`` names) to diffusers ``AutoencoderKLWan`` names.

    ``config`` holds the ``AutoencoderKLWan`` arguments (``dim_mult``, ``num_res_blocks``, ``attn_scales``; the
    Wan2.1 defaults when None).  The names are converted by diffusers' ``convert_wan_vae_to_diffusers``; this
    function only renumbers the decoder's flat block list of configs other than the released one into the
    layout that table expects (see the module docstring).  Keys already in diffusers naming pass through."""
    single_file_utils = _require("diffusers.loaders.single_file_utils", "diffusers", "wan_vae_to_diffusers")
    config = {} if config is None else config
    cfg = {"dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": []}
    cfg.update({k: config[k] for k in cfg if k in config})
    levels, per_level = len(cfg["dim_mult"]), int(cfg["num_res_blocks"]) + 1
    if levels > 4 or per_level > 3:
        raise ValueError(f"wan_vae_to_diffusers: diffusers' Wan VAE conversion covers decoders of at most 4 levels with at most "
                         f"2 residual blocks (+1) per level; got dim_mult={cfg['dim_mult']} num_res_blocks={cfg['num_res_blocks']}")
    layout = _decoder_layout(cfg)
    canon: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key)
        if m is None or layout is None or int(m.group(1)) not in layout:
            canon[key] = value
            continue
        level, kind, j = layout[int(m.group(1))]
        rest = m.group(2)
        if kind == "up":
            canon[f"decoder.upsamples.{4 * level + 3}.{rest}"] = value
        elif rest.startswith("shortcut.") and (level, j) != (1, 0):
            # the library's table names a decoder shortcut only where Wan2.1 has one (level 1, first block)
            canon[f"decoder.up_blocks.{level}.resnets.{j}.conv_shortcut.{rest[len('shortcut.'):]}"] = value
        else:
            canon[f"decoder.upsamples.{4 * level + j}.{rest}"] = value
    return single_file_utils.convert_wan_vae_to_diffusers(canon)


def _load_config(config, who: str) -> dict:
    """AutoencoderKLWan arguments from None (the Wan2.1 defaults), a dict, a config.json or a directory holding one."""
    if config is None:
        return {}
    if isinstance(config, dict):
        cfg = dict(config)
    elif isinstance(config, (str, Path)):
        p = Path(config)
        if p.is_dir():
            p = p / "vae" / "config.json" if (p / "vae" / "config.json").is_file() else p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"{who}: config {config} is not a config.json nor a directory holding one")
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{who}: {p} is not valid JSON: {e}") from e
        if not isinstance(cfg, dict):
            raise ValueError(f"{who}: {p} must hold a JSON object, got {type(cfg).__name__}")
    else:
        raise TypeError(f"{who}: config must be None, a dict or a path to a config.json / directory, got {type(config).__name__}")
    cls = cfg.get("_class_name", _CLASS)
    if cls != _CLASS:
        raise ValueError(f"{who}: the config describes a {cls!r}, not an {_CLASS}")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# the VAE


class WanVAE:
    """``VideoVAE`` over a diffusers ``AutoencoderKLWan``: normalised posterior-mean latents, clamped decode."""

    def __init__(self, model, *, tiling: bool = False, tile_size=256, tile_stride=192, slicing: bool = False) -> None:
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "latents_mean") or not hasattr(cfg, "z_dim"):
            raise TypeError(f"WanVAE: model must be a diffusers AutoencoderKLWan, got {type(model).__name__}")
        self.model = model.eval()
        self.latent_channels = int(cfg.z_dim)
        patch = int(getattr(cfg, "patch_size", None) or 1)
        levels = len(cfg.dim_mult)
        t = 2 ** sum(bool(x) for x in list(cfg.temperal_downsample)[: levels - 1])
        s = 2 ** (levels - 1) * patch
        self.stride = (t, s, s)
        mean = torch.tensor(list(cfg.latents_mean), dtype=torch.float32)
        std = torch.tensor(list(cfg.latents_std), dtype=torch.float32)
        if mean.numel() != self.latent_channels or std.numel() != self.latent_channels:
            raise ValueError(f"WanVAE: latents_mean / latents_std must have z_dim={self.latent_channels} values, "
                             f"got {mean.numel()} / {std.numel()}")
        if not bool((std > 0).all()):
            raise ValueError(f"WanVAE: latents_std must be positive, got {std.tolist()}")
        self.latents_mean = mean.view(1, -1, 1, 1, 1)
        self.latents_std = std.view(1, -1, 1, 1, 1)
        self.set_tiling(tiling, tile_size=tile_size, tile_stride=tile_stride)
        self.set_slicing(slicing)

    # -- options / state --------------------------------------------------------------------------------

    def set_tiling(self, enabled: bool, *, tile_size=256, tile_stride=192) -> "WanVAE":
        """Spatial tiling of encode and decode (the library's): tiles of ``tile_size`` px started every
        ``tile_stride`` px (an int or a (height, width) pair, multiples of the spatial stride, stride <= size);
        frames no larger than one tile are not tiled."""
        who = "WanVAE.set_tiling"
        s = self.stride[1]
        th, tw = _pair(tile_size, "tile_size", who)
        sh, sw = _pair(tile_stride, "tile_stride", who)
        if any(v % s for v in (th, tw, sh, sw)):
            raise ValueError(f"{who}: tile_size {(th, tw)} and tile_stride {(sh, sw)} must be multiples of the spatial stride {s}")
        if sh > th or sw > tw:
            raise ValueError(f"{who}: tile_stride {(sh, sw)} must not exceed tile_size {(th, tw)} (tiles must touch or overlap)")
        self.tiling, self.tile_size, self.tile_stride = bool(enabled), (th, tw), (sh, sw)
        if self.tiling:
            self.model.enable_tiling(tile_sample_min_height=th, tile_sample_min_width=tw,
                                     tile_sample_stride_height=sh, tile_sample_stride_width=sw)
        else:
            self.model.disable_tiling()
        return self

    def set_slicing(self, enabled: bool) -> "WanVAE":
        """Encode / decode one video of the batch at a time."""
        self.slicing = bool(enabled)
        (self.model.enable_slicing if self.slicing else self.model.disable_slicing)()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype=None) -> "WanVAE":
        """Move (and optionally cast) the weights; returns self."""
        if dtype is not None:
            dtype = _check_dtype(dtype, "WanVAE.to")
        self.model.to(device=device, dtype=dtype)
        return self

    def offload(self) -> "WanVAE":
        """Move the weights to the CPU and return the accelerator's cached memory; ``to(device)`` undoes it."""
        was = self.device
        self.model.to("cpu")
        _free_accelerator(was)
        return self

    # -- encode / decode --------------------------------------------------------------------------------

    def _check_video(self, video, who: str) -> None:
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            raise ValueError(f"{who}: video must be a 5-d tensor [B, 3, F, H, W], got {getattr(video, 'shape', type(video).__name__)}")
        B, C, F_, H, W = video.shape
        t, s, _ = self.stride
        if C != 3:
            raise ValueError(f"{who}: video must have 3 (RGB) channels in dim 1, got shape {tuple(video.shape)}")
        if not video.is_floating_point():
            raise ValueError(f"{who}: video must be a floating tensor in [-1, 1], got {video.dtype}")
        if F_ < 1 or (F_ - 1) % t:
            ok = [1 + t * k for k in range(4)]
            raise ValueError(f"{who}: the number of frames F must be {t}k + 1 ({', '.join(map(str, ok))}, ...) for the causal time "
                             f"stride {t}; got F={F_} (video shape {tuple(video.shape)})")
        if H % s or W % s or H == 0 or W == 0:
            raise ValueError(f"{who}: H and W must be positive multiples of {s}, got {H}x{W} (video shape {tuple(video.shape)})")

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> normalised latents [B, 16, (F - 1)/4 + 1, H/8, W/8] (float32)."""
        self._check_video(video, "WanVAE.encode")
        device, dtype = self.device, self.dtype
        with torch.no_grad():
            mu = self.model.encode(video.to(device=device, dtype=dtype)).latent_dist.mean
            return (mu.float() - self.latents_mean.to(device)) / self.latents_std.to(device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, T, h, w] -> video [B, 3, 4(T - 1) + 1, 8h, 8w] in [-1, 1] (float32)."""
        who = "WanVAE.decode"
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise ValueError(f"{who}: latents must be a 5-d tensor [B, {self.latent_channels}, T, h, w], "
                             f"got {getattr(latents, 'shape', type(latents).__name__)}")
        if latents.shape[1] != self.latent_channels:
            raise ValueError(f"{who}: latents must have {self.latent_channels} channels in dim 1, got shape {tuple(latents.shape)}")
        if not latents.is_floating_point() or min(latents.shape[2:]) < 1:
            raise ValueError(f"{who}: latents must be a non-empty floating tensor, got {latents.dtype} {tuple(latents.shape)}")
        device, dtype = self.device, self.dtype
        with torch.no_grad():
            z = latents.to(device=device, dtype=torch.float32) * self.latents_std.to(device) + self.latents_mean.to(device)
            video = self.model.decode(z.to(dtype)).sample
            return video.float().clamp_(-1.0, 1.0)

    # -- constructors -----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, dtype=torch.float32, device="cpu", tiling: bool = False, tile_size=256,
                        tile_stride=192, slicing: bool = False) -> "WanVAE":
        """From a diffusers pipeline directory (``vae/`` inside) or a ``vae`` directory.  Local files only."""
        who = "WanVAE.from_pretrained"
        dtype = _check_dtype(dtype, who)
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{who}: no such directory: {path} (expected a diffusers pipeline directory or its vae/)")
        vae_dir = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (vae_dir / "config.json").is_file():
            raise FileNotFoundError(f"{who}: {path} has neither vae/config.json (a diffusers pipeline) nor config.json (a vae directory)")
        _load_config(vae_dir, who)  # the class check
        AutoencoderKLWan = _diffusers_vae_class()
        try:
            model = AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{who}: cannot read an {_CLASS} from {vae_dir}: {e}") from e
        return cls(model.to(device), tiling=tiling, tile_size=tile_size, tile_stride=tile_stride, slicing=slicing)

    @classmethod
    def from_wan(cls, pth_path, *, config: Union[None, dict, str, Path] = None, dtype=torch.float32, device="cpu",
                 tiling: bool = False, tile_size=256, tile_stride=192, slicing: bool = False) -> "WanVAE":
        """From Wan's original ``Wan2.1_VAE.pth``.  ``config``: the ``AutoencoderKLWan`` arguments as a dict, a
        config.json or a directory holding one (None: the Wan2.1 VAE, the class defaults).  The weights are
        memory-mapped and assigned without a random initialisation; every missing, unexpected or mis-shaped key
        is reported in one ``CheckpointError``."""
        who = "WanVAE.from_wan"
        dtype = _check_dtype(dtype, who)
        cfg = _load_config(config, who)
        sd = read_torch_state_dict(pth_path, who)
        AutoencoderKLWan = _diffusers_vae_class()
        with torch.device("meta"):
            model = AutoencoderKLWan.from_config(cfg)
        converted = wan_vae_to_diffusers(sd, dict(model.config))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(converted), key=_natural)
        unexpected = sorted(set(converted) - set(expected), key=_natural)
        shapes = [f"{k} {tuple(converted[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                  if k in converted and tuple(converted[k].shape) != tuple(v.shape)]
        if missing or unexpected or shapes:
            raise CheckpointError(
                f"{who}: {pth_path} does not match the {_CLASS} config (after diffusers' Wan VAE conversion): "
                f"{len(missing)} missing {missing[:12]}, {len(unexpected)} unexpected {unexpected[:12]}, "
                f"{len(shapes)} mis-shaped {shapes[:6]}"
            )
        model.load_state_dict(converted, strict=True, assign=True)
        model.to(device=device, dtype=dtype)
        return cls(model, tiling=tiling, tile_size=tile_size, tile_stride=tile_stride, slicing=slicing)
