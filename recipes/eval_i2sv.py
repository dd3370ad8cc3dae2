#!/usr/bin/env python
"""Evaluate image-to-stylised-video (I2SV) on held-out synthetic examples (first frames and captions never seen in
training), with the committed evaluator ``ospfn.eval.styles``.

Example ``i`` of ``SyntheticMotion(split="eval", styles="all")`` gives a plain first frame, a caption and a target
style; the pipeline generates a video from them (``generate(caption, image, style=style, seed=i)``) and

* style accuracy: over frames 1..F-1 each frame's style is the nearest of the 12 style templates rendered at the
  tracked position of the known object; the video's style is the majority, correct when it is the target;
* direction accuracy: the tracked object moves the way the caption says;
* object present: the fraction of frames in which the tracker finds the object.

    python recipes/eval_i2sv.py                                   # the bundled I2SV model, 64 examples
    python recipes/eval_i2sv.py --checkpoint runs/tiny_flashi2v_i2sv/final --num 16 --check --json out/i2sv.json

``--check`` exits with status 1 unless style accuracy >= 80 %, direction accuracy >= 80 % and presence >= 90 %.
Bad arguments exit with status 2 before any example is generated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

BAR = {"style_accuracy": 0.8, "direction_accuracy": 0.8, "object_present_fraction": 0.9}


def _path_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a non-empty path, got {text!r}")
    return text


def parse_args(argv=None):
    from ospfn.train.config import float_arg, int_arg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, type=_path_arg, help="pipeline directory (default: the bundled I2SV model)")
    p.add_argument("--num", type=int_arg(1, 100_000), default=64, help="held-out examples (>= 1; the bar is meant for >= 64)")
    p.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0, help="data seed of the eval split")
    p.add_argument("--steps", type=int_arg(1, 10_000), default=None, help="sampling steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float_arg(0), default=None, help="guidance scale, finite >= 0 (default: the pipeline's)")
    p.add_argument("--threads", type=int_arg(1, 4096), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", default=None, type=_path_arg, help="also write the per-example results here")
    p.add_argument("--check", action="store_true", help="fail unless the quality bar is met")
    p.add_argument("--strip", default=None, type=_path_arg, metavar="PNG",
                   help="also write a PNG: one row per style (its first example): the condition image, the generated frames, "
                        "then the ground truth's stylised frames")  # fmt: skip
    return p.parse_args(argv)


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def summarise(rows: list[dict]) -> dict:
    """The three bar measures of per-example rows, plus per-style accuracy."""
    n = len(rows)
    per_style: dict[str, list] = {}
    for r in rows:
        per_style.setdefault(r["style"], []).append(r["style_ok"])
    return {
        "examples": n,
        "style_accuracy": sum(r["style_ok"] for r in rows) / n,
        "direction_accuracy": sum(r["direction_ok"] for r in rows) / n,
        "object_present_fraction": sum(r["present_fraction"] for r in rows) / n,
        "per_style_accuracy": {k: sum(v) / len(v) for k, v in sorted(per_style.items())},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from ospfn.train.config import output_file_problem

    for flag, value in (("--json", args.json), ("--strip", args.strip)):  # checked now, not after minutes of sampling
        if problem := output_file_problem(flag, value):
            return fail(problem)

    import torch

    from ospfn.data import SyntheticMotion
    from ospfn.eval.styles import score_styled_video
    from ospfn.pipeline import BUNDLED_I2SV, load_i2v_checkpoint

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        pipe = load_i2v_checkpoint(args.checkpoint, BUNDLED_I2SV, "I2SV conditions on a first frame (FlashI2V)")
    except ValueError as e:
        return fail(str(e))
    ckpt = Path(args.checkpoint) if args.checkpoint is not None else BUNDLED_I2SV
    d = pipe.defaults
    data = SyntheticMotion(args.num, frames=int(d["frames"]), size=tuple(d["size"]), split="eval", seed=args.seed, styles="all")
    rows, firsts = [], {}  # firsts: style -> (image, video) of its first example, for --strip
    t0 = time.perf_counter()
    try:
        from tqdm import tqdm

        order = tqdm(range(args.num), desc="eval_i2sv", unit="video")
    except ImportError:
        order = range(args.num)
    for i in order:
        item = data[i]
        video = pipe.generate(item["caption"], image=item["video"][:, 0], style=item["style"], seed=i, steps=args.steps,
                              guidance=args.guidance)  # fmt: skip
        score = score_styled_video(video, item, item["style"])
        firsts.setdefault(item["style"], (item["video"], video.detach().cpu().float()))
        rows.append({"index": i, "caption": item["caption"], "style": item["style"], "predicted_style": score["style"],
                     "style_ok": bool(score["style_ok"]), "direction": score["direction"], "direction_ok": bool(score["direction_ok"]),
                     "present_fraction": float(score["present_fraction"])})  # fmt: skip
    summary = summarise(rows)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["checkpoint"] = str(ckpt)
    ok = all(summary[k] >= v for k, v in BAR.items())
    summary["meets_bar"] = ok
    print(json.dumps(summary, indent=2))
    if args.strip and firsts:
        from ospfn.io import write_strip_png
        from ospfn.styles import STYLES

        # per style: the condition image, the generated frames, then the ground truth's stylised frames 1..F-1
        rows_v = [torch.cat([truth[:, :1], vid, truth[:, 1:]], dim=1) for s in STYLES if s in firsts for truth, vid in [firsts[s]]]
        write_strip_png(args.strip, torch.cat(rows_v, dim=2), scale=4)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "examples": rows}, f, indent=2)
    return 1 if (args.check and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
