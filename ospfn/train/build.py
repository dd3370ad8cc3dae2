"""Build an SFT run from a validated recipe config: data, VAE, model, trainer, resumed state.

``make_trainer(cfg, out_dir, resume, device=...)`` returns an ``ospfn.train.step.Trainer`` on one process
or an ``ospfn.train.distributed.FSDPTrainer`` under torchrun (``WORLD_SIZE`` > 1).  Everything that can be
wrong with a config, the launch (a ``parallel`` section the number of processes cannot carry), the device or
a resume source raises ``TrainError`` before any training work starts.

One process runs on ``device`` (cpu by default here; ``recipes/train.py`` defaults to cuda when available):
the model, the text encoder, the EMA, the optimizer state and every batch live there, and ``train.precision:
bf16`` autocasts on that device type.  Under torchrun each rank's device comes from the launch
(``ospfn.parallel.init_parallel``: cuda + nccl, npu + hccl, or cpu + gloo).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ospfn.train.step import RunParts, Trainer

__all__ = ["TrainError", "build_parts", "check_launch", "launch_world", "make_trainer", "local_trainer", "fsdp_trainer"]


class TrainError(ValueError):
    """A run cannot start; the message names the config key or option at fault (``model.checkpoint: ...``)."""


def build_parts(cfg) -> RunParts:
    """Model config, text config, VAE and dataset of a recipe config (validated, before any work)."""
    from ospfn.model.vae import PixelVAE
    from ospfn.train.sft import derive_configs

    try:
        dit_cfg, text_cfg, _ = derive_configs(cfg)
    except ValueError as e:  # the message names the key (model.overrides.<key>, text.heads, ...)
        raise TrainError(str(e)) from e
    vae = PixelVAE(cfg.vae.spatial)
    if cfg.model.checkpoint and not Path(cfg.model.checkpoint).exists():
        raise TrainError(f"model.checkpoint: no such file or directory: {cfg.model.checkpoint}")
    if cfg.train.attn_backend is not None:
        from ospfn import backends

        st = backends.info(cfg.train.attn_backend)
        if not st.available:
            raise TrainError(f"train.attn_backend: backend {cfg.train.attn_backend!r} is not available here: {st.reason}; "
                             f"available: {backends.available()} (or null for automatic)")  # fmt: skip
    if cfg.data.kind == "synthetic":
        from ospfn.data import SyntheticMotion

        dataset = SyntheticMotion(
            cfg.data.num_samples, frames=cfg.data.frames, size=tuple(cfg.data.size), split="train", seed=cfg.data.seed
        )
    else:
        from ospfn.data import VideoDataset, filter_clips, load_index

        if not cfg.data.index or not Path(cfg.data.index).exists():
            raise TrainError(f"data.index: no such file: {cfg.data.index}")
        kept, _ = filter_clips(load_index(cfg.data.index), train_fps=cfg.data.train_fps, sample_num_frames=cfg.data.frames)
        dataset = VideoDataset(
            kept, num_frames=cfg.data.frames, train_fps=cfg.data.train_fps, buckets=[tuple(b) for b in cfg.data.buckets], seed=cfg.data.seed
        )
    return RunParts(dit_cfg, text_cfg, vae, dataset)


def _initial_weights(cfg, parts: RunParts) -> tuple[dict, dict]:
    """(DiT weights: ``model.checkpoint`` or a seeded init, text-encoder weights: a seeded init)."""
    from ospfn.model import init_params
    from ospfn.model.checkpoint import load_checkpoint
    from ospfn.model.text import init_tiny_text_params

    seed = cfg.train.seed
    dit = (
        load_checkpoint(cfg.model.checkpoint, parts.dit_cfg, dtype=torch.float32)
        if cfg.model.checkpoint
        else init_params(parts.dit_cfg, seed=seed)
    )
    return dit, init_tiny_text_params(parts.text_cfg, seed=seed + 1)


def _check_resume_config(saved, cfg, path) -> None:
    from ospfn.train.sft import resume_conflicts

    conflicts = resume_conflicts(saved or {}, cfg.to_dict())
    if conflicts:
        raise TrainError(f"--resume: the checkpoint {path} was written with different values of {', '.join(conflicts)}")


def launch_world() -> int:
    """The number of processes of this launch (torchrun's ``WORLD_SIZE``; 1 without torchrun)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        world = 0
    if world < 1:
        raise TrainError(f"WORLD_SIZE must be a positive int (set by torchrun), got {text!r}")
    return world


def check_launch(cfg, world: int) -> None:
    """``TrainError`` naming the ``parallel`` keys when this launch of ``world`` processes cannot carry them
    (the same verdict on every rank: it depends on the config and WORLD_SIZE only)."""
    S, U = cfg.parallel.skiparse_sp, cfg.parallel.ulysses_sp
    su = S * U
    if world % su:
        launch = "one process (no torchrun)" if world == 1 else f"{world} processes"
        raise TrainError(
            f"parallel.skiparse_sp * parallel.ulysses_sp = {S} * {U} = {su} does not divide the launch: {launch}; "
            f"launch a multiple of {su} processes (torchrun --nproc-per-node {su}) or set both to 1"
        )


def make_trainer(cfg, out_dir, resume=None, *, device=None) -> Trainer:
    """The run's trainer, resumed from ``resume`` ("latest" = the newest checkpoint in ``out_dir``, or a path).

    ``device``: one process runs there (default cpu); under torchrun it may only be ``"cpu"`` or ``"cuda"``
    (the device type of every rank; default: from the launch)."""
    world = launch_world()
    check_launch(cfg, world)
    if world > 1:
        return fsdp_trainer(cfg, out_dir, resume, device=device)
    return local_trainer(cfg, out_dir, resume, device=device)


def _device(device):
    from ospfn.train.config import resolve_device

    if device is None:
        return torch.device("cpu")
    try:
        return resolve_device(device)
    except ValueError as e:
        raise TrainError(f"device: {e}") from None


def local_trainer(cfg, out_dir, resume=None, *, device=None) -> Trainer:
    """One process on ``device`` (default cpu): the DiT as ``ospfn.nn.DiT`` and the text encoder as
    ``TextModule`` over the weights, moved there with the EMA and the optimizer state."""
    from ospfn.nn import DiT
    from ospfn.train.distributed import TextModule
    from ospfn.train.sft import split_params
    from ospfn.model.checkpoint import CheckpointError
    from ospfn.train.state import latest_checkpoint, load_train_state

    dev = _device(device)
    check_launch(cfg, 1)
    parts = build_parts(cfg)
    ckpt = None
    if resume is not None:
        src = Path(out_dir) if resume == "latest" else Path(resume)
        try:
            if latest_checkpoint(src) is None and not (src / "state.pt").exists():
                raise TrainError(f"--resume: no checkpoint found in {src}")
            ckpt = load_train_state(src)
        except CheckpointError as e:
            raise TrainError(f"--resume: {e}") from None
        _check_resume_config(ckpt["state"].get("config"), cfg, ckpt["path"])
        dit_w, text_w = split_params(ckpt["params"])
    else:
        dit_w, text_w = _initial_weights(cfg, parts)
    dit_w = {k: v.to(dev) for k, v in dit_w.items()}
    text_w = {k: v.to(dev) for k, v in text_w.items()}
    model = DiT(parts.dit_cfg, dit_w)  # the module's parameters share the tensors' storage
    text = TextModule(text_w, parts.text_cfg)
    text.requires_grad_(cfg.text.train)
    named = {**{f"dit.{k}": v for k, v in model.named_parameters()}, **{f"text.{k}": v for k, v in text.params().items()}}
    trainer = Trainer(cfg, parts, named, model=model, text=text, device=dev)
    if ckpt is not None:
        trainer.load(ckpt)
        trainer.resumed_from = ckpt["path"]
    return trainer


def fsdp_trainer(cfg, out_dir, resume=None, *, device=None) -> Trainer:
    """torch.distributed (already initialised, or by ``init_parallel``): FSDP2 over all ranks, the config's
    sequence parallelism inside each data-parallel replica.  ``device``: None (from the launch), "cpu" or
    "cuda" (rank r uses cuda:LOCAL_RANK).  Collective."""
    from torch.distributed.device_mesh import init_device_mesh

    from ospfn.nn import DiT
    from ospfn.parallel import ParallelConfig, agree, init_parallel
    from ospfn.train.distributed import FSDPTrainer, TextModule, TrainModules, latest_dcp, shard

    if device is not None:
        dev_type = _device(device)
        if dev_type.index is not None:
            raise TrainError(f"device: under torchrun give a device type (cpu or cuda; each rank uses cuda:LOCAL_RANK), got {device!r}")
        device = dev_type.type
    try:
        st = init_parallel(ParallelConfig(skiparse_sp=cfg.parallel.skiparse_sp, ulysses_sp=cfg.parallel.ulysses_sp), device=device)
    except ValueError as e:
        raise TrainError(f"parallel: {e}") from e
    # what only some ranks may see (a data index, model.checkpoint or resume source missing on one node) is
    # checked on every rank and agreed on: the same TrainError everywhere, before the run's first collective
    problem, src = "", None
    try:
        parts = build_parts(cfg)
        dit_w, text_w = _initial_weights(cfg, parts)
        if resume is not None:
            src = latest_dcp(out_dir) if resume == "latest" else Path(resume)
            if src is None or not src.exists():
                raise TrainError(f"--resume: no checkpoint found in {out_dir if resume == 'latest' else resume}")
    except (ValueError, OSError) as e:  # TrainError, CheckpointError (model.checkpoint), a file that vanished
        problem = str(e) or type(e).__name__
    agree(not problem, problem, error=TrainError)
    dev = st.device
    modules = TrainModules(DiT(parts.dit_cfg, {k: v.to(dev) for k, v in dit_w.items()}),
                           TextModule({k: v.to(dev) for k, v in text_w.items()}, parts.text_cfg))  # fmt: skip
    if not cfg.text.train:
        modules.text.requires_grad_(False)
    shard(modules, init_device_mesh(dev.type, (st.world,)))
    trainer = FSDPTrainer(cfg, parts, modules, st)  # compiles the blocks (train.compile) after fully_shard
    if resume is not None:
        extra = trainer.load(src)
        _check_resume_config(extra.get("config"), cfg, src)
        trainer.resumed_from = src
    return trainer
