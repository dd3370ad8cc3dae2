#!/usr/bin/env python
"""Evaluate an I2V pipeline on held-out synthetic examples (first frame + caption never seen in training).

For each of ``--num`` examples of ``SyntheticMotion(split="eval")`` it generates a video from the example's
first frame and caption and measures

* first-frame fidelity: PSNR (dB, pixels in [0, 1]) of generated frame 0 against the condition image;
* motion follows the text: the direction of the tracked object's displacement equals the caption's;
* the object stays present: the fraction of frames in which the tracker finds it.

    python recipes/eval_tiny.py                          # the bundled model, 64 examples
    python recipes/eval_tiny.py --checkpoint runs/tiny_flashi2v/final --num 32 --check

``--check`` exits with status 1 unless mean PSNR >= 24 dB, direction accuracy >= 80 % and presence >= 90 %.
Bad arguments (``--num 0``, ``--steps 0``, ``--guidance nan``, a ``--json`` path that cannot be written) exit
with status 2 before any example is generated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def _path_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a non-empty path, got {text!r}")
    return text


def parse_args(argv=None):
    from ospfn.train.config import float_arg, int_arg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, type=_path_arg, help="pipeline directory (default: the bundled tiny model)")
    p.add_argument("--num", type=int_arg(1, 100_000), default=64, help="held-out examples (>= 1; the quality bar is meant for >= 32)")
    p.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0, help="data seed of the eval split")
    p.add_argument("--steps", type=int_arg(1, 10_000), default=None, help="sampling steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float_arg(0), default=None, help="guidance scale, finite >= 0 (default: the pipeline's)")
    p.add_argument("--shift", type=float_arg(0, lo_open=True), default=None, help="sigma shift, finite > 0 (default: the pipeline's)")
    p.add_argument("--json", default=None, type=_path_arg, help="also write the per-example results here")
    p.add_argument("--check", action="store_true", help="fail unless the quality bar is met")
    return p.parse_args(argv)


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    from ospfn.train.config import output_file_problem

    if problem := output_file_problem("--json", args.json):  # checked now, not after minutes of sampling
        return fail(problem)

    from ospfn.data import SyntheticMotion
    from ospfn.eval import caption_direction, motion_direction, track_object
    from ospfn.pipeline import BUNDLED, load_i2v_checkpoint

    try:
        pipe = load_i2v_checkpoint(args.checkpoint, BUNDLED, "this evaluation conditions on a first frame (FlashI2V)")
    except ValueError as e:
        return fail(str(e))
    ckpt = Path(args.checkpoint) if args.checkpoint is not None else BUNDLED
    d = pipe.defaults
    data = SyntheticMotion(args.num, frames=int(d["frames"]), size=tuple(d["size"]), split="eval", seed=args.seed)
    rows = []
    t0 = time.perf_counter()
    for i in range(args.num):
        item = data[i]
        image = item["video"][:, 0]
        video = pipe.generate(item["caption"], image=image, seed=i, steps=args.steps, guidance=args.guidance, shift=args.shift)
        mse = float(((video[:, 0] - image) / 2).pow(2).mean())  # in [0, 1] units
        psnr = 10 * math.log10(1.0 / max(mse, 1e-12))
        cent, present = track_object(video)
        got = motion_direction(cent)
        want = caption_direction(item["caption"])
        rows.append({"index": i, "caption": item["caption"], "psnr": psnr, "direction": got, "expected": want,
                     "direction_ok": got == want, "present_fraction": float(present.float().mean())})  # fmt: skip
    n = len(rows)
    summary = {
        "examples": n,
        "psnr_frame0_mean_db": sum(r["psnr"] for r in rows) / n,
        "direction_accuracy": sum(r["direction_ok"] for r in rows) / n,
        "object_present_fraction": sum(r["present_fraction"] for r in rows) / n,
        "seconds": round(time.perf_counter() - t0, 1),
        "checkpoint": str(ckpt),
    }
    ok = summary["psnr_frame0_mean_db"] >= 24 and summary["direction_accuracy"] >= 0.8 and summary["object_present_fraction"] >= 0.9
    summary["meets_bar"] = ok
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "examples": rows}, f, indent=2)
    return 1 if (args.check and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
