#!/usr/bin/env python
"""Generate a video (T2V or I2V) and write an .mp4 plus a PNG strip of its frames.

With no arguments it runs the bundled tiny FlashI2V model on its bundled example image and prompt:

    python recipes/sample.py
    python recipes/sample.py --prompt "a large green square moving up on a gray background" --image first.png --seed 3
    python recipes/sample.py --checkpoint runs/tiny_flashi2v/final        # a pipeline exported by train.py

The same arguments and seed give the same video.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like HxW (e.g. 32x32), got {text!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=None, help="text prompt (default: the bundled example's)")
    p.add_argument("--image", default=None, help="first frame for I2V models (default: the bundled example image)")
    p.add_argument("--negative-prompt", default=None, help="unconditional branch of CFG (default: empty prompt)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--shift", type=float, default=None, help="sigma shift of the inference schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--size", type=parse_size, default=None, help="HxW")
    p.add_argument("--checkpoint", default=None, help="a pipeline directory (default: the bundled tiny FlashI2V model)")
    p.add_argument("--config", default=None, help="a YAML file whose keys override the arguments above")
    p.add_argument("--out", default="out/sample", help="output path prefix (.mp4 and _frames.png are appended)")
    p.add_argument("--scale", type=int, default=8, help="nearest-neighbour upscaling of the written files")
    return p.parse_args(argv)


SAMPLE_KEYS = {"prompt", "image", "negative_prompt", "steps", "guidance", "shift", "seed", "frames", "size", "checkpoint", "out", "scale"}


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.config:
        import yaml

        cp = Path(args.config)
        if not cp.exists():
            fail(f"--config: no such file: {cp}")
        data = yaml.safe_load(cp.read_text()) or {}
        if not isinstance(data, dict):
            fail(f"{cp}: the top level must be a mapping of argument names")
        for k, v in data.items():
            if k not in SAMPLE_KEYS:
                fail(f"{cp}: unknown key {k!r} (allowed: {sorted(SAMPLE_KEYS)})")
            if k == "size":
                v = parse_size(v) if isinstance(v, str) else tuple(v)
            setattr(args, k, v)

    from ospfn.pipeline import BUNDLED

    ckpt = Path(args.checkpoint) if args.checkpoint else BUNDLED
    if not (ckpt / "pipeline.json").exists():
        fail(f"--checkpoint: {ckpt} is not a pipeline directory (expected pipeline.json, config.json and weights)")
    bundled = ckpt == BUNDLED
    prompt = args.prompt
    image_path = args.image
    if bundled and prompt is None:
        prompt = (BUNDLED / "example.txt").read_text().strip()
    if bundled and image_path is None and prompt == (BUNDLED / "example.txt").read_text().strip():
        image_path = str(BUNDLED / "example.png")
    if prompt is None:
        fail("--prompt is required with a non-bundled checkpoint")

    from ospfn.io import read_image, write_mp4, write_strip_png
    from ospfn.pipeline import load_pipeline

    pipe = load_pipeline(ckpt)
    size = tuple(args.size or pipe.defaults["size"])
    image = None
    if pipe.cfg.i2v == "flashi2v":
        if image_path is None:
            fail("--image is required: this is an image-to-video model")
        try:
            image = read_image(image_path, size=size)
        except (FileNotFoundError, ValueError) as e:
            fail(f"--image: {e}")
    elif image_path is not None:
        fail("--image given but the model is text-to-video")

    steps = args.steps or pipe.defaults["steps"]
    bar = None
    try:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="sampling", unit="step")
    except ImportError:
        pass
    t0 = time.perf_counter()
    video = pipe.generate(
        prompt, image=image, negative_prompt=args.negative_prompt, steps=steps, guidance=args.guidance,
        shift=args.shift, seed=args.seed, frames=args.frames, size=size,
        callback=(lambda i, z: bar.update(1)) if bar is not None else None,
    )  # fmt: skip
    if bar is not None:
        bar.close()
    out = Path(args.out)
    mp4 = write_mp4(out.with_name(out.name + ".mp4"), video, fps=int(pipe.defaults.get("fps", 8)), scale=args.scale)
    png = write_strip_png(out.with_name(out.name + "_frames.png"), video, scale=args.scale)
    info = {"prompt": prompt, "image": image_path, "seed": args.seed, "steps": steps, "frames": int(video.shape[1]),
            "size": list(video.shape[2:]), "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    print(json.dumps(info))
    print(f"wrote {mp4}")
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
