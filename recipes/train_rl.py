#!/usr/bin/env python
"""Mix-GRPO RL post-training of a FlashI2V pipeline with a LoRA adapter (schema: ``ospfn.rl.config.RLConfig``).

    python recipes/train_rl.py --config recipes/configs/tiny_flashi2v_rl.yaml
    python recipes/train_rl.py --config recipes/configs/tiny_flashi2v_rl.yaml --resume     # continue exactly
    torchrun --nproc-per-node 2 recipes/train_rl.py --config ...                           # data / sequence parallel

Each iteration samples ``rollout.k`` videos for each of ``rollout.prompts_per_iter`` prompts with an SDE window
(``rollout.window``), scores them with the config's ``rewards``, and takes one AdamW step on the adapter with
the clipped GRPO objective and a KL to the adapter-disabled model (docs/rl.md).

Under torchrun the DiT is replicated on every rank (``parallel.fsdp: false``, the default) or sharded with
FSDP2 over all ranks with only the adapter trainable (``parallel.fsdp: true``); sequence parallelism inside
each data-parallel replica: ``parallel.skiparse_sp`` / ``parallel.ulysses_sp`` (docs/rl.md#the-recipe).

Writes ``<out_dir>/ckpt-<iteration>/`` (atomic; adapter, EMA, optimizer, clip statistics, iteration: one
process and the replicated mode as single files written by rank 0, the FSDP2 mode as a
torch.distributed.checkpoint directory every rank writes its shards into; ``--resume`` continues either
exactly, in the mode that wrote it), ``<out_dir>/log.jsonl`` (rewards mean / std per reward, KL, clip
fraction, approximate KL, window, times) and, when the schedule completes,
``<out_dir>/final/pytorch_lora_weights.safetensors`` (the EMA adapter, gathered to rank 0 under FSDP2,
diffusers format: ``recipes/sample.py --lora``).  The iteration is ``ospfn.rl.trainer.RLTrainer.iterate``;
this script is the loop around it.
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
    p.add_argument("--config", required=True, type=_path_arg, help="YAML config (see recipes/configs/*rl*.yaml)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, type=_path_arg,
                   help="resume from the latest checkpoint in out_dir, or from PATH")  # fmt: skip
    p.add_argument("--out-dir", default=None, type=_path_arg, help="override out_dir of the config")
    p.add_argument("--stop-after", type=int_arg(1), default=None, help="stop (with a checkpoint) after this iteration (>= 1)")
    p.add_argument("--threads", type=int_arg(1, 4096), default=None, help="torch CPU threads (>= 1; default: torch's)")
    p.add_argument("--device", type=resolve_device, default=None,
                   help="one process: cpu, cuda or cuda:N (default: cuda when available, else cpu); under torchrun: from the launch")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ospfn.rl.config import RLConfig
    from ospfn.rl.trainer import make_rl_trainer
    from ospfn.train.build import TrainError
    from ospfn.train.config import ConfigError, run_setup

    try:
        cfg, out_dir, device = run_setup(args, RLConfig)
    except ConfigError as e:  # names the file and the key (or the line of a YAML syntax error)
        fail(str(e))
    try:
        trainer = make_rl_trainer(cfg, out_dir, resume=args.resume, device=device)
    except TrainError as e:
        fail(str(e))
    return train(trainer, cfg, out_dir, stop_after=args.stop_after, progress=not args.no_progress)


def train(trainer, cfg, out_dir: Path, *, stop_after=None, progress=True) -> int:
    """Iterate until ``train.iterations`` (or ``stop_after``): log, checkpoint, export the EMA adapter at the end."""
    from ospfn.rl.trainer import RLRunError
    from ospfn.train.runlog import RunLog

    tc = cfg.train
    main_rank = trainer.is_main
    log = None
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = RunLog(out_dir / "log.jsonl")
        log.start(trainer.iteration)
        if trainer.resumed_from is not None:
            print(f"resumed from {trainer.resumed_from} at iteration {trainer.iteration}", flush=True)
    end = tc.iterations if stop_after is None else min(tc.iterations, stop_after)
    bar = None
    if progress and main_rank and trainer.world == 1:
        try:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=trainer.iteration, desc="rl", unit="it", dynamic_ncols=True)
        except ImportError:
            pass
    say = bar.write if bar is not None else (lambda s: print(s, flush=True))
    names = [r.name for r in cfg.rewards]
    try:
        while trainer.iteration < end:
            rec = trainer.iterate()
            it = trainer.iteration
            if bar is not None:
                bar.update(1)
                bar.set_postfix({n: f"{rec[f'reward_{n}_mean']:.3f}" for n in names})
            if main_rank and (it % tc.log_every == 0 or it == end or rec.get("skipped")):
                say(log.append(rec))
            if it % tc.ckpt_every == 0 or it == end:
                trainer.save(out_dir)
        if bar is not None:
            bar.close()
            bar = None
        if trainer.iteration >= tc.iterations:
            final = trainer.export(out_dir / "final")
            if final is not None:
                print(f"exported the EMA adapter to {final}", flush=True)
    except RLRunError as e:
        if bar is not None:
            bar.close()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
