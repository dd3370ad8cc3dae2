#!/usr/bin/env python
"""Before / after an RL LoRA: the same held-out examples, the same noise, with and without the adapter.

For each of ``--num`` examples of ``SyntheticMotion(split="eval")`` (first frames and captions never seen in
training or RL) it generates the video twice from the same seed: with the base pipeline and with the LoRA
(``--lora PATH[:WEIGHT]``, repeatable, read with ``ospfn.lora.load_lora``).  It reports

* the targeted reward (``--reward``, a name from ``ospfn.rl.rewards``: default ``fidelity``): the mean of both,
  the paired mean difference (LoRA - base), its standard error ``std(diff) / sqrt(n)`` and the ratio diff / SE;
  the other built-in rewards too (means and paired differences, for information);
* frame-0 PSNR (dB, pixels in [0, 1], against the condition image) of both, and the drop;
* direction accuracy (the tracked motion goes the way the caption says) of both, and the drop in points;
* the fraction of frames where the object is present, both.

    python recipes/eval_rl.py --lora runs/rl_tiny/lora --num 64
    python recipes/eval_rl.py --lora runs/rl_tiny/lora:0.8 --reward fidelity --json out.json --check

``--check`` exits with status 1 unless the reward improves by more than 3 standard errors, frame-0 PSNR drops
by at most 0.5 dB and direction accuracy by at most 2 points.  Bad arguments (``--num 1``, a ``--lora`` that
does not exist or does not fit the model, ``--reward`` unknown, a ``--json`` path that cannot be written) exit
with status 2 before any example is generated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

CHECK_SE = 3.0  # the reward must improve by more than this many standard errors of the paired difference
CHECK_PSNR_DROP_DB = 0.5
CHECK_DIRECTION_DROP_POINTS = 2.0


def _path_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a non-empty path, got {text!r}")
    return text


def lora_arg(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:WEIGHT`` -> (path, weight); the weight is a finite number (default 1)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be PATH or PATH:WEIGHT, got {text!r}")
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return text, 1.0  # a ':' inside the path itself
        if not math.isfinite(weight):
            raise argparse.ArgumentTypeError(f"the weight in {text!r} must be a finite number, got {tail!r}")
        return head, weight
    return text, 1.0


def parse_args(argv=None):
    from ospfn.rl.rewards import reward_registry
    from ospfn.train.config import float_arg, int_arg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", action="append", required=True, type=lora_arg, metavar="PATH[:WEIGHT]",
                   help="LoRA directory or .safetensors file, optional :weight (default 1); repeat to stack adapters")
    p.add_argument("--checkpoint", default=None, type=_path_arg, help="pipeline directory (default: the bundled tiny model)")
    p.add_argument("--num", type=int_arg(2, 100_000), default=64, help="held-out examples (>= 2; the bar is meant for >= 64)")
    p.add_argument("--seed", type=int_arg(0, 2**32 - 1), default=0, help="data seed of the eval split")
    p.add_argument("--reward", default="fidelity", choices=sorted(reward_registry), help="the targeted reward")
    p.add_argument("--steps", type=int_arg(1, 10_000), default=None, help="sampling steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float_arg(0), default=None, help="guidance scale, finite >= 0 (default: the pipeline's)")
    p.add_argument("--shift", type=float_arg(0, lo_open=True), default=None, help="sigma shift, finite > 0 (default: the pipeline's)")
    p.add_argument("--threads", type=int_arg(1, 4096), default=None, help="torch CPU threads (>= 1; default: torch's)")
    p.add_argument("--json", default=None, type=_path_arg, help="also write the per-example results here")
    p.add_argument("--check", action="store_true", help="fail unless the reward improves by > 3 SE with no PSNR / direction loss")
    p.add_argument("--strip", default=None, type=_path_arg, metavar="PNG",
                   help="also write a PNG of the first (up to) 4 examples: per example a row of the base video's frames, "
                        "then a row of the adapter's")  # fmt: skip
    return p.parse_args(argv)


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def paired_stats(base, tuned) -> dict:
    """Mean of ``base`` and ``tuned`` (same examples, same noise), the paired difference ``tuned - base``: its
    mean, standard error ``std(diff, ddof=1) / sqrt(n)`` and the ratio mean / SE (None when SE is 0)."""
    n = len(base)
    if n != len(tuned) or n < 2:
        raise ValueError(f"paired_stats: need two lists of the same length >= 2, got {n} and {len(tuned)}")
    diff = [t - b for b, t in zip(base, tuned)]
    mean = sum(diff) / n
    var = sum((d - mean) ** 2 for d in diff) / (n - 1)
    se = math.sqrt(var / n)
    return {
        "base": sum(base) / n,
        "lora": sum(tuned) / n,
        "diff": mean,
        "se": se,
        "ratio": mean / se if se > 0 else None,
    }


def check_bar(summary: dict) -> list[str]:
    """The reasons ``summary`` misses the bar (empty: it meets it)."""
    why = []
    r = summary["reward"]
    if not r["diff"] > CHECK_SE * r["se"]:
        why.append(f"{summary['reward_name']} improves by {r['diff']:.4g}, not more than {CHECK_SE:g} SE = {CHECK_SE * r['se']:.4g}")
    if not summary["psnr_drop_db"] <= CHECK_PSNR_DROP_DB:
        why.append(f"frame-0 PSNR drops by {summary['psnr_drop_db']:.3f} dB > {CHECK_PSNR_DROP_DB} dB")
    if not summary["direction_drop_points"] <= CHECK_DIRECTION_DROP_POINTS:
        why.append(f"direction accuracy drops by {summary['direction_drop_points']:.2f} points > {CHECK_DIRECTION_DROP_POINTS}")
    return why


def generate(pipe, caption: str, image, *, seed: int, lora=None, steps=None, guidance=None, shift=None):
    """One video [3, F, H, W] from the pipeline; ``lora``: None (the base model) or what ``Pipeline.generate``
    takes (a LoraAdapter or a list of (LoraAdapter, weight) pairs)."""
    kw = {} if lora is None else {"lora": lora}
    return pipe.generate(caption, image=image, seed=seed, steps=steps, guidance=guidance, shift=shift, **kw)


def frame_metrics(video, image, caption: str) -> dict:
    """Frame-0 PSNR against ``image``, tracked direction vs the caption's, fraction of frames with the object."""
    from ospfn.eval import caption_direction, motion_direction, track_object

    mse = float(((video[:, 0] - image) / 2).pow(2).mean())  # in [0, 1] units
    cent, present = track_object(video)
    got = motion_direction(cent)
    return {
        "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
        "direction": got,
        "direction_ok": got == caption_direction(caption),
        "present_fraction": float(present.float().mean()),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from ospfn.train.config import output_file_problem

    for flag, value in (("--json", args.json), ("--strip", args.strip)):  # checked now, not after minutes of sampling
        if problem := output_file_problem(flag, value):
            return fail(problem)
    for path, _ in args.lora:
        if not Path(path).exists():
            return fail(f"--lora: {path} does not exist (a LoRA directory or .safetensors file, optionally PATH:WEIGHT)")

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from ospfn.data import SyntheticMotion
    from ospfn.lora import load_lora
    from ospfn.pipeline import BUNDLED, load_i2v_checkpoint
    from ospfn.rl.rewards import make_reward, reward_registry

    try:
        pipe = load_i2v_checkpoint(args.checkpoint, BUNDLED, "this evaluation conditions on a first frame (FlashI2V)")
    except ValueError as e:
        return fail(str(e))
    ckpt = Path(args.checkpoint) if args.checkpoint is not None else BUNDLED
    lora = []
    for path, weight in args.lora:
        try:
            adapter = load_lora(path, pipe.cfg, device=pipe.device)
        except (OSError, ValueError, KeyError, TypeError) as e:  # LoraFileError is a ValueError
            return fail(f"--lora: cannot load {path} for this model: {e}")
        lora.append((adapter, weight))

    d = pipe.defaults
    data = SyntheticMotion(args.num, frames=int(d["frames"]), size=tuple(d["size"]), split="eval", seed=args.seed)
    names = [args.reward] + sorted(n for n in ("fidelity", "motion", "sharpness") if n in reward_registry and n != args.reward)
    rewards = {n: make_reward(n) for n in names}
    opts = {"steps": args.steps, "guidance": args.guidance, "shift": args.shift}
    rows, videos = [], {"base": [], "lora": []}
    images, captions = [], []
    t0 = time.perf_counter()
    for i in range(args.num):
        item = data[i]
        image, caption = item["video"][:, 0], item["caption"]
        row = {"index": i, "caption": caption}
        for arm, arm_lora in (("base", None), ("lora", lora)):
            video = generate(pipe, caption, image, seed=i, lora=arm_lora, **opts).detach().cpu().float()
            videos[arm].append(video)
            row[arm] = frame_metrics(video, image, caption)
        rows.append(row)
        images.append(image)
        captions.append(caption)
    first = torch.stack(images)
    scores = {}
    for n, r in rewards.items():
        scores[n] = {arm: r(torch.stack(videos[arm]), captions, first_frames=first).tolist() for arm in ("base", "lora")}
        for j, row in enumerate(rows):
            for arm in ("base", "lora"):
                row[arm][n] = scores[n][arm][j]
    n = len(rows)

    def mean(arm, key):
        return sum(float(r[arm][key]) for r in rows) / n

    psnr = {arm: mean(arm, "psnr") for arm in ("base", "lora")}
    direction = {arm: mean(arm, "direction_ok") for arm in ("base", "lora")}
    summary = {
        "examples": n,
        "reward_name": args.reward,
        "reward": paired_stats(scores[args.reward]["base"], scores[args.reward]["lora"]),
        "other_rewards": {k: paired_stats(v["base"], v["lora"]) for k, v in scores.items() if k != args.reward},
        "psnr_frame0_db": psnr,
        "psnr_drop_db": psnr["base"] - psnr["lora"],
        "direction_accuracy": direction,
        "direction_drop_points": 100.0 * (direction["base"] - direction["lora"]),
        "object_present_fraction": {arm: mean(arm, "present_fraction") for arm in ("base", "lora")},
        "lora": [{"path": p, "weight": w} for p, w in args.lora],
        "checkpoint": str(ckpt),
        "seed": args.seed,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    why = check_bar(summary)
    summary["meets_bar"] = not why
    summary["misses"] = why
    print(json.dumps(summary, indent=2))
    if args.strip:
        from ospfn.io import write_strip_png

        k = min(4, n)  # rows: example 0 base, example 0 adapter, example 1 base, ...
        rows_v = [videos[arm][j] for j in range(k) for arm in ("base", "lora")]
        write_strip_png(args.strip, torch.cat(rows_v, dim=2), scale=4)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "examples": rows}, f, indent=2)
    return 1 if (args.check and why) else 0


if __name__ == "__main__":
    sys.exit(main())
