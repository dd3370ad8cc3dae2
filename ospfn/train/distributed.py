"""FSDP2 pieces of the SFT recipe: module containers, sharding, a sharded EMA, DCP checkpoints, and
``FSDPTrainer`` -- the shared step of ``ospfn.train.step.Trainer`` with these pieces plugged in.

The DiT runs as ``ospfn.nn.DiT`` (one module per block) and the tiny text encoder as ``TextModule``; both are
``fully_shard``-ed over all ranks (ZeRO-3).  FSDP averages gradients over the world; under sequence
parallelism each SP rank holds a partial gradient, so the loss is scaled by the SP size (mean over
data-parallel replicas, sum over SP ranks: ``FSDPTrainer.backward``).  Checkpoints are
torch.distributed.checkpoint directories written to a temporary name and renamed by rank 0 after a barrier,
plus a JSON of the scalar state.

The VLM adapter of a ``text.kind: qwen_vl`` run (``ContextAdapter``, "ctx." names) is a third FSDP2 unit,
sharded like the others (its gradients are averaged over the world and, under SP, summed over the SP ranks
exactly as the DiT's: each SP rank's cross-attention sees the whole context, so its context gradient is a
partial sum); it is in the DCP checkpoints and the sharded EMA.  With the DiT frozen (``model.train: false`` or a
``lora`` section) the checkpoints hold the trainable parameters only (``ignore_frozen_params``).

A failure only some ranks see (rank 0 cannot create ``out_dir`` or rename the checkpoint, one rank's view of a
shard file is missing or truncated) is agreed on (``ospfn.parallel.agree``) and raised with the same message
on every rank, naming the rank and the file, before the ranks would part ways at the next collective.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ospfn._fs import write_text_atomic
from ospfn.model.checkpoint import CheckpointError
from ospfn.train.build import TrainError
from ospfn.train.sft import export_pipeline
from ospfn.train.step import RunError, RunParts, Trainer
from ospfn.train.state import install_checkpoint

__all__ = ["TextModule", "ContextAdapter", "TrainModules", "shard", "ShardedEMA", "save_dcp", "load_dcp", "latest_dcp", "check_dcp", "FSDPTrainer",
           "DCPCheckpointError"]  # fmt: skip


class DCPCheckpointError(CheckpointError, TrainError):
    """A torch.distributed.checkpoint directory cannot be resumed from: the message names the rank that found
    the problem and the file (raised on every rank alike)."""


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


class ContextAdapter(nn.Module):
    """The VLM context adapter of a ``text.kind: qwen_vl`` run as a module (parameters under ``ospfn.model.vlm``'s
    names: ``adapter.0.weight`` ..., so FSDP2 can shard it):
    ``forward(features, first_frame=None, style=None) -> uniworld_context(params, cfg, features, ...)``."""

    def __init__(self, params: dict[str, torch.Tensor], cfg) -> None:
        super().__init__()
        from ospfn.model.vlm import check_adapter_params

        check_adapter_params(params, cfg, "ContextAdapter")
        self.cfg = cfg
        _param_tree(self, params)

    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())

    def forward(self, features, first_frame=None, style=None):
        from ospfn.model.vlm import uniworld_context

        return uniworld_context(self.params(), self.cfg, features, first_frame=first_frame, style=style)


class TrainModules(nn.Module):
    """Everything trained: ``dit`` (ospfn.nn.DiT), ``text`` (TextModule) and, for a qwen_vl run, ``ctx``
    (ContextAdapter; None otherwise)."""

    def __init__(self, dit: nn.Module, text: TextModule, ctx: Optional[ContextAdapter] = None) -> None:
        super().__init__()
        self.dit, self.text = dit, text
        if ctx is not None:
            self.ctx = ctx
        else:
            self.ctx = None


def shard(modules: TrainModules, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in modules.dit.blocks_list:
        fully_shard(block, mesh=mesh)
    fully_shard(modules.dit, mesh=mesh)
    fully_shard(modules.text, mesh=mesh)
    if getattr(modules, "ctx", None) is not None:
        fully_shard(modules.ctx, mesh=mesh)


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
    """The DCP checkpoint ``out_dir/latest`` names (or the newest ``ckpt-*``); the same rules as
    ``ospfn.train.state.latest_checkpoint``: a ``latest`` naming a missing directory is an error, never skipped."""
    from ospfn.train.state import latest_checkpoint

    return latest_checkpoint(out_dir)


def _short(e: BaseException) -> str:
    """``Type: first line of the message`` (torch's unpickling errors run to a dozen lines)."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def _first_failure(e) -> str:
    """'rank R: what' of the first failing rank of a DCP ``CheckpointException`` (which DCP raises on every rank)."""
    failures = getattr(e, "failures", None) or {}
    if not failures:
        return _short(e)
    rank = min(failures)
    exc = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
    return f"rank {rank}: {exc}" if isinstance(exc, CheckpointError) else f"rank {rank}: {_short(exc)}"


def _naming_reader(path):
    """A DCP ``FileSystemReader`` whose read errors name the shard file being read (as ``CheckpointError``)."""
    import contextlib

    from torch.distributed.checkpoint import FileSystemReader

    class NamingReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            # torch's reader unpickles .metadata with plain pickle; this one builds DCP's own records only
            from ospfn.model.checkpoint import read_dcp_metadata

            if kwargs.get("rank") is not None:  # per-rank metadata files: torch's own path
                return super().read_metadata(*args, **kwargs)
            md = read_dcp_metadata(self.path)
            md.storage_meta.load_id = self.load_id
            return md

        def read_data(self, plan, planner):
            current = [None]
            open_stream = getattr(self.fs, "create_stream", None)
            if open_stream is not None:

                @contextlib.contextmanager
                def create_stream(path, mode):
                    current[0] = path
                    with open_stream(path, mode) as stream:
                        yield stream

                self.fs.create_stream = create_stream
            try:
                return super().read_data(plan, planner)
            except Exception as e:  # noqa: BLE001  (any failure to decode a shard: name the file)
                where = current[0] if current[0] is not None else self.path
                why = "corrupt: not the tensor data torch saved (UnpicklingError)" if isinstance(e, pickle.UnpicklingError) else _short(e)
                raise CheckpointError(f"{where}: unreadable, {why}") from e

    return NamingReader(str(path))


def save_dcp(out_dir, step: int, modules: nn.Module, optimizer, ema: ShardedEMA, extra: dict, keep: int = 2, *,
             options=None) -> Path:  # fmt: skip
    """Collective: every rank writes its shards into ``.ckpt-<step>.tmp-<pid of rank 0>``, which rank 0 renames
    to ``ckpt-<step>`` once every rank is done (the temporaries of a killed run are swept on the next start).
    A failure on any rank raises ``ospfn.train.step.RunError`` with the same message on every rank.
    ``options``: the ``StateDictOptions`` of ``get_state_dict`` (e.g. ``ignore_frozen_params=True`` to write a
    LoRA run's adapter without the frozen base model); None: torch's defaults."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ospfn.parallel import agree

    out_dir = Path(out_dir)
    final = out_dir / f"ckpt-{step:08d}"
    what = f"step {step}: cannot write the checkpoint {final}"
    ok, msg, tmp_name = True, "", None
    if dist.get_rank() == 0:
        tmp_name = f".ckpt-{step:08d}.tmp-{os.getpid()}"
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(out_dir / tmp_name, ignore_errors=True)  # this process's own earlier attempt
        except OSError as e:
            ok, msg = False, f"{what}: cannot create {out_dir}: {e.strerror or e}"
    agree(ok, msg, error=RunError)
    names = [tmp_name]
    dist.broadcast_object_list(names, src=0)
    tmp = out_dir / names[0]
    model_sd, optim_sd = get_state_dict(modules, optimizer, options=options)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema.as_dtensors()}, checkpoint_id=str(tmp))
    except CheckpointException as e:  # raised on every rank by DCP itself
        raise RunError(f"{what}: {_first_failure(e)}") from None
    dist.barrier()  # every rank's shards are on disk before rank 0 renames the directory
    ok, msg = True, ""
    if dist.get_rank() == 0:
        try:
            write_text_atomic(tmp / "train_state.json", json.dumps(extra))
            install_checkpoint(tmp, final)
            write_text_atomic(out_dir / "latest", final.name + "\n")
            ckpts = sorted(p for p in out_dir.glob("ckpt-*") if p.is_dir())
            for gone in ckpts[: max(0, len(ckpts) - keep)]:
                shutil.rmtree(gone, ignore_errors=True)
        except OSError as e:
            name = getattr(e, "filename2", None) or e.filename  # the target of a rename, else the file
            ok, msg = False, f"{what}: {e.strerror or e}{f': {name}' if name else ''}"
    agree(ok, msg, error=RunError)  # also the barrier: no rank returns before the checkpoint is in place
    return final


def _shard_extents(path: Path) -> dict[str, int]:
    """File name -> bytes the checkpoint's ``.metadata`` says it needs, for every file the metadata names."""
    from ospfn.model.checkpoint import read_dcp_metadata

    md = read_dcp_metadata(path)
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    return need


def check_dcp(path) -> tuple[str, dict | None]:
    """This rank's view of a ``save_dcp`` directory, before any collective: ("", scalar state) when every
    file is there and as long as the metadata needs it, else (what is wrong, naming the file, None)."""
    path = Path(path).absolute()
    if not path.is_dir():
        return f"{path}: not a checkpoint directory", None
    meta, state_file = path / ".metadata", path / "train_state.json"
    for f in (meta, state_file):
        if not f.is_file():
            return f"{f}: missing (not a complete torch.distributed.checkpoint directory)", None
    try:
        extra = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{state_file}: unreadable ({type(e).__name__}: {e})", None
    if not isinstance(extra, dict) or not {"step", "data_pos", "clip"} <= set(extra):
        return f"{state_file}: not a training state (needs the keys step, data_pos, clip)", None
    try:
        need = _shard_extents(path)
    except Exception as e:  # noqa: BLE001  (whatever the reader raises on a damaged file: report it with the file)
        return f"{meta}: unreadable ({type(e).__name__}: {e})", None
    for rel, end in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            return f"{f}: missing (the checkpoint's .metadata lists it)", None
        size = f.stat().st_size
        if size < end:
            return f"{f}: truncated ({size} bytes, the checkpoint's .metadata needs {end})", None
    return "", extra


def load_dcp(path, modules: nn.Module, optimizer, ema: ShardedEMA, *, options=None) -> dict:
    """Collective: restore model, optimizer and EMA shards; returns the scalar training state.  A missing,
    truncated or unreadable file (as any rank sees it) raises ``DCPCheckpointError`` naming it on every rank.
    ``options``: the ``StateDictOptions`` the checkpoint was written with (``save_dcp``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from ospfn.parallel import agree

    problem, extra = check_dcp(path)
    agree(not problem, f"--resume: {problem}", error=DCPCheckpointError)
    model_sd, optim_sd = get_state_dict(modules, optimizer, options=options)
    ema_sd = ema.as_dtensors()
    state = {"model": model_sd, "optim": optim_sd, "ema": ema_sd}
    try:
        dcp.load(state, checkpoint_id=str(path), storage_reader=_naming_reader(path))
    except CheckpointException as e:  # raised on every rank by DCP itself
        raise DCPCheckpointError(f"--resume: cannot read the checkpoint {path}: {_first_failure(e)}") from None
    set_state_dict(modules, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    ema.load_local(state["ema"])
    return extra


class FSDPTrainer(Trainer):
    """The SFT step on torch.distributed: FSDP2 over all ranks, SP inside each data-parallel replica.

    ``modules`` must already be ``shard``-ed; with ``train.compile`` the blocks are compiled here, after
    ``fully_shard``.  Every method that talks to other ranks is collective: call it on every rank.
    """

    def __init__(self, cfg, parts: RunParts, modules: TrainModules, st) -> None:
        self.modules, self.parallel = modules, st
        self.world, self.dp, self.dp_rank, self.sp_size = st.world, st.dp, st.dp_rank, st.sp_size
        self.is_main = st.rank == 0
        from ospfn.train.sft import CTX_PREFIX, LORA_PREFIX, dit_trained

        ctx = getattr(modules, "ctx", None)
        if cfg.lora is not None:  # an adapter run: only the (sharded) LoRA parameters are trained and checkpointed
            named = {f"{LORA_PREFIX}{k}": v for k, v in modules.dit.named_lora_parameters()}
        elif dit_trained(cfg):
            named = dict(modules.named_parameters())  # "ctx." included
        else:  # model.train: false
            named = {}
        if ctx is not None and cfg.adapter.train and not named.keys() & {f"{CTX_PREFIX}{k}" for k, _ in ctx.named_parameters()}:
            named.update({f"{CTX_PREFIX}{k}": v for k, v in ctx.named_parameters()})
        super().__init__(cfg, parts, named, model=modules.dit, text=modules.text, device=st.device, ctx=ctx)

    def _dcp_options(self):
        """With the DiT frozen (a lora section, ``model.train: false``) the checkpoints hold the trainable
        parameters only (the frozen base is ``model.checkpoint``)."""
        from ospfn.train.sft import dit_trained

        if self.cfg.lora is None and dit_trained(self.cfg):
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True, strict=False)

    def make_ema(self, named, decay):
        return ShardedEMA(named, decay)

    def encode_text(self, captions):
        both = self.text(list(captions) + [""])  # one call per micro-step (one FSDP unit pass)
        return both[:-1], both[-1:]

    def backward(self, loss):
        # FSDP averages gradients over all ranks: x SP size = mean over replicas, sum over SP shards
        (loss * self.sp_size / self.cfg.train.grad_accum).backward()

    def reduce_step(self, loss, finite):
        # one all-reduce: the loss sum and the number of ranks that saw a non-finite value
        t = torch.tensor([loss, 0.0 if finite else 1.0], device=self.device)
        dist.all_reduce(t)
        return float(t[0]) / self.world, float(t[1]) == 0.0

    def agree(self, ok, message, error):
        from ospfn.parallel import agree

        agree(ok, message, error=error)

    def log_extra(self):
        return {"world": self.world}

    def save(self, out_dir):
        self.check_finite(Path(out_dir) / f"ckpt-{self.step:08d}")  # each rank its shards, then agreed
        extra = {"step": self.step, "data_pos": self.pos, "clip": self.clip.state_dict(), "config": self.cfg.to_dict(),
                 "skipped_nonfinite": self.skipped_nonfinite}  # fmt: skip
        return save_dcp(out_dir, self.step, self.modules, self.opt, self.ema, extra, keep=self.cfg.train.keep, options=self._dcp_options())

    def load(self, path) -> dict:
        """Restore a ``save`` checkpoint directory; returns its scalar state (with the config it was written with)."""
        extra = load_dcp(path, self.modules, self.opt, self.ema, options=self._dcp_options())
        self.step, self.pos = int(extra["step"]), int(extra["data_pos"])
        self.skipped_nonfinite = int(extra.get("skipped_nonfinite", 0))
        self.clip.load_state_dict(extra["clip"])
        return extra

    def export(self, out):
        self.check_finite(out, state=False)  # each rank its EMA shards, then agreed
        full = self.ema.full()  # collective
        frozen = self.frozen_context()  # collective (a frozen VLM adapter is not in the EMA)
        if not self.is_main:
            return None
        weights = {("text." + k[len("text.tree.") :] if k.startswith("text.tree.") else k): v for k, v in full.items()}
        weights = {**frozen, **weights}
        return export_pipeline(self.cfg, weights, out, info={"trained_steps": self.step, "samples_seen": self.pos, "world": self.world})

    def finish(self):
        dist.barrier()
