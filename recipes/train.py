#!/usr/bin/env python
"""SFT training for T2V and FlashI2V from a YAML config (schema: ``ospfn.train.sft.SFTConfig``).

    python recipes/train.py --config recipes/configs/tiny_flashi2v.yaml
    python recipes/train.py --config recipes/configs/tiny_flashi2v.yaml --resume      # continue exactly
    torchrun --nproc-per-node 2 recipes/train.py --config recipes/configs/tiny_flashi2v.yaml   # FSDP2 (+ SP)

Under torchrun (WORLD_SIZE > 1) the model is sharded with FSDP2 (one unit per block), the config's
``parallel`` section sets Skiparse / Ulysses sequence parallelism, data is sharded over data-parallel
replicas (an SP group shares its samples and noise), and checkpoints are torch.distributed.checkpoint
directories.

Writes ``<out_dir>/ckpt-<step>/`` checkpoints (atomic; model, EMA, optimizer, clip statistics, data position,
RNG), ``<out_dir>/log.jsonl`` and, when the schedule completes, ``<out_dir>/final/`` -- a pipeline directory
(EMA weights) that ``recipes/sample.py --checkpoint`` loads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


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


def build(cfg):
    """Model config, text config, VAE and dataset from the recipe config (validated, before any work)."""
    from ospfn.model.vae import PixelVAE
    from ospfn.train.sft import derive_configs

    try:
        dit_cfg, text_cfg, _ = derive_configs(cfg)
    except ValueError as e:
        fail(f"model: {e}")
    vae = PixelVAE(cfg.vae.spatial)
    if cfg.model.checkpoint and not Path(cfg.model.checkpoint).exists():
        fail(f"model.checkpoint: no such file or directory: {cfg.model.checkpoint}")
    if cfg.data.kind == "synthetic":
        from ospfn.data import SyntheticMotion

        dataset = SyntheticMotion(cfg.data.num_samples, frames=cfg.data.frames, size=tuple(cfg.data.size), split="train", seed=cfg.data.seed)
    else:
        from ospfn.data.video import VideoDataset, filter_clips, load_index

        if not cfg.data.index or not Path(cfg.data.index).exists():
            fail(f"data.index: no such file: {cfg.data.index}")
        kept, _ = filter_clips(load_index(cfg.data.index), train_fps=cfg.data.train_fps, sample_num_frames=cfg.data.frames)
        dataset = VideoDataset(kept, num_frames=cfg.data.frames, train_fps=cfg.data.train_fps, buckets=[tuple(b) for b in cfg.data.buckets], seed=cfg.data.seed)
    return dit_cfg, text_cfg, vae, dataset


def main(argv=None) -> int:
    args = parse_args(argv)
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return main_distributed(cfg, args, out_dir)
    dit_cfg, text_cfg, vae, dataset = build(cfg)

    from ospfn.model import init_params
    from ospfn.model.checkpoint import load_checkpoint
    from ospfn.model.text import init_tiny_text_params, tiny_text_forward
    from ospfn.sched import flow_matching_loss
    from ospfn.train.optim import EMA, AdaptiveGradClip, make_adamw, set_lr, warmup_constant
    from ospfn.train.sft import export_pipeline, join_params, param_groups, resume_conflicts, sample_order, split_params, step_generator
    from ospfn.train.state import latest_checkpoint, load_train_state, save_train_state

    tc, oc = cfg.train, cfg.optim
    resume = None
    if args.resume is not None:
        src = out_dir if args.resume == "latest" else Path(args.resume)
        if latest_checkpoint(src) is None and not (src / "state.pt").exists():
            fail(f"--resume: no checkpoint found in {src}")
        resume = load_train_state(src)
        conflicts = resume_conflicts(resume["state"].get("config") or {}, cfg.to_dict())
        if conflicts:
            fail(f"--resume: the checkpoint {resume['path']} was written with different values of {', '.join(conflicts)}")
        params = {k: v.clone() for k, v in resume["params"].items()}
    else:
        dit = load_checkpoint(cfg.model.checkpoint, dit_cfg, dtype=torch.float32) if cfg.model.checkpoint else init_params(dit_cfg, seed=tc.seed)
        params = join_params(dit, init_tiny_text_params(text_cfg, seed=tc.seed + 1))
    params = dict(sorted(params.items()))  # one fixed order: the optimizer state is stored by position
    for k, v in params.items():
        v.requires_grad_(k.startswith("dit.") or cfg.text.train)
    trainable = [v for v in params.values() if v.requires_grad]
    opt = make_adamw(param_groups(params, oc.branch_lr_mult), lr=oc.lr, weight_decay=oc.weight_decay, betas=oc.betas, eps=oc.eps)
    ema = EMA(params, oc.ema_decay)
    clip = AdaptiveGradClip(initial=oc.clip_initial, decay=oc.clip_decay, k=oc.clip_k)
    step, pos = 0, 0
    if resume is not None:
        st = resume["state"]
        opt.load_state_dict(st["optimizer"])
        ema.load_state_dict({"decay": oc.ema_decay, "shadow": resume["ema"]})
        clip.load_state_dict(st["clip"])
        step, pos = int(st["step"]), int(st["data_pos"])
        torch.set_rng_state(st["torch_rng"])
        print(f"resumed from {resume['path']} at step {step}", flush=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "log.jsonl"
    end = tc.steps if args.stop_after is None else min(tc.steps, args.stop_after)
    is_i2v = dit_cfg.i2v == "flashi2v"
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if tc.precision == "bf16" else contextlib.nullcontext

    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=step, desc="train", unit="step", dynamic_ncols=True)
        except ImportError:
            bar = None
    say = bar.write if bar is not None else (lambda s: print(s, flush=True))

    def checkpoint():
        save_train_state(
            out_dir, step, params=params, ema=ema.shadow, keep=tc.keep,
            state={"optimizer": opt.state_dict(), "clip": clip.state_dict(), "data_pos": pos,
                   "torch_rng": torch.get_rng_state(), "config": cfg.to_dict()},
        )  # fmt: skip

    while step < end:
        t0 = time.perf_counter()
        total = 0.0
        for micro in range(tc.grad_accum):
            idx = sample_order(len(dataset), cfg.data.seed, pos, tc.batch_size)
            pos += tc.batch_size
            items = [dataset[i] for i in idx]
            videos = torch.stack([it["video"] for it in items])
            with torch.no_grad():
                z0 = vae.encode(videos)
                s = vae.encode(videos[:, :, :1]) if is_i2v else None
            dit_p, text_p = split_params(params)
            ctx, _ = tiny_text_forward(text_p, text_cfg, [it["caption"] for it in items])
            empty, _ = tiny_text_forward(text_p, text_cfg, [""])
            with autocast():
                loss = flow_matching_loss(
                    dit_p, dit_cfg, z0, ctx, generator=step_generator(tc.seed, step, micro), empty_context=empty,
                    text_drop=tc.text_drop, cond_image_latent=s, ratio_range=tc.ratio_range, shift=tc.shift,
                    logit_normal=tc.logit_normal, attn_backend=tc.attn_backend, grad_checkpoint=tc.grad_checkpoint,
                )  # fmt: skip
            (loss / tc.grad_accum).backward()
            total += float(loss.detach()) / tc.grad_accum
        grads = [v.grad for v in trainable if v.grad is not None]
        if oc.adaptive_clip:
            gnorm, thr = clip(grads)
        else:
            gnorm, thr = float(torch.nn.utils.clip_grad_norm_(trainable, oc.clip_initial)), oc.clip_initial
        lr = warmup_constant(step, base_lr=oc.lr, warmup_steps=oc.warmup_steps)
        set_lr(opt, lr)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(params)
        step += 1
        dt = time.perf_counter() - t0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
        if step % tc.log_every == 0 or step == end:
            rec = {"step": step, "loss": total, "lr": lr, "grad_norm": gnorm, "clip_threshold": thr, "step_time": dt, "samples": pos}
            say(json.dumps(rec))
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if step % tc.ckpt_every == 0 or step == end:
            checkpoint()
    if bar is not None:
        bar.close()
    if step >= tc.steps:
        final = export_pipeline(cfg, ema.shadow, out_dir / "final", info={"trained_steps": step, "samples_seen": pos})
        print(f"exported the EMA pipeline to {final}", flush=True)
    return 0


def main_distributed(cfg, args, out_dir: Path) -> int:
    """The same loop on torch.distributed: FSDP2 over all ranks, SP inside each data-parallel replica."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ospfn.parallel import ParallelConfig, init_parallel
    from ospfn.model import init_params
    from ospfn.model.checkpoint import load_checkpoint
    from ospfn.model.text import init_tiny_text_params
    from ospfn.nn import DiT
    from ospfn.sched import flow_matching_loss
    from ospfn.train.distributed import ShardedEMA, TextModule, TrainModules, latest_dcp, load_dcp, save_dcp, shard
    from ospfn.train.optim import AdaptiveGradClip, global_grad_norm, make_adamw, set_lr, warmup_constant
    from ospfn.train.sft import export_pipeline, param_groups, resume_conflicts, sample_order, step_generator

    try:
        st = init_parallel(ParallelConfig(skiparse_sp=cfg.parallel.skiparse_sp, ulysses_sp=cfg.parallel.ulysses_sp))
    except ValueError as e:
        fail(f"parallel: {e}")
    rank0 = st.rank == 0
    tc, oc = cfg.train, cfg.optim
    if args.threads:
        torch.set_num_threads(args.threads)
    dit_cfg, text_cfg, vae, dataset = build(cfg)
    dev = st.device
    dit = load_checkpoint(cfg.model.checkpoint, dit_cfg, dtype=torch.float32) if cfg.model.checkpoint else init_params(dit_cfg, seed=tc.seed)
    modules = TrainModules(DiT(dit_cfg, {k: v.to(dev) for k, v in dit.items()}),
                           TextModule({k: v.to(dev) for k, v in init_tiny_text_params(text_cfg, seed=tc.seed + 1).items()}, text_cfg))  # fmt: skip
    if not cfg.text.train:
        modules.text.requires_grad_(False)
    shard(modules, init_device_mesh(dev.type, (st.world,)))
    named = dict(sorted(modules.named_parameters()))
    trainable = [p for p in named.values() if p.requires_grad]
    opt = make_adamw(param_groups(named, oc.branch_lr_mult), lr=oc.lr, weight_decay=oc.weight_decay, betas=oc.betas, eps=oc.eps)
    ema = ShardedEMA(named, oc.ema_decay)
    clip = AdaptiveGradClip(initial=oc.clip_initial, decay=oc.clip_decay, k=oc.clip_k)
    step, pos = 0, 0
    if args.resume is not None:
        src = latest_dcp(out_dir) if args.resume == "latest" else Path(args.resume)
        if src is None or not src.exists():
            fail(f"--resume: no checkpoint found in {out_dir if args.resume == 'latest' else args.resume}")
        extra = load_dcp(src, modules, opt, ema)
        conflicts = resume_conflicts(extra.get("config") or {}, cfg.to_dict())
        if conflicts:
            fail(f"--resume: the checkpoint {src} was written with different values of {', '.join(conflicts)}")
        step, pos = int(extra["step"]), int(extra["data_pos"])
        clip.load_state_dict(extra["clip"])
        if rank0:
            print(f"resumed from {src} at step {step}", flush=True)
    end = tc.steps if args.stop_after is None else min(tc.steps, args.stop_after)
    is_i2v = dit_cfg.i2v == "flashi2v"
    gb = st.dp * tc.batch_size  # global batch per micro-step
    lo = st.dp_rank * tc.batch_size

    def fwd(_params, _cfg, x, t, ctx, **kw):
        return modules.dit(x, t, ctx, parallel=st, attn_backend=tc.attn_backend, grad_checkpoint=tc.grad_checkpoint, **kw)

    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    while step < end:
        t0 = time.perf_counter()
        total = 0.0
        for micro in range(tc.grad_accum):
            idx = sample_order(len(dataset), cfg.data.seed, pos, gb)[lo : lo + tc.batch_size]
            pos += gb
            items = [dataset[i] for i in idx]
            videos = torch.stack([it["video"] for it in items]).to(dev)
            with torch.no_grad():
                z0 = vae.encode(videos)
                s = vae.encode(videos[:, :, :1]) if is_i2v else None
            both = modules.text([it["caption"] for it in items] + [""])  # one call per step (one FSDP unit pass)
            ctx, empty = both[:-1], both[-1:]
            loss = flow_matching_loss(
                None, dit_cfg, z0, ctx, generator=step_generator(tc.seed, step, micro), empty_context=empty,
                text_drop=tc.text_drop, cond_image_latent=s, ratio_range=tc.ratio_range, shift=tc.shift,
                logit_normal=tc.logit_normal, forward_fn=fwd, global_batch=gb, batch_offset=lo,
            )  # fmt: skip
            # FSDP averages gradients over all ranks: x SP size = mean over replicas, sum over SP shards
            (loss * st.sp_size / tc.grad_accum).backward()
            total += float(loss.detach()) / tc.grad_accum
        grads = [p.grad for p in trainable if p.grad is not None]
        gnorm, thr = clip(grads) if oc.adaptive_clip else (global_grad_norm(grads), oc.clip_initial)
        lr = warmup_constant(step, base_lr=oc.lr, warmup_steps=oc.warmup_steps)
        set_lr(opt, lr)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(named)
        step += 1
        loss_t = torch.tensor([total], device=dev)
        dist.all_reduce(loss_t)
        mean_loss = float(loss_t) / st.world
        if rank0 and (step % tc.log_every == 0 or step == end):
            rec = {"step": step, "loss": mean_loss, "lr": lr, "grad_norm": gnorm, "clip_threshold": thr,
                   "step_time": time.perf_counter() - t0, "samples": pos, "world": st.world}  # fmt: skip
            print(json.dumps(rec), flush=True)
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if step % tc.ckpt_every == 0 or step == end:
            save_dcp(out_dir, step, modules, opt, ema, {"step": step, "data_pos": pos, "clip": clip.state_dict(), "config": cfg.to_dict()}, keep=tc.keep)
    if step >= tc.steps:
        full = ema.full()
        if rank0:
            weights = {("text." + k[len("text.tree."):] if k.startswith("text.tree.") else k): v for k, v in full.items()}
            final = export_pipeline(cfg, weights, out_dir / "final", info={"trained_steps": step, "samples_seen": pos, "world": st.world})
            print(f"exported the EMA pipeline to {final}", flush=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
