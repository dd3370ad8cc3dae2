"""The SFT optimisation step, one implementation for one process and for FSDP2.

``Trainer`` holds what a run updates (model, text encoder, optimizer, EMA, clipping statistics, step, data
position) and ``Trainer.train_step`` is the step: ``grad_accum`` micro-batches of flow-matching loss,
gradient clipping (adaptive or fixed), the warm-up learning rate, the AdamW step and the EMA update.  The
single-process run uses ``Trainer`` itself; ``ospfn.train.distributed.FSDPTrainer`` overrides only what
differs under torch.distributed (text batching, the SP gradient sum, the loss all-reduce, sharded EMA,
DCP checkpoints, the export gather).  Both are built by ``ospfn.train.build``.

The model is an ``ospfn.nn.DiT`` (one module per block), which is what lets ``compile_blocks`` compile
each block on its own: the Skiparse re-layouts (SSP all-to-alls) between blocks stay in the eager model
forward; a full-attention block's Ulysses all-to-alls are inside the block and dynamo traces them.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ospfn.model import RunOptions
from ospfn.train.optim import EMA, AdaptiveGradClip, clip_grad_norm, make_adamw, set_lr, warmup_constant
from ospfn.train.sft import export_pipeline, param_groups, sample_order, step_generator

__all__ = ["RunParts", "Trainer", "compile_blocks"]


class RunParts(NamedTuple):
    """What a recipe config describes besides the trained weights (see ``ospfn.train.build.build_parts``)."""

    dit_cfg: object
    text_cfg: object
    vae: object
    dataset: object


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
    ``TextModule`` over the "text." ones.
    """

    world = 1
    dp, dp_rank, sp_size = 1, 0, 1
    is_main = True
    parallel = None  # ospfn.parallel.ParallelState under torch.distributed
    resumed_from = None  # the checkpoint the state was restored from

    def __init__(self, cfg, parts: RunParts, named: dict, *, model: nn.Module, text: nn.Module, device=None) -> None:
        tc, oc = cfg.train, cfg.optim
        self.cfg, self.parts = cfg, parts
        self.model, self.text = model, text
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

    def mean_loss(self, loss: float) -> float:
        """The step's loss averaged over every process."""
        return loss

    def log_extra(self) -> dict:
        return {}

    def save(self, out_dir) -> Path:
        """Write ``out_dir/ckpt-<step>`` (see ``ospfn.train.state``)."""
        from ospfn.train.state import save_train_state

        state = {"optimizer": self.opt.state_dict(), "clip": self.clip.state_dict(), "data_pos": self.pos,
                 "torch_rng": torch.get_rng_state(), "config": self.cfg.to_dict()}  # fmt: skip
        return save_train_state(out_dir, self.step, params=self.named, ema=self.ema.shadow, state=state, keep=self.cfg.train.keep)

    def load(self, ckpt: dict) -> None:
        """Restore the optimizer, EMA, clipping statistics, step, data position and RNG of a
        ``load_train_state`` result (the weights are already in the model)."""
        st = ckpt["state"]
        self.opt.load_state_dict(st["optimizer"])
        self.ema.load_state_dict({"decay": self.cfg.optim.ema_decay, "shadow": ckpt["ema"]})
        self.clip.load_state_dict(st["clip"])
        self.step, self.pos = int(st["step"]), int(st["data_pos"])
        torch.set_rng_state(st["torch_rng"])

    def export(self, out) -> Path | None:
        """Write the EMA weights as a pipeline directory (``recipes/sample.py --checkpoint``)."""
        return export_pipeline(self.cfg, self.ema.shadow, out, info={"trained_steps": self.step, "samples_seen": self.pos})

    def finish(self) -> None:
        pass

    # -- the step ------------------------------------------------------------------------------------------

    def forward(self, _params, _cfg, x, t, context, *, image=None, run=None):
        """``forward_fn`` of ``flow_matching_loss``: the DiT module on this run's parallel layout."""
        tc = self.cfg.train
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
        items = [dataset[i] for i in idx]
        videos = torch.stack([it["video"] for it in items]).to(self.device)
        with torch.no_grad():
            z0 = vae.encode(videos)
            s = vae.encode(videos[:, :, :1]) if self.parts.dit_cfg.i2v == "flashi2v" else None
        ctx, empty = self.encode_text([it["caption"] for it in items])
        from ospfn.sched import flow_matching_loss

        with self.autocast():
            return flow_matching_loss(
                None, self.parts.dit_cfg, z0, ctx, generator=step_generator(tc.seed, self.step, micro), empty_context=empty,
                text_drop=tc.text_drop, cond_image_latent=s, ratio_range=tc.ratio_range, shift=tc.shift,
                logit_normal=tc.logit_normal, forward_fn=self.forward, global_batch=gb, batch_offset=lo,
            )  # fmt: skip

    def clip_grads(self) -> tuple[float, float]:
        """Clip the gradients in place: (norm before clipping, threshold)."""
        oc = self.cfg.optim
        if oc.adaptive_clip:
            return self.clip([p.grad for p in self.trainable if p.grad is not None])
        return clip_grad_norm(self.trainable, oc.clip_initial), oc.clip_initial

    def train_step(self) -> dict:
        """One optimisation step; returns its log record."""
        tc, oc = self.cfg.train, self.cfg.optim
        t0 = time.perf_counter()
        total = 0.0
        for micro in range(tc.grad_accum):
            loss = self.micro_loss(micro)
            self.backward(loss)
            total += float(loss.detach()) / tc.grad_accum
        gnorm, thr = self.clip_grads()
        lr = warmup_constant(self.step, base_lr=oc.lr, warmup_steps=oc.warmup_steps)
        set_lr(self.opt, lr)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.named)
        self.step += 1
        loss = self.mean_loss(total)
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": gnorm, "clip_threshold": thr,
                "step_time": time.perf_counter() - t0, "samples": self.pos, **self.log_extra()}  # fmt: skip
