"""Classifier-free guidance as one batch of two vs two passes, on the bundled tiny FlashI2V model.

``ospfn.sched.sample`` runs the unconditional and conditional branches of each step as ONE model call on a
batch of 2B (one pass over the weights, larger matmuls).  This script measures what that buys against the two
separate calls a naive loop makes, with the same noise: the two-pass variant is the same sampler with a
``forward_fn`` that splits the 2B batch into its two halves and calls the model on each.  Guidance 3 (the
bundled model's default is 1, which runs one branch only), its default steps and size, several seeds,
alternating rounds in one process; ``ratio`` = median of the paired two-pass / batched sampling times (> 1:
batching is faster).  The videos must agree to fp32 rounding (``max_abs_diff``).

    python bench/bench_cfg_batch.py [--seeds 0 1 2] [--rounds 2] [--threads N] [--out PATH]

writes ``bench/results/cfg-batch-cpu.json`` with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import ospfn.model as M  # noqa: E402
from bench_teacache import Generator, machine_info  # noqa: E402
from ospfn.io import read_image  # noqa: E402
from ospfn.model import ImageCond  # noqa: E402
from ospfn.pipeline import BUNDLED, load_pipeline  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "results", "cfg-batch-cpu.json")


def two_pass(params, cfg, x, t, context, *, image=None, run=None):
    """``forward`` on each half of a CFG batch separately (unconditional half, then conditional half)."""
    B = x.shape[0] // 2
    outs = []
    for sl in (slice(0, B), slice(B, 2 * B)):
        img = None if image is None else ImageCond(fourier_feats=image.fourier_feats[sl])
        outs.append(M.forward(params, cfg, x[sl], t[sl], context[sl], image=img, run=run))
    return torch.cat(outs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON output; '-' for none")
    a = ap.parse_args(argv)
    if a.rounds < 1 or not a.seeds or a.guidance == 1.0:
        ap.error("--rounds must be >= 1, --seeds non-empty and --guidance != 1 (guidance 1 runs one branch)")
    if a.threads:
        torch.set_num_threads(a.threads)
    info = machine_info("cpu")
    pipe = load_pipeline()
    gen = Generator(pipe, (BUNDLED / "example.txt").read_text().strip(), read_image(str(BUNDLED / "example.png")))
    gen.guidance = a.guidance
    gen(a.seeds[0])  # warm-up
    ratios, t_batch, t_two, diffs = [], [], [], []
    for seed in a.seeds:
        for r in range(a.rounds):
            order = ("batch", "two") if (r + seed) % 2 == 0 else ("two", "batch")
            got = {}
            for name in order:
                video, _, ts, _ = gen(seed, forward_fn=None if name == "batch" else two_pass)
                got[name] = (video, ts)
            t_batch.append(got["batch"][1])
            t_two.append(got["two"][1])
            ratios.append(got["two"][1] / got["batch"][1])
            diffs.append(float((got["batch"][0] - got["two"][0]).abs().max()))
            print(f"seed {seed} round {r}: batched {got['batch'][1]:.2f} s, two passes {got['two'][1]:.2f} s")
    row = {
        "guidance": a.guidance, "steps": gen.steps, "frames": gen.frames, "size": [gen.H, gen.W],
        "batched_median_s": statistics.median(t_batch), "two_pass_median_s": statistics.median(t_two),
        "ratio_two_pass_over_batched": statistics.median(ratios), "max_abs_diff": max(diffs),
    }  # fmt: skip
    print(f"\n{info['device']}; torch {info['torch']}; load average at start {info['loadavg_at_start'][0]:.2f}")
    print(f"CFG as one batch of 2: {row['ratio_two_pass_over_batched']:.2f}x the speed of two passes "
          f"(sampling {row['batched_median_s']:.2f} s vs {row['two_pass_median_s']:.2f} s), max |diff| {row['max_abs_diff']:.1e}")  # fmt: skip
    if a.out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"machine_info": info, "result": row, "ratios": ratios}, f, indent=2)
            f.write("\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
