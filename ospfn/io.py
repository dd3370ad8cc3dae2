"""Reading images and writing videos / frame strips ([-1, 1] float tensors <-> files).

Layouts and ranges (every function checks its input before it writes anything and names what it expects):

* a video is ``[3, F, H, W]``: channels first, RGB, F frames of H x W (not ``[F, H, W, 3]``);
* an image is ``[3, H, W]``, channels first, RGB;
* values are floats in [-1, 1] (what the models produce and take), or ``torch.uint8`` in 0..255, which is
  converted exactly (never read as if it were in [-1, 1]).  Floats slightly outside [-1, 1] (a sampler's
  overshoot) are clamped; floats beyond +-``FLOAT_LIMIT`` (e.g. a 0..255 video stored as float) or NaN / Inf
  are refused, since clamping would silently write a white or black video.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ospfn._fs import atomic_path

__all__ = ["read_image", "write_mp4", "write_strip_png", "to_uint8", "FLOAT_LIMIT"]

FLOAT_LIMIT = 1.5  # |value| of a float video beyond this is not a [-1, 1] video
_VIDEO = "[3, F, H, W] (channels first, RGB)"
_RANGE = "floats in [-1, 1] or uint8 in 0..255"


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 [0, 255] (rounded, clamped); a uint8 tensor (0..255) is returned as it is.

    Any shape.  ``TypeError`` for another dtype, ``ValueError`` for NaN / Inf or float values beyond
    +-``FLOAT_LIMIT`` (not a [-1, 1] video: a 0..255 video must be passed as uint8).

    >>> to_uint8(torch.tensor([-1.0, 0.0, 1.0, 1.2])).tolist()
    [0, 128, 255, 255]
    >>> to_uint8(torch.tensor([0, 128, 255], dtype=torch.uint8)).tolist()
    [0, 128, 255]
    """
    return _to_uint8(video, "to_uint8", "video")


def _to_uint8(video, fn: str, arg: str) -> torch.Tensor:
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{fn}: {arg} must be a torch.Tensor of {_RANGE}, got {type(video).__name__}")
    v = video.detach()
    if v.dtype == torch.uint8:
        return v.cpu()
    if not v.dtype.is_floating_point:
        raise TypeError(f"{fn}: {arg} must hold {_RANGE}, got dtype {v.dtype}")
    v = v.float()
    if v.numel():
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{fn}: {arg} holds NaN or Inf; expected {_RANGE}")
        lo, hi = (float(a) for a in torch.aminmax(v))
        if lo < -FLOAT_LIMIT or hi > FLOAT_LIMIT:
            raise ValueError(f"{fn}: {arg} values must be in [-1, 1] for a float tensor, got min {lo:g}, max {hi:g} "
                             "(a 0..255 video or image must be torch.uint8)")  # fmt: skip
    return ((v.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _check_video(video, fn: str) -> torch.Tensor:
    """uint8 [3, F, H, W] on the CPU from a video in either accepted range."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{fn}: video must be a torch.Tensor {_VIDEO} of {_RANGE}, got {type(video).__name__}")
    if video.dim() != 4 or video.shape[0] != 3:
        hint = " (channels last? pass video.permute(3, 0, 1, 2))" if video.dim() == 4 and video.shape[-1] == 3 else ""
        raise ValueError(f"{fn}: video must be {_VIDEO}, got shape {tuple(video.shape)}{hint}")
    if min(video.shape[1:]) < 1:
        raise ValueError(f"{fn}: video must have F, H, W >= 1 ({_VIDEO}), got shape {tuple(video.shape)}")
    return _to_uint8(video, fn, "video")


def _check_scale(scale, fn: str) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int):
        raise TypeError(f"{fn}: scale must be an int >= 1 (nearest-neighbour upscaling factor), got {type(scale).__name__}")
    if not 1 <= scale <= 64:
        raise ValueError(f"{fn}: scale must be an int in [1, 64] (nearest-neighbour upscaling factor), got {scale}")
    return scale


def _check_path(path, fn: str, arg: str = "path") -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: {arg} must be a file path (str or os.PathLike), got {type(path).__name__}")
    return Path(path)


def read_image(path, *, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An RGB image file as float [3, H, W] in [-1, 1]; ``size`` (H, W) must match exactly when given.

    ``FileNotFoundError`` for a missing file, ``ValueError`` for a file that is not an image, a ``size`` that
    is not a pair of positive ints or an image of another size.
    """
    fn = "read_image"
    p = _check_path(path, fn)
    if size is not None:
        ok = isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size)
        if not ok:
            raise ValueError(f"{fn}: size must be None or (H, W), a pair of positive ints, got {size!r}")
    if not p.exists():
        raise FileNotFoundError(f"{fn}: image not found: {p}")
    if not p.is_file():
        raise ValueError(f"{fn}: {p} is not a file (an image file is expected)")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(h, w, 3)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL raises these for garbage / truncated files
        raise ValueError(f"{fn}: {p} is not an image file PIL can read ({type(e).__name__}: {e})") from e
    if size is not None and (h, w) != tuple(size):
        raise ValueError(f"{fn}: image {p} is {h}x{w} (HxW) but the model generates {size[0]}x{size[1]}; resize it or pass --size {h}x{w}")
    return data.permute(2, 0, 1).float() / 127.5 - 1


def _upscale(frames: torch.Tensor, scale: int) -> torch.Tensor:
    return frames.repeat_interleave(scale, -2).repeat_interleave(scale, -1) if scale > 1 else frames


def write_mp4(path, video: torch.Tensor, *, fps: int = 8, scale: int = 1) -> Path:
    """Write ``video`` [3, F, H, W] (floats in [-1, 1] or uint8 0..255) as H.264 mp4, nearest-neighbour upscaled by
    ``scale``, atomically.  ``fps``: an int in [1, 240]; ``scale``: an int in [1, 64]."""
    fn = "write_mp4"
    path = _check_path(path, fn)
    if isinstance(fps, bool) or not isinstance(fps, int):
        raise TypeError(f"{fn}: fps must be an int in [1, 240], got {type(fps).__name__}")
    if not 1 <= fps <= 240:
        raise ValueError(f"{fn}: fps must be an int in [1, 240], got {fps}")
    scale = _check_scale(scale, fn)
    frames = _check_video(video, fn).permute(1, 2, 3, 0)  # [F, H, W, 3]
    import av

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
    """Write the frames of ``video`` [3, F, H, W] (floats in [-1, 1] or uint8 0..255) side by side as one PNG,
    upscaled by ``scale`` (an int in [1, 64]), atomically."""
    fn = "write_strip_png"
    path = _check_path(path, fn)
    scale = _check_scale(scale, fn)
    frames = _check_video(video, fn)  # [3, F, H, W] uint8
    from PIL import Image

    strip = torch.cat(list(frames.unbind(1)), dim=-1)  # [3, H, F*W]
    strip = _upscale(strip, scale).permute(1, 2, 0).contiguous()
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(strip.numpy()).save(tmp, format="PNG")
    return path
