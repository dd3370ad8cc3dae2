#!/usr/bin/env python
"""Encode a video corpus once into a latent cache that training reads instead of the videos.

    python recipes/prepare_data.py --config recipes/configs/flashi2v_1_3b.yaml --device cuda --dtype bf16
    python recipes/train.py --config recipes/configs/flashi2v_1_3b.yaml          # trains from the cache

The config is the training config (schema ``ospfn.train.sft.SFTConfig``) with ``data.kind: latents``: the
clips of ``data.index`` (filtered, resampled to ``data.train_fps``, ``data.frames`` frames, cropped to
``data.buckets``: exactly what ``data.kind: video`` would train on) are encoded with the ``vae`` and ``text``
sections' encoders (``vae.path``, ``text.path``) into ``data.cache`` (or ``--out``); with ``train.task:
flashi2v`` frame 0 is also encoded on its own.  With ``text.kind: qwen_vl`` (Uniworld-OSP2.0) the frozen
Qwen2.5-VL of ``text.path`` reads each clip's frame 0 with its caption, and with ``""`` (the clip's own empty
context for text dropout); ``--dtype`` is then the VLM's dtype.  Shards are written atomically: a killed run, started again
with the same command, continues from the first unfinished shard (``--stop-after N`` stops on purpose).

Exit status: 0 done (or stopped by ``--stop-after``), 2 bad arguments, config or cache (the message names
the key or file), 1 a clip that cannot be encoded (unless ``--skip-bad``), 130 interrupted.  The logic is
``ospfn.train.build.prepare_from_config`` and ``ospfn.data.latents.prepare_cache``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _path_arg(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be a non-empty path, got {text!r}")
    return text


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    from ospfn.train.config import int_arg, resolve_device

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=_path_arg, help="training YAML config with data.kind: latents")
    p.add_argument("--out", default=None, type=_path_arg, help="cache directory (default: data.cache of the config)")
    p.add_argument("--device", type=resolve_device, default=None, help="where the encoders run: cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the UMT5 / Qwen2.5-VL / Wan VAE encoders (default fp32)")
    p.add_argument("--store-dtype", choices=sorted(DTYPES), default="fp32",
                   help="dtype of the stored latents and features (fp32: exact; bf16: half the size)")  # fmt: skip
    p.add_argument("--shard-size", type=int_arg(1, 1_000_000), default=64, help="samples per shard file (default 64)")
    p.add_argument("--stop-after", type=int_arg(1), default=None, help="stop once this many clips are done (a later run continues)")
    p.add_argument("--skip-bad", action="store_true", help="leave out clips that cannot be decoded or encoded (listed in index.json)")
    p.add_argument("--vae-tiling", action="store_true", help="spatial tiling in the Wan VAE (less memory for large frames)")
    p.add_argument("--threads", type=int_arg(1, 4096), default=None, help="torch CPU threads (>= 1; default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ospfn.data.latents import CacheItemError, LatentCacheError
    from ospfn.train.build import TrainError, prepare_from_config
    from ospfn.train.config import ConfigError, load_config, resolve_device
    from ospfn.train.sft import SFTConfig

    try:
        cfg = load_config(args.config, SFTConfig)
    except ConfigError as e:
        fail(str(e))
    except FileNotFoundError as e:
        fail(f"--config: {e}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else cfg.data.cache
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        fail(f"{'--out' if args.out is not None else 'data.cache'}: {out} exists and is not a directory")
    device = args.device if args.device is not None else resolve_device(None)
    try:
        index = prepare_from_config(cfg, out=args.out, device=device, dtype=DTYPES[args.dtype], store_dtype=DTYPES[args.store_dtype],
                                    shard_size=args.shard_size, skip_bad=args.skip_bad, stop_after=args.stop_after,
                                    vae_tiling=args.vae_tiling, progress=not args.no_progress, log=print)  # fmt: skip
    except TrainError as e:
        fail(str(e))
    except CacheItemError as e:  # a clip that cannot be encoded: a data problem
        fail(str(e), 1)
    except LatentCacheError as e:  # a cache that does not fit the command, another writer
        fail(str(e))
    except KeyboardInterrupt:
        print(f"interrupted: run the same command again to continue {out}", file=sys.stderr)
        return 130
    state = "complete" if index["complete"] else f"{index['next']} of {index['num_source']} clips done; run again to continue"
    skipped = len(index.get("skipped", []))
    print(f"{out}: {index['num_samples']} samples in {len(index['shards'])} shard(s), {state}"
          + (f"; {skipped} clip(s) skipped (see index.json)" if skipped else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
