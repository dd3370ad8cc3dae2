"""FSDP2 pieces of the SFT recipe: module containers, sharding, a sharded EMA, DCP checkpoints, and
``FSDPTrainer`` -- the shared step of ``ospfn.train.step.Trainer`` with these pieces plugged in.

The DiT runs as ``ospfn.nn.DiT`` (one module per block) and the tiny text encoder as ``TextModule``; both are
``fully_shard``-ed over all ranks (ZeRO-3).  FSDP averages gradients over the world; under sequence
parallelism each SP rank holds a partial gradient, so the loss is scaled by the SP size (mean over
data-parallel replicas, sum over SP ranks: ``FSDPTrainer.backward``).  Checkpoints are
torch.distributed.checkpoint directories written to a temporary name and renamed by rank 0 after a barrier,
plus a JSON of the scalar state.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ospfn.train.sft import export_pipeline
from ospfn.train.step import RunParts, Trainer

__all__ = ["TextModule", "TrainModules", "shard", "ShardedEMA", "save_dcp", "load_dcp", "latest_dcp", "FSDPTrainer"]


class _Holder(nn.Module):
    pass


def _param_tree(root: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Register ``params`` under ``root`` with their dotted names as nested plain modules."""
    for name, t in params.items():
        *path, leaf = name.split(".")
        mod = root
        for seg in path:
            if not hasattr(mod, seg):
                mod.add_module(seg, _Holder())
            mod = getattr(mod, seg)
        mod.register_parameter(leaf, nn.Parameter(t))


class TextModule(nn.Module):
    """The tiny text encoder as a module (so FSDP can shard it); forward(prompts) -> features."""

    def __init__(self, params: dict[str, torch.Tensor], cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.tree = _Holder()
        _param_tree(self.tree, params)

    def params(self) -> dict[str, torch.Tensor]:
        return {k[len("tree.") :]: v for k, v in self.named_parameters()}

    def forward(self, prompts):
        from ospfn.model.text import tiny_text_forward

        return tiny_text_forward(self.params(), self.cfg, prompts)[0]


class TrainModules(nn.Module):
    """Everything trained: ``dit`` (ospfn.nn.DiT) and ``text`` (TextModule)."""

    def __init__(self, dit: nn.Module, text: TextModule) -> None:
        super().__init__()
        self.dit, self.text = dit, text


def shard(modules: TrainModules, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in modules.dit.blocks_list:
        fully_shard(block, mesh=mesh)
    fully_shard(modules.dit, mesh=mesh)
    fully_shard(modules.text, mesh=mesh)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class ShardedEMA:
    """EMA over each rank's parameter shard (same sharding as the model, fp32)."""

    def __init__(self, named: dict[str, torch.Tensor], decay: float) -> None:
        self.decay = float(decay)
        self.shadow = {k: _local(v).detach().float().clone() for k, v in named.items()}
        self._meta = {k: v for k, v in named.items()}  # DTensor metadata for gathering / checkpoints

    @torch.no_grad()
    def update(self, named: dict[str, torch.Tensor]) -> None:
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [_local(named[k]).detach().float() for k in keys], 1.0 - self.decay)

    def as_dtensors(self) -> dict:
        from torch.distributed.tensor import DTensor

        out = {}
        for k, local in self.shadow.items():
            ref = self._meta[k]
            out[k] = DTensor.from_local(local, ref.device_mesh, ref.placements, shape=ref.shape, stride=ref.stride()) if isinstance(ref, DTensor) else local
        return out

    def full(self) -> dict[str, torch.Tensor]:
        """Unsharded EMA weights (collective: every rank must call)."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in self.as_dtensors().items()}

    def load_local(self, loaded: dict) -> None:
        for k, v in loaded.items():
            self.shadow[k].copy_(_local(v))


def latest_dcp(out_dir) -> Optional[Path]:
    out_dir = Path(out_dir)
    marker = out_dir / "latest"
    if marker.exists() and (out_dir / marker.read_text().strip()).is_dir():
        return out_dir / marker.read_text().strip()
    found = sorted(p for p in out_dir.glob("ckpt-*") if p.is_dir())
    return found[-1] if found else None


def save_dcp(out_dir, step: int, modules: TrainModules, optimizer, ema: ShardedEMA, extra: dict, keep: int = 2) -> Path:
    """Collective: every rank writes its shards into ``ckpt-<step>`` (atomically renamed by rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out_dir = Path(out_dir)
    final = out_dir / f"ckpt-{step:08d}"
    tmp = out_dir / f".ckpt-{step:08d}.tmp"
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(modules, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema.as_dtensors()}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / "train_state.json").write_text(json.dumps(extra))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        marker = out_dir / ".latest.tmp"
        marker.write_text(final.name + "\n")
        os.replace(marker, out_dir / "latest")
        ckpts = sorted(p for p in out_dir.glob("ckpt-*") if p.is_dir())
        for old in ckpts[: max(0, len(ckpts) - keep)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_dcp(path, modules: TrainModules, optimizer, ema: ShardedEMA) -> dict:
    """Collective: restore model, optimizer and EMA shards; returns the scalar training state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(modules, optimizer)
    ema_sd = ema.as_dtensors()
    state = {"model": model_sd, "optim": optim_sd, "ema": ema_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(modules, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ema.load_local(state["ema"])
    return json.loads((Path(path) / "train_state.json").read_text())


class FSDPTrainer(Trainer):
    """The SFT step on torch.distributed: FSDP2 over all ranks, SP inside each data-parallel replica.

    ``modules`` must already be ``shard``-ed; with ``train.compile`` the blocks are compiled here, after
    ``fully_shard``.  Every method that talks to other ranks is collective: call it on every rank.
    """

    def __init__(self, cfg, parts: RunParts, modules: TrainModules, st) -> None:
        self.modules, self.parallel = modules, st
        self.world, self.dp, self.dp_rank, self.sp_size = st.world, st.dp, st.dp_rank, st.sp_size
        self.is_main = st.rank == 0
        super().__init__(cfg, parts, dict(modules.named_parameters()), model=modules.dit, text=modules.text, device=st.device)

    def make_ema(self, named, decay):
        return ShardedEMA(named, decay)

    def encode_text(self, captions):
        both = self.text(list(captions) + [""])  # one call per micro-step (one FSDP unit pass)
        return both[:-1], both[-1:]

    def backward(self, loss):
        # FSDP averages gradients over all ranks: x SP size = mean over replicas, sum over SP shards
        (loss * self.sp_size / self.cfg.train.grad_accum).backward()

    def mean_loss(self, loss):
        t = torch.tensor([loss], device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def log_extra(self):
        return {"world": self.world}

    def save(self, out_dir):
        extra = {"step": self.step, "data_pos": self.pos, "clip": self.clip.state_dict(), "config": self.cfg.to_dict()}
        return save_dcp(out_dir, self.step, self.modules, self.opt, self.ema, extra, keep=self.cfg.train.keep)

    def load(self, path) -> dict:
        """Restore a ``save`` checkpoint directory; returns its scalar state (with the config it was written with)."""
        extra = load_dcp(path, self.modules, self.opt, self.ema)
        self.step, self.pos = int(extra["step"]), int(extra["data_pos"])
        self.clip.load_state_dict(extra["clip"])
        return extra

    def export(self, out):
        full = self.ema.full()  # collective
        if not self.is_main:
            return None
        weights = {("text." + k[len("text.tree.") :] if k.startswith("text.tree.") else k): v for k, v in full.items()}
        return export_pipeline(self.cfg, weights, out, info={"trained_steps": self.step, "samples_seen": self.pos, "world": self.world})

    def finish(self):
        dist.barrier()
