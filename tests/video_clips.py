"""Small mp4 files and ClipEntry helpers for the tests of ospfn.data's video modules.

The clips are written with PyAV (libx264, lossless luma): in the "time" videos every pixel of frame i has grey
level 6 * i, so the decoded content tells which source frame was picked; in the "ramp" videos the grey level
grows by 4 per column (or row), so the crop window can be read back from the pixels.
"""

import av
import numpy as np

from ospfn.data import ClipEntry

STEP = 6  # grey level per frame index in the "time" videos


def write_mp4(path, frames, fps=24):
    """uint8 [N, H, W, 3] -> an H.264 mp4 (qp 0, yuv420p) at ``fps``."""
    n, h, w, _ = frames.shape
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"qp": "0"}
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def time_frames(n, h, w):
    return np.repeat((np.arange(n, dtype=np.uint8) * STEP)[:, None, None, None], h * w * 3, 1).reshape(n, h, w, 3)


def make_videos(root):
    """Write the test clips into the folder ``root`` (a Path) and return it."""
    write_mp4(root / "land.mp4", time_frames(40, 48, 64))  # h/w = 0.75
    # portrait: h/w = 1.5 (decord 0.6.0 cannot decode frames narrower than 64 px unless the width is a multiple
    # of 32, so no 64 x 48 clip here)
    write_mp4(root / "port.mp4", time_frames(40, 96, 64))
    ramp = np.zeros((4, 48, 64, 3), np.uint8)
    ramp[:] = (np.arange(64, dtype=np.uint8) * 4)[None, None, :, None]
    write_mp4(root / "ramp_x.mp4", ramp)
    vramp = np.zeros((4, 96, 64, 3), np.uint8)
    vramp[:] = (np.arange(96, dtype=np.uint8) * 2)[None, :, None, None]
    write_mp4(root / "ramp_y.mp4", vramp)
    return root


def frame_ids(video):
    """Source frame index encoded in each frame of a "time" clip [3, F, H, W] in [-1, 1]."""
    grey = (video.mean(dim=(0, 2, 3)) + 1) * 127.5
    return [int(round(float(g) / STEP)) for g in grey]


def entry(path, **kw):
    base = dict(path=str(path), captions=("a clip",), height=48, width=64, fps=24.0, num_frames=40)
    base.update(kw)
    return ClipEntry(**base)
