#!/usr/bin/env python
"""Generate a video (T2V or I2V) and write an .mp4 plus a PNG strip of its frames.

With no arguments it runs the bundled tiny FlashI2V model on its bundled example image and prompt:

    python recipes/sample.py
    python recipes/sample.py --prompt "a large green square moving up on a gray background" --image first.png --seed 3
    python recipes/sample.py --checkpoint runs/tiny_flashi2v/final        # a pipeline exported by train.py
    python recipes/sample.py --device cuda --dtype bf16 --out out/clip.mp4   # writes out/clip.mp4, out/clip_frames.png

Real weights (any layout ``load_pipeline`` reads: a diffusers Wan pipeline, a Wan original directory, an ospfn
pipeline), with a replacement DiT and a model type on top:

    python recipes/sample.py --checkpoint Wan2.1-T2V-1.3B-Diffusers --prompt "a fox in the snow" --device cuda --dtype bf16
    python recipes/sample.py --checkpoint Wan2.1-T2V-1.3B-Diffusers --dit osp_next/model.pt --model-type osp-next \
        --prompt "a fox in the snow" --device cuda --dtype bf16
    python recipes/sample.py --checkpoint Wan2.1-T2V-14B --dit flashi2v/ --model-type flashi2v --image first.png \
        --prompt "the dog runs to the left" --device cuda --dtype bf16 --scheduler unipc --teacache 0.1
    python recipes/sample.py --prompt-file prompts.txt --image first.png --out out/batch   # out/batch_000.mp4, ..., out/batch_grid.mp4

Uniworld-OSP2.0 (a FlashI2V model conditioned through a frozen Qwen2.5-VL and a trained adapter; docs/i2sv.md):
a uniworld training export names its VLM and adapter; any FlashI2V pipeline takes them with ``--model-type
uniworld``:

    python recipes/sample.py --checkpoint runs/uniworld_osp2_14b/final --image first.png --prompt "..." --device cuda --dtype bf16
    python recipes/sample.py --checkpoint Wan2.1-T2V-14B --dit FlashI2V-14B/ --model-type uniworld --vlm Qwen2.5-VL-7B-Instruct \
        --adapter uniworld_adapter.pt --image first.png --prompt "the dog runs to the left" --device cuda --dtype bf16

Image-to-stylised-video (one of the 12 styles of ``ospfn.styles.STYLES``; without ``--checkpoint`` the bundled
model fine-tuned for the styles, 9 frames):

    python recipes/sample.py --style "Pixel art"
    python recipes/sample.py --style ghibli --image first.png --prompt "a small red circle moving left on a navy background"

``--out name.mp4`` writes ``name.mp4`` and the strip ``name_frames.png`` beside it; any other ``--out`` is a
prefix (``out/sample`` -> ``out/sample.mp4``, ``out/sample_frames.png``).  With ``--prompt-file`` (one prompt
a line, blank lines skipped) the videos are numbered (``name_000.mp4``, ``name_000_frames.png``, ...), all from
the same seed, and ``name_grid.mp4`` shows them side by side.  Every number is checked before any
work (``--steps 0``, ``--guidance nan``, ``--size 0x32`` are errors), and so is every key of ``--config``.
The same arguments and seed give the same video (the noise comes from a CPU generator on every device).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

MAX_VIDEO_BYTES = 16 * 2**30  # one fp32 video [3, frames, H, W]
MAX_WRITTEN_SIDE = 16384  # pixels of a written frame side after --scale
OTHER_MEDIA = (".avi", ".mov", ".mkv", ".webm", ".gif", ".png", ".jpg", ".jpeg", ".webp")
DTYPES = ("fp32", "bf16")
MODEL_TYPES = ("wan", "osp-next", "flashi2v", "uniworld")
SCHEDULERS = ("euler", "unipc")
MAX_PROMPTS = 10_000  # lines of --prompt-file


def _text_arg(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise argparse.ArgumentTypeError(f"must be a non-empty string, got {text!r}")
    return text


def lora_arg(text: str) -> tuple[str, float]:
    """``--lora PATH[:WEIGHT]``: (path, weight); the weight (default 1) is a finite number after the last colon."""
    import math

    if not isinstance(text, str) or not text.strip():
        raise argparse.ArgumentTypeError(f"must be PATH or PATH:WEIGHT, got {text!r}")
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            w = float(tail)
        except ValueError:
            return text, 1.0  # a colon inside the path
        if not math.isfinite(w):
            raise argparse.ArgumentTypeError(f"the weight of {text!r} must be a finite number, got {tail!r}")
        return path, w
    return text, 1.0


def style_arg(text: str) -> str:
    """``--style NAME``: the canonical name of one of the 12 styles (any case; spaces, - and _ ignored)."""
    from ospfn.styles import STYLES, style_name

    try:
        return style_name(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown style {text!r}; the 12 styles are: {', '.join(STYLES)}") from None


def value_checks() -> dict:
    """The check of each numeric / structured argument: an argparse ``type=`` that also takes YAML values."""
    from ospfn.train.config import float_arg, int_arg, resolve_device, size_arg

    return {
        "steps": int_arg(1, 10_000),
        "guidance": float_arg(0),
        "shift": float_arg(0, lo_open=True),
        "seed": int_arg(-(2**63), 2**64 - 1),  # what torch.Generator.manual_seed takes
        "frames": int_arg(1, 100_000),
        "size": size_arg,
        "scale": int_arg(1, 64),
        "device": resolve_device,
        "teacache": float_arg(0),
    }


def parse_args(argv=None):
    c = value_checks()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=None, help="text prompt (default: the bundled example's)")
    p.add_argument("--image", default=None, type=_text_arg, help="first frame for I2V models (default: the bundled example image)")
    p.add_argument("--prompt-file", default=None, type=_text_arg,
                   help="a text file of prompts, one video per line (blank lines skipped), plus a grid video of them all")  # fmt: skip
    p.add_argument("--negative-prompt", default=None,
                   help="unconditional branch of CFG (default: the pipeline's; empty for the tiny model, Wan's for Wan-family ones)")  # fmt: skip
    p.add_argument("--steps", type=c["steps"], default=None, help="sampling steps, 1..10000 (default: the pipeline's)")
    p.add_argument("--guidance", type=c["guidance"], default=None, help="classifier-free guidance scale, finite >= 0 (1: no CFG)")
    p.add_argument("--shift", type=c["shift"], default=None, help="sigma shift of the inference schedule, finite > 0")
    p.add_argument("--seed", type=c["seed"], default=0)
    p.add_argument("--frames", type=c["frames"], default=None, help="frames to generate, >= 1 (default: the pipeline's)")
    p.add_argument("--size", type=c["size"], default=None, help="HxW, each a multiple of the VAE stride x patch (default: the pipeline's)")
    p.add_argument("--checkpoint", default=None, type=_text_arg,
                   help="a pipeline directory: diffusers Wan, Wan original or ospfn (default: the bundled tiny FlashI2V model)")  # fmt: skip
    p.add_argument("--dit", default=None, type=_text_arg,
                   help="a replacement DiT checkpoint on top of --checkpoint (OSP-Next model.pt / DCP, FlashI2V safetensors)")  # fmt: skip
    p.add_argument("--model-type", default=None, choices=MODEL_TYPES,
                   help="wan (T2V), osp-next (the dual_end Skiparse schedule), flashi2v (I2V) or uniworld (FlashI2V through a "
                        "Qwen2.5-VL and an adapter: --vlm, --adapter); default: what the weights are")  # fmt: skip
    p.add_argument("--vlm", default=None, type=_text_arg,
                   help="uniworld: a local Qwen2.5-VL directory (default: the one a uniworld export names)")
    p.add_argument("--adapter", default=None, type=_text_arg,
                   help="uniworld: the VLM adapter file (vlm_adapter.safetensors or the released adapter; default: the export's)")
    p.add_argument("--scheduler", default=None, choices=SCHEDULERS, help="euler or unipc (default: the pipeline's)")
    p.add_argument("--teacache", type=c["teacache"], default=None, metavar="THRESH",
                   help="TeaCache threshold, finite >= 0 (e.g. 0.1): skip the DiT blocks on steps whose input barely changed")  # fmt: skip
    p.add_argument("--config", default=None, type=_text_arg, help="a YAML file whose keys (the argument names) override the arguments")
    p.add_argument("--out", default="out/sample", type=_text_arg,
                   help="name.mp4 (the strip goes beside it as name_frames.png) or a prefix (.mp4 and _frames.png appended)")  # fmt: skip
    p.add_argument("--scale", type=c["scale"], default=8, help="nearest-neighbour upscaling of the written files, 1..64")
    p.add_argument("--device", type=c["device"], default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype of the DiT (default fp32)")
    p.add_argument("--lora", action="append", type=lora_arg, default=None, metavar="PATH[:WEIGHT]",
                   help="a LoRA adapter (diffusers / PEFT / Wan / musubi file or directory) applied with WEIGHT (default 1); "
                        "repeatable (the adapters add up)")  # fmt: skip
    p.add_argument("--style", type=style_arg, default=None, metavar="NAME",
                   help="image-to-stylised-video in one of the 12 styles (Ghibli, 3D rendering, Cyberpunk, Ink painting, Oil "
                        "painting, Pixel art, Vaporwave, Disney, Fairy tale, Gotham noir, Lego, Chibi); without --checkpoint "
                        "the bundled I2SV model")  # fmt: skip
    p.add_argument("--text-offload", choices=["none", "cpu", "release"], default=None,
                   help="what to do with the UMT5 encoder once the prompts are encoded, before the DiT runs (default: cpu on "
                        "an accelerator, none on the CPU; the tiny encoder has nothing to offload)")  # fmt: skip
    return p.parse_args(argv)


SAMPLE_KEYS = {"prompt", "image", "negative_prompt", "steps", "guidance", "shift", "seed", "frames", "size", "checkpoint", "out", "scale",
               "device", "dtype", "prompt_file", "dit", "model_type", "scheduler", "teacache", "style", "vlm", "adapter"}  # fmt: skip
STRING_KEYS = ("prompt", "image", "negative_prompt", "checkpoint", "out", "prompt_file", "dit", "vlm", "adapter")
CHOICE_KEYS = {"dtype": DTYPES, "model_type": MODEL_TYPES, "scheduler": SCHEDULERS}


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def apply_config(args, path: str) -> None:
    """Override ``args`` with the keys of the YAML file ``path``, each checked like its command-line flag."""
    from ospfn.train.config import ConfigError, read_yaml

    try:
        data = read_yaml(path)
    except FileNotFoundError:
        fail(f"--config: no such file: {path}")
    except ConfigError as e:
        fail(str(e))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(f"{path}: the top level must be a mapping of argument names, got {type(data).__name__}")
    checks = value_checks()
    for k, v in data.items():
        if k not in SAMPLE_KEYS:
            fail(f"{path}: unknown key {k!r} (allowed: {sorted(SAMPLE_KEYS)})")
        if k in STRING_KEYS:
            if not isinstance(v, str) or (k != "prompt" and k != "negative_prompt" and not v.strip()):
                fail(f"{path}: {k} must be a non-empty string, got {v!r}")
        elif k in CHOICE_KEYS:
            if v not in CHOICE_KEYS[k]:
                fail(f"{path}: {k} must be one of {list(CHOICE_KEYS[k])}, got {v!r}")
        elif k == "size":
            try:
                v = checks[k](v)
            except ValueError as e:
                fail(f"{path}: size {e}")
        elif k == "device":
            try:
                v = checks[k](v)
            except ValueError as e:
                fail(f"{path}: device: {e}")
        elif k == "style":
            try:
                v = style_arg(v) if v is not None else None
            except argparse.ArgumentTypeError as e:
                fail(f"{path}: style: {e}")
        else:
            try:
                v = checks[k].check(v, k)
            except ValueError as e:
                fail(f"{path}: {e}")
        setattr(args, k, v)


def output_paths(out: str) -> tuple[Path, Path]:
    """(mp4, strip png) of ``--out``: ``name.mp4`` as given with ``name_frames.png`` beside it, else a prefix."""
    p = Path(out)
    if p.suffix.lower() == ".mp4":
        return p, p.with_name(p.stem + "_frames.png")
    if p.suffix.lower() in OTHER_MEDIA:
        fail(f"--out: {out!r} names a {p.suffix} file, but this writes an .mp4 (and a PNG strip); give name.mp4 or a prefix")
    return p.with_name(p.name + ".mp4"), p.with_name(p.name + "_frames.png")


def check_writable(path: Path) -> None:
    """Fail now (not after sampling) if ``path`` cannot be written."""
    if path.is_dir():
        fail(f"--out: {path} is a directory; give name.mp4 or a prefix")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        fail(f"--out: {parent} is not a directory, so {path} cannot be written")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"--out: cannot write into {parent}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.config is not None:
        apply_config(args, args.config)
    mp4_path, png_path = output_paths(args.out)
    check_writable(mp4_path)

    import torch

    from ospfn.pipeline import BUNDLED, BUNDLED_I2SV
    from ospfn.train.config import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        fail(f"--device: {e}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    if args.checkpoint is not None:
        ckpt = Path(args.checkpoint)
    elif args.style is not None:
        ckpt = BUNDLED_I2SV
        if not (ckpt / "pipeline.json").exists():
            fail(f"--style: the bundled image-to-stylised-video model is missing from this installation ({ckpt}); "
                 "pass --checkpoint with a model trained for the styles")  # fmt: skip
    else:
        ckpt = BUNDLED
    if not ckpt.is_dir():
        fail(f"--checkpoint: {ckpt} is not a pipeline directory (a diffusers Wan pipeline, a Wan original directory or an "
             "ospfn pipeline with pipeline.json)")  # fmt: skip
    uniworld = args.model_type == "uniworld" or uniworld_export(ckpt)
    if not uniworld:
        for flag, value in (("--vlm", args.vlm), ("--adapter", args.adapter)):
            if value is not None:
                fail(f"{flag} applies to --model-type uniworld (a VLM-conditioned FlashI2V model) or a uniworld export; "
                     f"{ckpt} is loaded as {args.model_type or 'what its weights are'}")  # fmt: skip
    else:
        if args.vlm is not None and not Path(args.vlm).is_dir():
            fail(f"--vlm: {args.vlm} is not a directory; give a local Qwen2.5-VL directory (config.json, weights, processor files)")
        if args.adapter is not None and not Path(args.adapter).is_file():
            fail(f"--adapter: no such file: {args.adapter} (vlm_adapter.safetensors or the released adapter .pt / .safetensors)")
        if not uniworld_export(ckpt):
            for flag, value, what in (("--vlm", args.vlm, "a local Qwen2.5-VL directory"), ("--adapter", args.adapter, "the VLM adapter file")):
                if value is None:
                    fail(f"{flag} is required with --model-type uniworld: {what} ({ckpt} is not a uniworld export naming one)")
    bundled = ckpt in (BUNDLED, BUNDLED_I2SV) and args.dit is None and args.model_type is None
    if args.prompt is not None and args.prompt_file is not None:
        fail("--prompt and --prompt-file exclude each other: give one prompt or a file of them")
    prompt = args.prompt
    image_path = args.image
    prompts = None
    if args.prompt_file is not None:
        prompts = read_prompt_file(args.prompt_file)
    elif bundled and prompt is None:
        prompt = (BUNDLED / "example.txt").read_text().strip()
    if bundled and prompts is None and image_path is None and prompt == (BUNDLED / "example.txt").read_text().strip():
        image_path = str(BUNDLED / "example.png")
    if prompt is None and prompts is None:
        fail("--prompt (or --prompt-file) is required with a non-bundled checkpoint")
    if prompts is None:
        prompts = [prompt]

    from ospfn.io import read_image, write_mp4, write_strip_png
    from ospfn.pipeline import load_pipeline

    try:
        offload = args.text_offload or ("none" if torch.device(device).type == "cpu" else "cpu")
        extra = {"vlm": args.vlm, "adapter": args.adapter} if uniworld else {}
        pipe = load_pipeline(ckpt, model_type=args.model_type, dit=args.dit, dtype=dtype, device=device, text_offload=offload, **extra)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:  # CheckpointError is a ValueError
        flag = "--adapter" if args.adapter is not None and str(args.adapter) in str(e) else (
            "--vlm" if args.vlm is not None and str(args.vlm) in str(e) else "--checkpoint")  # fmt: skip
        fail(f"{flag}: cannot load the pipeline {ckpt}: {e}")
    adapters = None
    if args.lora:
        from ospfn.lora import load_lora

        adapters = []
        for path, w in args.lora:
            try:
                adapters.append((load_lora(path, pipe.cfg), w))
            except (OSError, ValueError) as e:  # LoraFileError is a ValueError
                fail(f"--lora: {path}: {e}")
    size = tuple(args.size) if args.size is not None else tuple(pipe.defaults["size"])
    frames = args.frames if args.frames is not None else int(pipe.defaults["frames"])
    steps = args.steps if args.steps is not None else int(pipe.defaults["steps"])
    mult = pipe.vae.stride[1] * pipe.cfg.patch_size[1], pipe.vae.stride[2] * pipe.cfg.patch_size[2]
    if size[0] % mult[0] or size[1] % mult[1]:
        fail(f"--size: {size[0]}x{size[1]} must be a multiple of {mult[0]}x{mult[1]} (VAE stride x patch) in each dimension")
    if 3 * frames * size[0] * size[1] * 4 > MAX_VIDEO_BYTES:
        fail(f"--frames / --size: {frames} frames of {size[0]}x{size[1]} make a {3 * frames * size[0] * size[1] * 4 / 2**30:.3g} GiB video; "
             f"at most {MAX_VIDEO_BYTES // 2**30} GiB")  # fmt: skip
    if max(size) * args.scale > MAX_WRITTEN_SIDE:
        fail(f"--scale: {args.scale} makes {size[0] * args.scale}x{size[1] * args.scale} frames; each side at most {MAX_WRITTEN_SIDE}")
    rows, cols = grid_shape(len(prompts))
    if len(prompts) > 1:
        gh, gw = rows * size[0] * args.scale, cols * size[1] * args.scale
        if max(gh, gw) > MAX_WRITTEN_SIDE or 3 * frames * rows * size[0] * cols * size[1] * 4 > MAX_VIDEO_BYTES:
            fail(f"--prompt-file: {len(prompts)} videos of {frames} frames of {size[0]}x{size[1]} make a {gh}x{gw} grid video "
                 f"(at most {MAX_WRITTEN_SIDE} px a side and {MAX_VIDEO_BYTES // 2**30} GiB); use fewer prompts, a smaller --size or --scale")  # fmt: skip
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

    bar = None
    try:
        from tqdm import tqdm

        bar = tqdm(total=steps * len(prompts), desc="sampling", unit="step")
    except ImportError:
        pass
    fps = int(pipe.defaults.get("fps", 8))
    t0 = time.perf_counter()
    videos, written, skipped = [], [], 0
    for i, p in enumerate(prompts):
        video = pipe.generate(
            p, image, negative_prompt=args.negative_prompt, steps=steps, guidance=args.guidance, shift=args.shift,
            seed=args.seed, frames=frames, size=size, scheduler=args.scheduler, teacache=args.teacache, lora=adapters,
            style=args.style, callback=(lambda i, z: bar.update(1)) if bar is not None else None,
        )  # fmt: skip
        skipped += int(pipe.last_info.get("teacache_skipped", 0))
        video = video.float().cpu()
        if len(prompts) == 1:
            mp4_i, png_i = mp4_path, png_path
        else:
            mp4_i = mp4_path.with_name(f"{mp4_path.stem}_{i:03d}{mp4_path.suffix}")
            png_i = mp4_path.with_name(f"{mp4_path.stem}_{i:03d}_frames.png")
            videos.append(video)
        written += [write_mp4(mp4_i, video, fps=fps, scale=args.scale), write_strip_png(png_i, video, scale=args.scale)]
    if bar is not None:
        bar.close()
    if videos:
        written.append(write_mp4(mp4_path.with_name(f"{mp4_path.stem}_grid{mp4_path.suffix}"), tile_videos(videos, rows, cols),
                                 fps=fps, scale=args.scale))  # fmt: skip
    info = {"prompt": prompts[0] if len(prompts) == 1 else prompts, "image": image_path, "seed": args.seed, "steps": steps,
            "frames": int(video.shape[1]), "size": list(video.shape[2:]), "device": str(device), "dtype": args.dtype,
            "model_type": pipe.model_type, "scheduler": pipe.last_info.get("scheduler"), "teacache": args.teacache,
            "teacache_skipped": skipped, "style": args.style, "lora": [[str(p_), w] for p_, w in args.lora] if args.lora else None,
            "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip
    print(json.dumps(info))
    for path in written:
        print(f"wrote {path}")
    return 0


def uniworld_export(ckpt: Path) -> bool:
    """Whether ``ckpt`` is a uniworld training export (its ``ospfn_export.json`` says model_type uniworld)."""
    f = ckpt / "ospfn_export.json"
    try:
        return f.is_file() and json.loads(f.read_text(encoding="utf-8")).get("model_type") == "uniworld"
    except (OSError, ValueError, AttributeError):
        return False


def read_prompt_file(path: str) -> list[str]:
    """The prompts of ``--prompt-file``: one a line, surrounding whitespace stripped, blank lines skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        fail(f"--prompt-file: no such file: {path}")
    except IsADirectoryError:
        fail(f"--prompt-file: {path} is a directory; give a text file with one prompt a line")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--prompt-file: cannot read {path} as UTF-8 text: {e}")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        fail(f"--prompt-file: {path} holds no prompt (one a line; blank lines are skipped)")
    if len(prompts) > MAX_PROMPTS:
        fail(f"--prompt-file: {path} holds {len(prompts)} prompts; at most {MAX_PROMPTS}")
    return prompts


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) of the grid video of ``n`` videos: ceil(sqrt(n)) columns."""
    cols = math.isqrt(n - 1) + 1
    return -(-n // cols), cols


def tile_videos(videos: list, rows: int, cols: int):
    """Videos [3, F, H, W] (one shape) tiled row by row into one [3, F, rows * H, cols * W]; empty cells black."""
    import torch

    C, F, H, W = videos[0].shape
    grid = torch.full((C, F, rows * H, cols * W), -1.0)
    for k, v in enumerate(videos):
        r, c = divmod(k, cols)
        grid[:, :, r * H : (r + 1) * H, c * W : (c + 1) * W] = v
    return grid

if __name__ == "__main__":
    sys.exit(main())
