#!/usr/bin/env python
"""SFT training for T2V and FlashI2V from a YAML config (schema: ``ospfn.train.sft.SFTConfig``).

    python recipes/train.py --config recipes/configs/tiny_flashi2v.yaml
    python recipes/train.py --config recipes/configs/tiny_flashi2v.yaml --resume      # continue exactly
    torchrun --nproc-per-node 2 recipes/train.py --config recipes/configs/tiny_flashi2v.yaml   # FSDP2 (+ SP)

Under torchrun (WORLD_SIZE > 1) the model is sharded with FSDP2 (one unit per block), the config's
``parallel`` section sets Skiparse / Ulysses sequence parallelism, data is sharded over data-parallel
replicas (an SP group shares its samples and noise), and checkpoints are torch.distributed.checkpoint
directories.  ``train.compile: true`` compiles each DiT block with torch.compile.

Writes ``<out_dir>/ckpt-<step>/`` checkpoints (atomic; model, EMA, optimizer, clip statistics, data position,
RNG), ``<out_dir>/log.jsonl`` and, when the schedule completes, ``<out_dir>/final/`` -- a pipeline directory
(EMA weights) that ``recipes/sample.py --checkpoint`` loads.

The step itself (loss, clipping, learning rate, AdamW, EMA) is ``ospfn.train.step.Trainer.train_step``; the
run is built by ``ospfn.train.build.make_trainer``.  This script is the loop around them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (see recipes/configs/)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="resume from the latest checkpoint in out_dir, or from PATH")
    p.add_argument("--out-dir", default=None, help="override out_dir of the config")
    p.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this global step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def progress_bar(start: int, end: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ospfn.train.build import TrainError, make_trainer
    from ospfn.train.config import ConfigError, load_config
    from ospfn.train.sft import SFTConfig

    try:
        cfg = load_config(args.config, SFTConfig)
    except (ConfigError, FileNotFoundError) as e:
        fail(f"{args.config}: {e}")
    out_dir = Path(args.out_dir or cfg.out_dir)
    if not out_dir.is_absolute():
        out_dir = Path.cwd() / out_dir
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        trainer = make_trainer(cfg, out_dir, resume=args.resume)
    except TrainError as e:
        fail(str(e))
    return train(trainer, cfg, out_dir, stop_after=args.stop_after, progress=not args.no_progress)


def train(trainer, cfg, out_dir: Path, *, stop_after=None, progress=True) -> int:
    """Step until ``train.steps`` (or ``stop_after``): log, checkpoint, and export the EMA at the end."""
    tc = cfg.train
    main_rank = trainer.is_main
    if trainer.resumed_from is not None and main_rank:
        print(f"resumed from {trainer.resumed_from} at step {trainer.step}", flush=True)
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = progress_bar(trainer.step, end) if progress and trainer.world == 1 else None
    say = bar.write if bar is not None else (lambda s: print(s, flush=True))
    while trainer.step < end:
        rec = trainer.train_step()
        step = trainer.step
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        if main_rank and (step % tc.log_every == 0 or step == end):
            say(json.dumps(rec))
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if step % tc.ckpt_every == 0 or step == end:
            trainer.save(out_dir)
    if bar is not None:
        bar.close()
    if trainer.step >= tc.steps:
        final = trainer.export(out_dir / "final")
        if final is not None:
            print(f"exported the EMA pipeline to {final}", flush=True)
    trainer.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
