"""The SFT optimisation step, one implementation for one process and for FSDP2.

``Trainer`` holds what a run updates (model, text encoder, optimizer, EMA, clipping statistics, step, data
position) and ``Trainer.train_step`` is the step: ``grad_accum`` micro-batches of flow-matching loss,
gradient clipping (adaptive or fixed), the warm-up learning rate, the AdamW step and the EMA update.  The
single-process run uses ``Trainer`` itself; ``ospfn.train.distributed.FSDPTrainer`` overrides only what
differs under torch.distributed (text batching, the SP gradient sum, the loss all-reduce, sharded EMA,
DCP checkpoints, the export gather).  Both are built by ``ospfn.train.build``.

Nothing non-finite is ever applied or written: a NaN or an infinity in a step's loss or gradient norm stops
the run with ``NonFiniteError`` naming the step (``train.nonfinite: stop``, the default) or skips the step
(``skip``: no update, no EMA change, counted in the log record's ``skipped_nonfinite``); every rank decides
alike.  ``save`` and ``export`` check the weights, the EMA and the optimizer state before writing a file.
``start`` prepares the output directory of a run (the run log, the temporaries of killed writers).

The model is an ``ospfn.nn.DiT`` (one module per block), which is what lets ``compile_blocks`` compile
each block on its own: the Skiparse re-layouts (SSP all-to-alls) between blocks stay in the eager model
forward; a full-attention block's Ulysses all-to-alls are inside the block and dynamo traces them.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ospfn.model import RunOptions
from ospfn.styles import style_prompt
from ospfn.train.optim import EMA, AdaptiveGradClip, clip_grad_norm, make_adamw, nonfinite_tensors, set_lr, warmup_constant
from ospfn.train.sft import export_pipeline, param_groups, sample_order, step_generator

__all__ = ["RunParts", "Trainer", "compile_blocks", "RunError", "NonFiniteError"]


class RunError(RuntimeError):
    """A started run cannot go on (the message names the step, and the file where one is involved)."""


class NonFiniteError(RunError):
    """A NaN or an infinity in a step's loss or gradients (``train.nonfinite: stop``), or in weights, EMA or
    optimizer state about to be written; the message names the step and, for state, the tensors."""


def _sweep_stale(out_dir: Path) -> list:
    """``ospfn.train.state.sweep_stale_temporaries``: the temporary checkpoint directories of dead writers."""
    from ospfn.train.state import sweep_stale_temporaries

    return sweep_stale_temporaries(out_dir)


class RunParts(NamedTuple):
    """What a recipe config describes besides the trained weights (see ``ospfn.train.build.build_parts``)."""

    dit_cfg: object
    text_cfg: object
    vae: object
    dataset: object
    adapter_cfg: object = None  # text.kind qwen_vl: the VLM adapter's ospfn.model.vlm.VLMAdapterConfig


def compile_blocks(dit: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` every block of an ``ospfn.nn.DiT`` in place (``block.compile()``, per block as
    OSP-Next does): module names, parameters and FSDP2 hooks are unchanged, and everything between blocks
    (Skiparse re-layouts and their all-to-alls, the head) stays in the eager model forward; the Ulysses
    all-to-alls of a full-attention block are part of that block's graph.  Under
    FSDP2 call it after ``fully_shard``.  Blocks of one layout share their compiled graphs (they differ in
    parameters only), so a model compiles one graph per layout, not per block.  Returns the number of
    blocks compiled."""
    blocks = list(dit.blocks_list)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


class Trainer:
    """One SFT run on one process: the state and the step.

    ``named`` maps every weight (trained or frozen) to its tensor, "dit." / "text." prefixed, in the order
    the optimizer state is stored by.  ``model`` is an ``ospfn.nn.DiT`` over the "dit." tensors, ``text`` a
    ``TextModule`` over the "text." ones.  A run that keeps the DiT frozen (a ``lora`` section, ``model.train:
    false``) has only its trained tensors in ``named`` ("lora.", "ctx."), so checkpoints, the EMA and the
    optimizer hold nothing else.  ``ctx`` (``text.kind: qwen_vl``): the VLM adapter as a
    ``ospfn.train.distributed.ContextAdapter`` ("ctx." tensors); ``forward`` maps the cached VLM features through
    it (with the first-frame latent and the samples' styles when the adapter has those tokens) before the DiT.
    """

    world = 1
    dp, dp_rank, sp_size = 1, 0, 1
    is_main = True
    parallel = None  # ospfn.parallel.ParallelState under torch.distributed
    resumed_from = None  # the checkpoint the state was restored from
    skipped_nonfinite = 0  # steps skipped for a non-finite loss or gradient (train.nonfinite: skip)
    runlog = None  # ospfn.train.runlog.RunLog of the main rank, once ``start`` has run

    def __init__(self, cfg, parts: RunParts, named: dict, *, model: nn.Module, text: nn.Module, device=None, ctx=None) -> None:
        tc, oc = cfg.train, cfg.optim
        self.cfg, self.parts = cfg, parts
        self.model, self.text, self.ctx = model, text, ctx
        self._batch_styles = None  # the style ids of the current micro-batch (style tokens), set by cached_batch
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.named = dict(sorted(named.items()))  # one fixed order: the optimizer state is stored by position
        self.trainable = [p for p in self.named.values() if p.requires_grad]
        self.opt = make_adamw(
            param_groups(self.named, oc.branch_lr_mult), lr=oc.lr, weight_decay=oc.weight_decay, betas=oc.betas, eps=oc.eps
        )
        self.ema = self.make_ema(self.named, oc.ema_decay)
        self.clip = AdaptiveGradClip(initial=oc.clip_initial, decay=oc.clip_decay, k=oc.clip_k)
        self.step, self.pos = 0, 0
        self.compiled_blocks = compile_blocks(model) if tc.compile else 0

    # -- the parts FSDPTrainer replaces --------------------------------------------------------------------

    def make_ema(self, named: dict, decay: float):
        return EMA(named, decay)

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text features of ``captions``, features of the empty prompt)."""
        return self.text(captions), self.text([""])

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.train.grad_accum).backward()

    def reduce_step(self, loss: float, finite: bool) -> tuple[float, bool]:
        """(the step's loss averaged over every process, whether every process saw finite values)."""
        return loss, finite

    def agree(self, ok: bool, message: str, error: type[Exception]) -> None:
        """Raise ``error`` on every process if ``ok`` is false on any (one process: on this one)."""
        if not ok:
            raise error(message)

    def log_extra(self) -> dict:
        return {}

    def check_finite(self, target, *, state: bool = True) -> None:
        """Raise ``NonFiniteError`` (on every process) before ``target`` is written if an EMA weight or (with
        ``state``, a checkpoint) a weight or an optimizer state tensor holds a NaN or an infinity."""
        names = {id(p): k for k, p in self.named.items()}
        bad = [f"weight {k}" for k in nonfinite_tensors(self.named)] if state else []
        bad += [f"EMA {k}" for k in nonfinite_tensors(self.ema.shadow)]
        if state:
            bad += [f"optimizer state {k}" for k in nonfinite_tensors({names.get(id(p), "?"): st for p, st in self.opt.state.items()})]
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        msg = f"step {self.step}: refusing to write {target}: non-finite values in {', '.join(bad[:4])}{more}"
        self.agree(not bad, msg, NonFiniteError)

    def save(self, out_dir) -> Path:
        """Write ``out_dir/ckpt-<step>`` (see ``ospfn.train.state``); never one with non-finite values."""
        from ospfn.train.state import save_train_state

        self.check_finite(Path(out_dir) / f"ckpt-{self.step:08d}")
        state = {"optimizer": self.opt.state_dict(), "clip": self.clip.state_dict(), "data_pos": self.pos,
                 "torch_rng": torch.get_rng_state(), "config": self.cfg.to_dict(), "skipped_nonfinite": self.skipped_nonfinite}  # fmt: skip
        return save_train_state(out_dir, self.step, params=self.named, ema=self.ema.shadow, state=state, keep=self.cfg.train.keep)

    def load(self, ckpt: dict) -> None:
        """Restore the optimizer, EMA, clipping statistics, step, data position and RNG of a
        ``load_train_state`` result (the weights are already in the model)."""
        st = ckpt["state"]
        self.opt.load_state_dict(st["optimizer"])
        self.ema.load_state_dict({"decay": self.cfg.optim.ema_decay, "shadow": ckpt["ema"]})
        self.clip.load_state_dict(st["clip"])
        self.step, self.pos = int(st["step"]), int(st["data_pos"])
        self.skipped_nonfinite = int(st.get("skipped_nonfinite", 0))  # older checkpoints lack it
        torch.set_rng_state(st["torch_rng"])

    def export(self, out) -> Path | None:
        """Write the EMA weights as a pipeline directory (``recipes/sample.py --checkpoint``); never non-finite ones."""
        self.check_finite(out, state=False)
        return export_pipeline(self.cfg, {**self.frozen_context(), **self.ema.shadow}, out,
                               info={"trained_steps": self.step, "samples_seen": self.pos})  # fmt: skip

    def frozen_context(self) -> dict:
        """The VLM adapter's tensors ("ctx." names, full, on the CPU) when it is frozen (``adapter.train: false``):
        not in the EMA, yet part of the export.  Empty otherwise.  FSDP2: gathered (collective)."""
        from ospfn.train.sft import CTX_PREFIX

        if self.ctx is None or self.cfg.adapter.train or any(k.startswith(CTX_PREFIX) for k in self.ema.shadow):
            return {}
        return {f"{CTX_PREFIX}{k}": (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().cpu()
                for k, v in self.ctx.named_parameters()}  # fmt: skip

    def finish(self) -> None:
        pass

    # -- the run directory ---------------------------------------------------------------------------------

    def start(self, out_dir) -> list[str]:
        """Prepare ``out_dir`` for the run continuing from ``self.step`` (collective): the main rank creates
        it, removes the temporary checkpoint directories of killed writers and drops the log records of steps
        after ``self.step`` (a resumed run writes them again, see ``ospfn.train.runlog``).  A failure raises
        ``ospfn.train.build.TrainError`` with the same message on every rank.  Returns notes for the user."""
        from ospfn.train.build import TrainError
        from ospfn.train.runlog import RunLog

        out_dir = Path(out_dir)
        notes, ok, msg = [], True, ""
        if self.is_main:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                if not os.access(out_dir, os.W_OK | os.X_OK):
                    raise PermissionError(errno.EACCES, "not writable")
                swept = _sweep_stale(out_dir)
                if swept:
                    notes.append(f"removed {len(swept)} temporary checkpoint director{'ies' if len(swept) > 1 else 'y'} of killed runs")
                self.runlog = RunLog(out_dir / "log.jsonl")
                dropped = self.runlog.start(self.step)
                if dropped:
                    notes.append(f"{self.runlog.path}: dropped {dropped} line{'s' if dropped > 1 else ''} after step {self.step} (re-run now)")
            except OSError as e:
                ok, msg = False, f"out_dir {out_dir}: cannot create or write it: {e.strerror or e}"
        self.agree(ok, msg, TrainError)
        return notes

    def log(self, record: dict) -> str | None:
        """Append ``record`` to the run log (main rank; after ``start``); returns the line written."""
        return self.runlog.append(record) if self.runlog is not None else None

    # -- the step ------------------------------------------------------------------------------------------

    def forward(self, _params, _cfg, x, t, context, *, image=None, run=None):
        """``forward_fn`` of ``flow_matching_loss``: the DiT module on this run's parallel layout.  With a VLM
        adapter (``ctx``) ``context`` holds the VLM features (the caption's or, where dropped, the sample's empty
        ones) and becomes ``uniworld_context(adapter, features, first_frame=<the first-frame latent>, style=<the
        micro-batch's style ids>)`` (each where the adapter has those tokens)."""
        tc = self.cfg.train
        if self.ctx is not None:
            ac = self.parts.adapter_cfg
            first = image.latent if (ac.first_frame_tokens and image is not None) else None
            context = self.ctx(context, first_frame=first, style=self._batch_styles if ac.style_tokens else None)
        run = (run or RunOptions()).replace(parallel=self.parallel, attn_backend=tc.attn_backend, grad_checkpoint=tc.grad_checkpoint)
        return self.model(x, t, context, image=image, run=run)

    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_loss(self, micro: int) -> torch.Tensor:
        """Flow-matching loss of micro-batch ``micro`` of the current step (this rank's share of the global
        batch; the noise is drawn for the global batch, so any data-parallel split computes the same terms)."""
        tc, dc = self.cfg.train, self.cfg.data
        dataset, vae = self.parts.dataset, self.parts.vae
        gb = self.dp * tc.batch_size  # global batch per micro-step
        lo = self.dp_rank * tc.batch_size
        idx = sample_order(len(dataset), dc.seed, self.pos, gb)[lo : lo + tc.batch_size]
        self.pos += gb
        if getattr(dataset, "is_latent_cache", False):  # data.kind latents: what the encoders made, read back
            z0, s, ctx, empty = self.cached_batch(idx)
        else:
            items = [dataset[i] for i in idx]
            videos = torch.stack([it["video"] for it in items]).to(self.device)
            with torch.no_grad():
                z0 = vae.encode(videos)
                s = vae.encode(videos[:, :, :1]) if self.parts.dit_cfg.i2v == "flashi2v" else None
            ctx, empty = self.encode_text([style_prompt(it["caption"], it.get("style")) for it in items])
        from ospfn.sched import flow_matching_loss

        with self.autocast():
            return flow_matching_loss(
                None, self.parts.dit_cfg, z0, ctx, generator=step_generator(tc.seed, self.step, micro), empty_context=empty,
                text_drop=tc.text_drop, cond_image_latent=s, ratio_range=tc.ratio_range, shift=tc.shift,
                logit_normal=tc.logit_normal, forward_fn=self.forward, global_batch=gb, batch_offset=lo,
            )  # fmt: skip

    def cached_batch(self, idx: list[int]) -> tuple:
        """(z0, first-frame latents or None, text features, empty-prompt features) of the latent-cache samples
        ``idx``, on this run's device: the tensors ``micro_loss`` computes from videos, as
        ``recipes/prepare_data.py`` stored them.  A shard that cannot be read raises ``RunError``."""
        from ospfn.data.latents import LatentCacheError

        try:
            items = [self.parts.dataset[i] for i in idx]
        except (LatentCacheError, OSError) as e:
            raise RunError(f"step {self.step + 1}: cannot read the latent cache: {e}") from e
        shapes = {tuple(it["latent"].shape) for it in items}
        if len(shapes) > 1:
            raise RunError(f"step {self.step + 1}: the micro-batch mixes latent shapes {sorted(shapes)} (samples {idx} of "
                           f"{self.cfg.data.cache}, from different buckets); use train.batch_size 1 or one bucket")  # fmt: skip
        dev = self.device
        z0 = torch.stack([it["latent"] for it in items]).to(dev)
        s = torch.stack([it["cond"] for it in items]).to(dev) if self.parts.dit_cfg.i2v == "flashi2v" else None
        ctx = torch.stack([it["context"] for it in items]).to(dev)
        ac = self.parts.adapter_cfg
        if ac is not None and ac.style_tokens:
            missing = [i for i, it in zip(idx, items) if it.get("style") is None]
            if missing:
                raise RunError(f"step {self.step + 1}: samples {missing} of {self.cfg.data.cache} have no style label; "
                               "adapter.style_tokens needs style-labelled data")  # fmt: skip
            from ospfn.styles import style_id

            self._batch_styles = [style_id(it["style"]) for it in items]
        if getattr(self.parts.dataset, "per_sample_empty", False):  # a VLM's empty context: (frame 0, "") of each sample
            return z0, s, ctx, torch.stack([it["empty_context"] for it in items]).to(dev)
        return z0, s, ctx, self.parts.dataset.empty_context.to(dev)

    def clip_grads(self) -> tuple[float, float]:
        """Clip the gradients in place: (norm before clipping, threshold)."""
        oc = self.cfg.optim
        if oc.adaptive_clip:
            return self.clip([p.grad for p in self.trainable if p.grad is not None])
        return clip_grad_norm(self.trainable, oc.clip_initial), oc.clip_initial

    def train_step(self) -> dict:
        """One optimisation step; returns its log record.  A non-finite loss or gradient norm (on any rank)
        raises ``NonFiniteError`` (``train.nonfinite: stop``) or skips the update (``skip``; the record then
        has ``"skipped": true``); ``skipped_nonfinite`` counts the skipped steps of the run."""
        tc, oc = self.cfg.train, self.cfg.optim
        t0 = time.perf_counter()
        total = 0.0
        for micro in range(tc.grad_accum):
            loss = self.micro_loss(micro)
            self.backward(loss)
            total += float(loss.detach()) / tc.grad_accum
        gnorm, thr = self.clip_grads()  # AdaptiveGradClip leaves its statistics alone on a non-finite norm
        loss, finite = self.reduce_step(total, math.isfinite(total) and math.isfinite(gnorm))
        lr = warmup_constant(self.step, base_lr=oc.lr, warmup_steps=oc.warmup_steps)
        step = self.step + 1
        if finite:
            set_lr(self.opt, lr)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.ema.update(self.named)
        else:
            self.opt.zero_grad(set_to_none=True)
            what = [f"loss ({loss})"] * (not math.isfinite(loss)) + [f"gradient norm ({gnorm})"] * (not math.isfinite(gnorm))
            what = " and ".join(what) or "loss or gradient (on another rank)"
            if tc.nonfinite == "stop":
                raise NonFiniteError(f"step {step}: non-finite {what}; stopping without applying the step "
                                     "(train.nonfinite: stop; 'skip' skips such steps)")  # fmt: skip
            self.skipped_nonfinite += 1
        self.step = step
        rec = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": gnorm, "clip_threshold": thr,
               "step_time": time.perf_counter() - t0, "samples": self.pos, "skipped_nonfinite": self.skipped_nonfinite,
               **self.log_extra()}  # fmt: skip
        if not finite:
            rec["skipped"] = True
        return rec
