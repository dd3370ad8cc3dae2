#!/usr/bin/env python
"""Turn a training checkpoint into a pipeline directory that recipes/sample.py loads.

    python recipes/export.py --run runs/tiny_flashi2v --out runs/tiny_flashi2v/export-1000     # latest checkpoint, EMA
    python recipes/export.py --run runs/tiny_flashi2v/ckpt-00001000 --weights model --out out/raw
    python recipes/export.py --run runs/tiny_flashi2v --out ospfn/assets/tiny_flashi2v --guidance 1.0

The sampling defaults stored in the pipeline come from the run's ``sample:`` config section; ``--steps``
(1..10000), ``--guidance`` (finite, >= 0), ``--shift`` (finite, > 0) and ``--fourier-ratio`` (in [0, 1))
replace them (e.g. after tuning with eval_tiny.py).  Out-of-range values fail before anything is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def _path_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a non-empty path, got {text!r}")
    return text


def parse_args(argv=None):
    from ospfn.train.config import float_arg, int_arg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=_path_arg, help="a run directory (its latest checkpoint) or a ckpt-* directory")
    p.add_argument("--out", required=True, type=_path_arg, help="pipeline directory to write")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.add_argument("--steps", type=int_arg(1, 10_000), help="default sampling steps (1..10000)")
    p.add_argument("--guidance", type=float_arg(0), help="default classifier-free guidance scale (finite, >= 0)")
    p.add_argument("--shift", type=float_arg(0, lo_open=True), help="default sigma shift (finite, > 0)")
    p.add_argument("--fourier-ratio", type=float_arg(0, 1, hi_open=True), help="default Fourier high-frequency ratio, in [0, 1)")
    return p.parse_args(argv)


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return fail(f"--out: {out} exists and is not a directory")

    from ospfn.model.checkpoint import CheckpointError
    from ospfn.train.config import ConfigError, load_config
    from ospfn.train.sft import SFTConfig, export_pipeline
    from ospfn.train.state import load_train_state

    if not Path(args.run).exists():
        return fail(f"--run: no such directory: {args.run}")
    try:
        st = load_train_state(args.run)
    except (FileNotFoundError, CheckpointError) as e:
        return fail(f"--run: {e}")
    saved = st["state"].get("config") if isinstance(st.get("state"), dict) else None
    if not isinstance(saved, dict):
        return fail(f"--run: the checkpoint {st['path']} holds no run config (state.pt lacks 'config')")
    try:
        cfg = load_config(saved, SFTConfig)
    except ConfigError as e:
        return fail(f"--run: the config stored in {st['path']} is not valid: {e}")
    sample = {k: getattr(args, k) for k in ("steps", "guidance", "shift", "fourier_ratio") if getattr(args, k) is not None}
    if sample:
        cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **sample))
    weights = st["ema"] if args.weights == "ema" else st["params"]
    if weights is None:
        return fail(f"--weights ema: the checkpoint {st['path']} has no ema.safetensors; use --weights model")
    out = export_pipeline(cfg, weights, args.out, info={"trained_steps": int(st["state"]["step"]), "weights": args.weights})
    print(f"exported {args.weights} weights of {st['path']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
