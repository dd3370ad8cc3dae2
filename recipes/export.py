#!/usr/bin/env python
"""Turn a training checkpoint into a pipeline directory that recipes/sample.py loads.

    python recipes/export.py --run runs/tiny_flashi2v --out runs/tiny_flashi2v/export-1000     # latest checkpoint, EMA
    python recipes/export.py --run runs/tiny_flashi2v/ckpt-00001000 --weights model --out out/raw
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory (its latest checkpoint) or a ckpt-* directory")
    p.add_argument("--out", required=True, help="pipeline directory to write")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    args = p.parse_args(argv)

    from ospfn.train.config import load_config
    from ospfn.train.sft import SFTConfig, export_pipeline
    from ospfn.train.state import load_train_state

    try:
        st = load_train_state(args.run)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = load_config(st["state"]["config"], SFTConfig)
    weights = st["ema"] if args.weights == "ema" else st["params"]
    out = export_pipeline(cfg, weights, args.out, info={"trained_steps": int(st["state"]["step"]), "weights": args.weights})
    print(f"exported {args.weights} weights of {st['path']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
