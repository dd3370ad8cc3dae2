#!/usr/bin/env python
"""Turn a training checkpoint into a pipeline directory that recipes/sample.py loads.

    python recipes/export.py --run runs/tiny_flashi2v --out runs/tiny_flashi2v/export-1000     # latest checkpoint, EMA
    python recipes/export.py --run runs/tiny_flashi2v/ckpt-00001000 --weights model --out out/raw
    python recipes/export.py --run runs/tiny_flashi2v --out ospfn/assets/tiny_flashi2v --guidance 1.0

The sampling defaults stored in the pipeline come from the run's ``sample:`` config section; ``--steps``,
``--guidance``, ``--shift`` and ``--fourier-ratio`` replace them (e.g. after tuning with eval_tiny.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory (its latest checkpoint) or a ckpt-* directory")
    p.add_argument("--out", required=True, help="pipeline directory to write")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--steps", type=int, help="default sampling steps")
    p.add_argument("--guidance", type=float, help="default classifier-free guidance scale")
    p.add_argument("--shift", type=float, help="default sigma shift")
    p.add_argument("--fourier-ratio", type=float, help="default Fourier high-frequency ratio")
    args = p.parse_args(argv)
    for name in ("steps", "guidance", "shift"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name}: {getattr(args, name)} must be positive")
    if args.fourier_ratio is not None and not 0 <= args.fourier_ratio < 1:
        p.error(f"--fourier-ratio: {args.fourier_ratio} must be in [0, 1)")

    from ospfn.train.config import load_config
    from ospfn.train.sft import SFTConfig, export_pipeline
    from ospfn.train.state import load_train_state

    try:
        st = load_train_state(args.run)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = load_config(st["state"]["config"], SFTConfig)
    sample = {k: getattr(args, k) for k in ("steps", "guidance", "shift", "fourier_ratio") if getattr(args, k) is not None}
    if sample:
        cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **sample))
    weights = st["ema"] if args.weights == "ema" else st["params"]
    out = export_pipeline(cfg, weights, args.out, info={"trained_steps": int(st["state"]["step"]), "weights": args.weights})
    print(f"exported {args.weights} weights of {st['path']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
