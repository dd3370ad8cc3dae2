#!/usr/bin/env python
"""SFT training for T2V and FlashI2V from a YAML config (schema: ``ospfn.train.sft.SFTConfig``).

    python recipes/train.py --config recipes/configs/tiny_flashi2v.yaml
    python recipes/train.py --config recipes/configs/tiny_flashi2v.yaml --resume      # continue exactly
    torchrun --nproc-per-node 2 recipes/train.py --config recipes/configs/tiny_flashi2v.yaml   # FSDP2 (+ SP)

One process runs on ``--device`` (default: cuda when available, else cpu); ``train.precision: bf16`` autocasts
on that device.  Under torchrun each rank takes its device from the launch (nccl on CUDA, gloo on CPU).

Under torchrun (WORLD_SIZE > 1) the model is sharded with FSDP2 (one unit per block), the config's
``parallel`` section sets Skiparse / Ulysses sequence parallelism, data is sharded over data-parallel
replicas (an SP group shares its samples and noise), and checkpoints are torch.distributed.checkpoint
directories.  ``train.compile: true`` compiles each DiT block with torch.compile.

Writes ``<out_dir>/ckpt-<step>/`` checkpoints (atomic; model, EMA, optimizer, clip statistics, data position,
RNG), ``<out_dir>/log.jsonl`` and, when the schedule completes, ``<out_dir>/final/`` -- a pipeline directory
(EMA weights) that ``recipes/sample.py --checkpoint`` loads (a ``text.kind: qwen_vl`` run: the DiT, the VLM adapter
and ``ospfn_export.json``, a uniworld pipeline; docs/i2sv.md#training-the-adapter).

The step itself (loss, clipping, learning rate, AdamW, EMA) is ``ospfn.train.step.Trainer.train_step``; the
run is built by ``ospfn.train.build.make_trainer``.  This script is the loop around them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path



def _path_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a non-empty path, got {text!r}")
    return text


def parse_args(argv=None):
    from ospfn.train.config import int_arg, resolve_device

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=_path_arg, help="YAML config (see recipes/configs/)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, type=_path_arg,
                   help="resume from the latest checkpoint in out_dir, or from PATH")  # fmt: skip
    p.add_argument("--out-dir", default=None, type=_path_arg, help="override out_dir of the config")
    p.add_argument("--stop-after", type=int_arg(1), default=None, help="stop (with a checkpoint) after this global step (>= 1)")
    p.add_argument("--threads", type=int_arg(1, 4096), default=None, help="torch CPU threads (>= 1; default: torch's)")
    p.add_argument("--device", type=resolve_device, default=None,
                   help="one process: cpu, cuda or cuda:N (default: cuda when available, else cpu); "
                        "under torchrun: cpu or cuda (default: from the launch)")  # fmt: skip
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
    from ospfn.train.config import ConfigError, run_setup
    from ospfn.train.sft import SFTConfig

    try:
        cfg, out_dir, device = run_setup(args, SFTConfig)
    except ConfigError as e:  # names the file and the key (or the line of a YAML syntax error)
        fail(str(e))
    try:
        trainer = make_trainer(cfg, out_dir, resume=args.resume, device=device)
    except TrainError as e:
        fail(str(e))
    return train(trainer, cfg, out_dir, stop_after=args.stop_after, progress=not args.no_progress)


def train(trainer, cfg, out_dir: Path, *, stop_after=None, progress=True) -> int:
    """Step until ``train.steps`` (or ``stop_after``): log, checkpoint, and export the EMA at the end.

    ``trainer.start`` prepares ``out_dir`` (the log keeps each step once across resumes; temporaries of killed
    runs are removed).  A run that cannot start exits 2, one that cannot go on (a non-finite step under
    ``train.nonfinite: stop``, a checkpoint that cannot be written) exits 1, with the same message on every rank."""
    from ospfn.train.build import TrainError
    from ospfn.train.step import RunError

    tc = cfg.train
    main_rank = trainer.is_main
    try:
        notes = trainer.start(out_dir)
    except TrainError as e:
        fail(str(e))
    if trainer.resumed_from is not None and main_rank:
        print(f"resumed from {trainer.resumed_from} at step {trainer.step}", flush=True)
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = progress_bar(trainer.step, end) if progress and trainer.world == 1 else None
    say = bar.write if bar is not None else (lambda s: print(s, flush=True))
    for note in notes:
        say(note)
    try:
        while trainer.step < end:
            rec = trainer.train_step()
            step = trainer.step
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if main_rank and rec.get("skipped"):
                say(f"warning: step {step}: non-finite loss ({rec['loss']}) or gradient norm ({rec['grad_norm']}); "
                    f"the step was skipped (train.nonfinite: skip; {rec['skipped_nonfinite']} so far)")  # fmt: skip
            if main_rank and (step % tc.log_every == 0 or step == end or rec.get("skipped")):
                say(trainer.log(rec))
            if step % tc.ckpt_every == 0 or step == end:
                trainer.save(out_dir)
        if bar is not None:
            bar.close()
            bar = None
        if trainer.step >= tc.steps:
            final = trainer.export(out_dir / "final")
            if final is not None:
                print(f"exported the EMA pipeline to {final}", flush=True)
    except RunError as e:
        if bar is not None:
            bar.close()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    trainer.finish()
    return 0

if __name__ == "__main__":
    sys.exit(main())
