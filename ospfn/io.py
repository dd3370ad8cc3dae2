"""Reading images and writing videos / frame strips ([-1, 1] float tensors <-> files)."""

from __future__ import annotations

from pathlib import Path

import torch

from ospfn._fs import atomic_path

__all__ = ["read_image", "write_mp4", "write_strip_png", "to_uint8"]


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [0, 255] (rounded, clamped)."""
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def read_image(path, *, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An RGB image file as float [3, H, W] in [-1, 1]; ``size`` (H, W) must match exactly when given."""
    from PIL import Image

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image not found: {p}")
    with Image.open(p) as im:
        im = im.convert("RGB")
        w, h = im.size
        if size is not None and (h, w) != tuple(size):
            raise ValueError(f"image {p} is {h}x{w} (HxW) but the model generates {size[0]}x{size[1]}; resize it or pass --size {h}x{w}")
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1


def _upscale(frames: torch.Tensor, scale: int) -> torch.Tensor:
    return frames.repeat_interleave(scale, -2).repeat_interleave(scale, -1) if scale > 1 else frames


def write_mp4(path, video: torch.Tensor, *, fps: int = 8, scale: int = 1) -> Path:
    """Write [3, F, H, W] in [-1, 1] as H.264 mp4 (nearest-neighbour upscaled by ``scale``), atomically."""
    import av

    path = Path(path)
    frames = to_uint8(video).permute(1, 2, 3, 0)  # [F, H, W, 3]
    if scale > 1:
        frames = frames.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    F_, H, W, _ = frames.shape
    pad_h, pad_w = H % 2, W % 2  # yuv420p needs even sizes
    if pad_h or pad_w:
        frames = torch.nn.functional.pad(frames.permute(0, 3, 1, 2), (0, pad_w, 0, pad_h), mode="replicate").permute(0, 2, 3, 1)
    with atomic_path(path, suffix=".mp4") as tmp:
        with av.open(tmp, mode="w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "12"}
            for f in frames:
                for pkt in stream.encode(av.VideoFrame.from_ndarray(f.contiguous().numpy(), format="rgb24")):
                    out.mux(pkt)
            for pkt in stream.encode():
                out.mux(pkt)
    return path


def write_strip_png(path, video: torch.Tensor, *, scale: int = 1) -> Path:
    """Write the frames of [3, F, H, W] side by side as one PNG (upscaled by ``scale``), atomically."""
    from PIL import Image

    path = Path(path)
    frames = to_uint8(video)  # [3, F, H, W]
    strip = torch.cat(list(frames.unbind(1)), dim=-1)  # [3, H, F*W]
    strip = _upscale(strip, scale).permute(1, 2, 0).contiguous()
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(strip.numpy()).save(tmp, format="PNG")
    return path
