"""Video VAEs behind one small interface, and a lossless pixel "VAE" for the tiny model.

Interface (``VideoVAE``): ``encode(video [B, 3, F, H, W] in [-1, 1]) -> latents [B, C, T_lat, h, w]`` and
``decode(latents) -> video``, with ``latent_channels`` and ``stride`` (t, h, w).  The Wan2.1 causal VAE
(time 4, space 8, 16 channels; T_lat = (F - 1)/4 + 1) plugs in behind it.  For FlashI2V the condition is
frame 0 encoded on its own: ``encode(video[:, :, :1])``.

``PixelVAE(s)`` is space-to-depth: each s x s patch of RGB becomes 3*s*s channels, frames map 1:1.  It is
exactly invertible, so the tiny model's pipeline is tested without a learned autoencoder.

    >>> import torch
    >>> vae = PixelVAE(4)
    >>> v = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    >>> z = vae.encode(v)
    >>> z.shape, torch.equal(vae.decode(z), v)
    (torch.Size([1, 48, 5, 8, 8]), True)
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["VideoVAE", "PixelVAE"]


class VideoVAE(Protocol):
    latent_channels: int
    stride: tuple[int, int, int]

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class PixelVAE:
    """Lossless space-to-depth: [B, 3, F, H, W] <-> [B, 3*s*s, F, H/s, W/s]; channel order (c, dy, dx)."""

    def __init__(self, spatial: int = 4) -> None:
        if isinstance(spatial, bool) or not isinstance(spatial, int) or spatial < 1:
            raise ValueError(f"PixelVAE: spatial must be a positive int, got {spatial!r}")
        self.s = spatial
        self.latent_channels = 3 * spatial * spatial
        self.stride = (1, spatial, spatial)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"PixelVAE.encode: video must be [B, 3, F, H, W], got {getattr(video, 'shape', type(video).__name__)}")
        B, C, F_, H, W = video.shape
        s = self.s
        if H % s or W % s:
            raise ValueError(f"PixelVAE.encode: H and W must be multiples of {s}, got {H}x{W}")
        z = video.reshape(B, C, F_, H // s, s, W // s, s).permute(0, 1, 4, 6, 2, 3, 5)
        return z.reshape(B, C * s * s, F_, H // s, W // s).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise ValueError(f"PixelVAE.decode: latents must be [B, {self.latent_channels}, T, h, w], "
                             f"got {getattr(latents, 'shape', type(latents).__name__)}")  # fmt: skip
        B, Cz, F_, h, w = latents.shape
        s = self.s
        if Cz != self.latent_channels:
            raise ValueError(f"PixelVAE.decode: latents must have {self.latent_channels} channels, got {Cz}")
        v = latents.reshape(B, 3, s, s, F_, h, w).permute(0, 1, 4, 5, 2, 6, 3)
        return v.reshape(B, 3, F_, h * s, w * s).contiguous()
