"""The Mix-GRPO iteration with a LoRA policy (docs/rl.md#the-recipe): rollouts with an SDE window, rewards,
group advantages, the clipped objective with a KL to the adapter-disabled model, one AdamW step on the adapter.

``RLTrainer`` holds what a run updates (the adapter, its EMA, the optimizer, the clipping statistics, the
iteration) over a frozen pipeline; ``RLTrainer.iterate`` is one iteration.  Everything random is a function of
(``train.seed``, iteration): the prompts (``sample_order``), the initial noise and each SDE step's noise
(``ospfn.rl.rollout.step_generator``), so a resumed run repeats exactly what an uninterrupted one does, and
the ranks of a distributed run draw the global batch's noise and take their share of it.

Distributed (``torchrun``): each data-parallel replica takes ``prompts_per_iter / dp`` prompt groups (a
group's k generations stay on one replica), the ranks of one sequence-parallel group run the same samples
(the same initial and SDE noise) with ``RunOptions(parallel=...)``, rewards are gathered so the advantages are
computed over the global batch, and the loss is normalised by the global number of trained samples, so the
adapter gradient summed over all ranks is the single-process gradient.  Two ways to hold the DiT
(``parallel.fsdp``):

- ``false`` (default): the frozen DiT and the adapter are replicated on every rank; the adapter gradients are
  all-reduced (summed); rank 0 writes single-file checkpoints (``ospfn.train.state``).
- ``true``: FSDP2 (``RLTrainer.shard``): the DiT as ``ospfn.nn.DiT(cfg, params, lora=adapter)``, base frozen,
  ``fully_shard`` per block and at the root over all ranks; the policy is the module with ``lora_weight=1``,
  the reference with ``lora_weight=0``; the FlashI2V shift phi is evaluated inside the module's forward
  (``ImageCond(apply_shift=True)``, where the sharded base weights are gathered).  AdamW, the EMA
  (``ShardedEMA``) and the adaptive clipping work on the adapter shards; FSDP reduces the gradients (it
  averages over the world, so the loss is multiplied by the world size: the sum).  Every rank runs the same
  number of micro-batches (FSDP's all-gathers are collective): a replica with fewer kept samples runs
  zero-weighted ones.  Checkpoints are torch.distributed.checkpoint directories (``save_dcp``: adapter shards,
  EMA, optimizer; the clip statistics, iteration and prompt position in ``train_state.json``); the base
  model is not written (it is the pipeline's).  The export gathers the EMA adapter to rank 0.

No RNG state is saved: the prompts, the initial noise and every SDE step's noise are drawn from generators
seeded with (``train.seed``, iteration, step), and the window is a function of the iteration, so the
iteration restores them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

from ospfn.lora import LoraConfig, init_lora
from ospfn.model import ImageCond, RunOptions, forward, fourier_features
from ospfn.rl.config import RLConfig
from ospfn.rl.grpo import combine_rewards, grpo_loss
from ospfn.rl.rollout import initial_noise, rollout, sde_log_prob
from ospfn.rl.window import mix_seed
from ospfn.sched import cfg_combine, image_condition, inference_sigmas, pad_context
from ospfn.train.optim import EMA, AdaptiveGradClip, clip_grad_norm, make_adamw, nonfinite_tensors, set_lr
from ospfn.train.sft import sample_order

__all__ = ["RLTrainer", "RLRunError", "make_rl_trainer"]

# seeds of the independent random streams of one iteration: mix_seed(train.seed, STREAM, iteration, ...)
_NOISE, _SDE = 1, 2
_STATS = ("policy_loss", "kl", "clip_frac", "approx_kl", "ratio_mean")  # the grpo_loss statistics an iteration logs


class RLRunError(RuntimeError):
    """A started RL run cannot go on (non-finite loss or gradients; the message names the iteration)."""


class RLTrainer:
    """One RL run: a frozen pipeline (``load_pipeline(cfg.pipeline)``) and a trained LoRA adapter.

    ``parallel``: an ``ospfn.parallel.ParallelState`` (None: one process); ``dp`` / ``dp_rank`` the
    data-parallel size and rank; ``group``: the process group the adapter gradients and the rewards are
    reduced over (None with one process).  Built replicated; ``shard(mesh)`` switches to the FSDP2 mode
    (``make_rl_trainer`` does with ``parallel.fsdp: true``), after which ``named`` holds the adapter's
    DTensor shards and ``adapter_weights()`` / ``ema_adapter()`` gather them (collective).
    """

    def __init__(self, cfg: RLConfig, *, device=None, parallel=None, dp: int = 1, dp_rank: int = 0, group=None, world: int = 1,
                 rank: int = 0) -> None:  # fmt: skip
        from ospfn.data import SyntheticMotion
        from ospfn.pipeline import BUNDLED, load_pipeline
        from ospfn.rl.rewards import make_reward

        self.cfg = cfg
        self.device = torch.device("cpu" if device is None else device)
        self.parallel, self.dp, self.dp_rank, self.group, self.world, self.rank = parallel, dp, dp_rank, group, world, rank
        self.is_main = rank == 0
        rc = cfg.rollout
        if rc.prompts_per_iter % dp:
            raise ValueError(f"rollout.prompts_per_iter ({rc.prompts_per_iter}) must be a multiple of the data-parallel size {dp}")
        self.pipe = load_pipeline(BUNDLED if cfg.pipeline is None else cfg.pipeline, device=self.device)
        self.mcfg = self.pipe.cfg
        self.params = {k: v.detach().requires_grad_(False) for k, v in self.pipe.params.items()}
        if self.mcfg.i2v != "flashi2v":
            raise ValueError(f"pipeline: RL post-training runs image-to-video (FlashI2V) models for now; {cfg.pipeline or BUNDLED} "
                             f"is {self.mcfg.i2v!r}")  # fmt: skip
        lc = cfg.lora
        self.adapter = init_lora(self.mcfg, LoraConfig(rank=lc.rank, alpha=lc.alpha, targets=lc.targets, init=lc.init),
                                 seed=lc.seed, device=self.device).requires_grad_(True)  # fmt: skip
        self.named = dict(sorted(self.adapter.weights.items()))
        oc = cfg.optim
        self.opt = make_adamw(list(self.named.values()), lr=oc.lr, weight_decay=oc.weight_decay, betas=oc.betas, eps=oc.eps)
        self.ema = EMA(self.named, oc.ema_decay)
        self.clip = AdaptiveGradClip(initial=oc.clip_initial, decay=oc.clip_decay, k=oc.clip_k)
        self.window = rc.schedule(cfg.train.seed)
        self.rewards = [make_reward(r.name, r.weight, **r.args) for r in cfg.rewards]
        pc = cfg.prompts
        self.prompts = SyntheticMotion(pc.num_prompts, frames=pc.frames, size=pc.size, split="train", seed=pc.seed)
        self.sigmas = inference_sigmas(rc.steps, rc.shift)
        self.iteration = 0
        self.skipped_nonfinite = 0
        self.resumed_from = None
        self.dit = None  # the FSDP2 module after ``shard``; None: the functional model over ``self.params``

    def shard(self, mesh) -> None:
        """Switch to the FSDP2 mode (collective: every rank of ``mesh``, a 1-D device mesh over all ranks, must
        call it, before the first iteration): the DiT becomes ``ospfn.nn.DiT`` over the pipeline's weights with
        the adapter attached, base frozen, ``fully_shard`` per block and at the root; the optimizer and the EMA
        are rebuilt over the adapter's shards.  The full base weights are released (``pipe.params`` is
        emptied): each rank keeps its shards only."""
        from torch.distributed.fsdp import fully_shard

        from ospfn.nn import DiT
        from ospfn.train.distributed import ShardedEMA

        if self.dit is not None or self.iteration:
            raise RuntimeError("RLTrainer.shard: call it once, before the first iteration")
        dit = DiT(self.mcfg, self.params, lora=self.adapter).freeze_base()
        for block in dit.blocks_list:
            fully_shard(block, mesh=mesh)
        fully_shard(dit, mesh=mesh)
        self.dit = dit
        self.params = None
        self.pipe.params = {}
        self.adapter = dit.lora_adapter()  # over the sharded parameters (DTensors)
        self.named = dict(sorted(dit.named_lora_parameters()))
        oc = self.cfg.optim
        self.opt = make_adamw(list(self.named.values()), lr=oc.lr, weight_decay=oc.weight_decay, betas=oc.betas, eps=oc.eps)
        self.ema = ShardedEMA(self.named, oc.ema_decay)

    # -- the model ---------------------------------------------------------------------------------------------

    def run_options(self) -> RunOptions:
        return RunOptions(attn_backend=self.cfg.train.attn_backend, parallel=self.parallel)

    def velocity(self, z: torch.Tensor, sigma: float, cond: dict, *, lora) -> torch.Tensor:
        """The guided velocity at state z (the unshifted FlashI2V state) and noise level ``sigma``: the model
        sees ``z - phi(s)`` and t = 1000 sigma; with guidance != 1 both branches run as one batch."""
        if self.dit is not None:
            return self._module_velocity(z, sigma, cond, 0.0 if lora is None else 1.0)
        g = self.cfg.rollout.guidance
        B = z.shape[0]
        x = z - cond["phi"]
        t = torch.full((B,), 1000.0 * sigma, device=z.device, dtype=torch.float32)
        run = self.run_options()
        if g == 1.0:
            return forward(self.params, self.mcfg, x, t, cond["ctx"], image=ImageCond(fourier_feats=cond["feats"]), run=run, lora=lora)
        ctx_u, ctx_c = pad_context(cond["neg"], cond["ctx"])
        v = forward(self.params, self.mcfg, torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx_u, ctx_c]),
                    image=ImageCond(fourier_feats=torch.cat([cond["feats"], cond["feats"]])), run=run, lora=lora)  # fmt: skip
        return cfg_combine(v[:B], v[B:], g)

    def _module_velocity(self, z: torch.Tensor, sigma: float, cond: dict, weight: float) -> torch.Tensor:
        """``velocity`` through the FSDP2 module: the adapter with ``weight`` (1: the policy, 0: the reference);
        phi(s) is subtracted inside the module's forward (``apply_shift``), where the base weights are gathered."""
        g = self.cfg.rollout.guidance
        B = z.shape[0]
        t = torch.full((B,), 1000.0 * sigma, device=z.device, dtype=torch.float32)
        run = self.run_options()
        if g == 1.0:
            image = ImageCond(latent=cond["lat"], fourier_feats=cond["feats"], apply_shift=True)
            return self.dit(z, t, cond["ctx"], image=image, run=run, lora_weight=weight)
        ctx_u, ctx_c = pad_context(cond["neg"], cond["ctx"])
        image = ImageCond(latent=torch.cat([cond["lat"], cond["lat"]]), fourier_feats=torch.cat([cond["feats"], cond["feats"]]),
                          apply_shift=True)  # fmt: skip
        v = self.dit(torch.cat([z, z]), torch.cat([t, t]), torch.cat([ctx_u, ctx_c]), image=image, run=run, lora_weight=weight)
        return cfg_combine(v[:B], v[B:], g)

    # -- one iteration -----------------------------------------------------------------------------------------

    def _batch(self, it: int):
        """This replica's prompt groups of iteration ``it``: (captions [P], first frames [P, 3, H, W], global
        group offset, global number of groups)."""
        rc = self.cfg.rollout
        P = rc.prompts_per_iter
        order = sample_order(len(self.prompts), self.cfg.train.seed, it * P, P)
        local = P // self.dp
        lo = self.dp_rank * local
        items = [self.prompts[i] for i in order[lo : lo + local]]
        return [x["caption"] for x in items], torch.stack([x["video"][:, 0] for x in items]), lo, P

    @torch.no_grad()
    def _condition(self, captions: list[str], first: torch.Tensor, k: int) -> dict:
        """Per-sample conditioning tensors for ``k`` generations of each prompt (repeat-interleaved)."""
        pipe, dev = self.pipe, self.device
        ctx = pipe.encode_prompts(captions).to(dev)
        cond_lat = pipe.vae.encode(first.to(dev)[:, :, None]).to(dev)
        if self.dit is None:
            phi, feats = image_condition(self.params, self.mcfg, cond_lat, self.cfg.rollout.fourier_ratio)
            out = {"ctx": ctx, "phi": phi, "feats": feats}
        else:  # phi needs the base weights: the module computes it from the latent (``_module_velocity``)
            out = {"ctx": ctx, "lat": cond_lat, "feats": fourier_features(cond_lat, self.cfg.rollout.fourier_ratio)}
        if self.cfg.rollout.guidance != 1.0:
            out["neg"] = pipe.encode_prompts([pipe.defaults["negative_prompt"]] * len(captions)).to(dev)
        return {name: t.repeat_interleave(k, dim=0) for name, t in out.items()}

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """The data-parallel replicas' ``x`` [b, ...] concatenated in replica order (one process: ``x``)."""
        if self.group is None or self.dp == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        sp = self.world // self.dp  # ranks are dp-major: replica r holds ranks r*sp .. r*sp + sp - 1
        return torch.cat(parts[::sp])

    def _all_sum(self, tensors: list[torch.Tensor]) -> None:
        if self.group is None or self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t, group=self.group)

    def iterate(self) -> dict:
        """One Mix-GRPO iteration; returns its log record."""
        cfg, rc, gc = self.cfg, self.cfg.rollout, self.cfg.grpo
        it, seed, k = self.iteration, cfg.train.seed, rc.k
        t0 = time.perf_counter()
        captions, first, g_lo, groups = self._batch(it)
        cond = self._condition(captions, first, k)
        B = len(captions) * k
        lat_shape = (self.mcfg.in_dim, *self._latent_thw())
        noise = initial_noise(lat_shape, groups, k, shared=rc.shared_noise, seed=mix_seed(seed, _NOISE, it))
        noise = noise[g_lo * k : g_lo * k + B].to(self.device)
        window = self.window.window(it)
        trained = self.window.train_steps(it)
        lora = self.adapter.detach() if self.dit is None else self.adapter
        ro = rollout(lambda z, s, i: self.velocity(z, s, cond, lora=lora), noise, self.sigmas, window, sde=rc.sde,
                     noise_level=rc.noise_level, seed=mix_seed(seed, _SDE), iteration=it, compress=rc.compress, shift=rc.shift,
                     batch_offset=g_lo * k, global_batch=groups * k)  # fmt: skip
        with torch.no_grad():
            video = self.pipe.vae.decode(ro.z).clamp(-1, 1)
            prompts = [c for c in captions for _ in range(k)]
            firsts = first.to(video.device).repeat_interleave(k, dim=0)
            local_r = {r.name: r(video, prompts, first_frames=firsts).float().to(self.device) for r in self.rewards}
        rewards = {name: self._gather(v) for name, v in local_r.items()}
        adv_all = combine_rewards(rewards, {r.name: r.weight for r in self.rewards}, group_size=k, mode=gc.aggregation,
                                  eps=gc.adv_eps, global_std=gc.global_std, clip=gc.adv_clip)  # fmt: skip
        adv = adv_all[g_lo * k : g_lo * k + B]
        keep = torch.nonzero(adv != 0).flatten().tolist()
        n_keep = int((adv_all != 0).sum())
        t1 = time.perf_counter()

        # per-micro-batch statistics stay on the device (summed as float64); read once, after the update
        stats = torch.zeros(1 + len(_STATS), dtype=torch.float64, device=self.device)
        n_terms = 0
        if n_keep:
            scale = 1.0 / (n_keep * len(trained))  # the loss is a sum over the global kept samples and trained steps
            mb = cfg.grpo.micro_batch
            for j in trained:
                st = ro.step(j)
                for c in range(0, len(keep), mb):
                    idx = torch.tensor(keep[c : c + mb], device=self.device)
                    sub = {name: t[idx] for name, t in cond.items()}
                    x, x_next = st.x[idx], st.x_next[idx]
                    v_new = self.velocity(x, st.sigma, sub, lora=self.adapter)
                    lp_new, mean_new, std = sde_log_prob(x, v_new, st.sigma, st.sigma_next, x_next, sde=st.sde,
                                                         noise_level=st.noise_level, sigma_max=st.sigma_max)  # fmt: skip
                    mean_ref = None
                    if gc.beta > 0:
                        with torch.no_grad():
                            v_ref = self.velocity(x, st.sigma, sub, lora=None)
                            _, mean_ref, _ = sde_log_prob(x, v_ref, st.sigma, st.sigma_next, x_next, sde=st.sde,
                                                          noise_level=st.noise_level, sigma_max=st.sigma_max)  # fmt: skip
                    loss, s = grpo_loss(lp_new, st.log_prob[idx], adv[idx], clip_range=gc.clip_range, mean_new=mean_new,
                                        mean_ref=mean_ref, std=std, beta=gc.beta, scale=scale * len(idx))  # fmt: skip
                    if self.dit is None:
                        loss.backward()
                    else:  # FSDP averages the gradients over the world: x world makes it their sum
                        (loss * self.world).backward()
                    stats += torch.stack([loss.detach()] + [s[name] * len(idx) for name in _STATS]).double()
                    n_terms += len(idx)
            if self.dit is not None:
                self._pad_micro_batches(adv_all, len(keep), len(trained), ro.step(trained[0]), cond)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.named.values()]
        for p, g in zip(self.named.values(), grads):
            p.grad = g
        summed = torch.cat([stats.cpu(), torch.tensor([float(n_terms)], dtype=torch.float64)])
        self._all_sum((grads if self.dit is None else []) + [summed])  # FSDP reduced the gradients in backward
        if self.group is not None and self.world > 1:
            summed /= self.world // self.dp  # the ranks of an SP group computed the same terms
        total_terms = max(float(summed[-1]), 1.0)
        loss = float(summed[0])
        gnorm, thr = self._clip()
        finite = math.isfinite(loss) and math.isfinite(gnorm)
        oc = cfg.optim
        if finite:
            set_lr(self.opt, oc.lr)
            self.opt.step()
            self.ema.update(self.named)
        elif cfg.train.nonfinite == "stop":
            self.opt.zero_grad(set_to_none=True)
            raise RLRunError(f"iteration {it + 1}: non-finite loss ({loss}) or gradient norm ({gnorm}); stopping without applying "
                             "it (train.nonfinite: stop; 'skip' skips such iterations)")  # fmt: skip
        else:
            self.skipped_nonfinite += 1
        self.opt.zero_grad(set_to_none=True)
        self.iteration = it + 1
        rec = {"step": self.iteration, "iteration": self.iteration, "window": [window.start, window.stop], "trained_steps": len(trained),
               "loss": loss, "grad_norm": gnorm, "clip_threshold": thr, "lr": oc.lr, "kept": n_keep, "samples": groups * k}  # fmt: skip
        for i, name in enumerate(_STATS):
            rec[name] = float(summed[1 + i]) / total_terms
        for name, r in rewards.items():
            rec[f"reward_{name}_mean"] = float(r.mean())
            rec[f"reward_{name}_std"] = float(r.std()) if r.numel() > 1 else 0.0
        rec.update(adv_abs_mean=float(adv_all.abs().mean()), rollout_time=t1 - t0, update_time=time.perf_counter() - t1,
                   step_time=time.perf_counter() - t0, skipped_nonfinite=self.skipped_nonfinite)  # fmt: skip
        if not finite:
            rec["skipped"] = True
        return rec

    def _pad_micro_batches(self, adv_all: torch.Tensor, kept: int, n_trained: int, st, cond: dict) -> None:
        """FSDP2: run zero-weighted micro-batches until this rank has run as many as the busiest replica (each
        forward and backward all-gathers the shards, so every rank must run the same number); the counts
        follow from the global advantages, which every rank holds."""
        mb, B = self.cfg.grpo.micro_batch, adv_all.numel() // self.dp
        most = max(math.ceil(int((adv_all[r * B : (r + 1) * B] != 0).sum()) / mb) for r in range(self.dp))
        idx = torch.zeros(1, dtype=torch.long, device=self.device)
        sub = {name: t[idx] for name, t in cond.items()}
        for _ in range(n_trained * (most - math.ceil(kept / mb))):
            v = self.velocity(st.x[idx], st.sigma, sub, lora=self.adapter)
            if self.cfg.grpo.beta > 0:
                with torch.no_grad():
                    self.velocity(st.x[idx], st.sigma, sub, lora=None)
            (v.sum() * 0.0).backward()

    def _latent_thw(self) -> tuple[int, int, int]:
        st, sh, sw = self.pipe.vae.stride
        pc = self.cfg.prompts
        return ((pc.frames - 1) // st + 1, pc.size[0] // sh, pc.size[1] // sw)

    def _clip(self) -> tuple[float, float]:
        oc = self.cfg.optim
        params = list(self.named.values())
        if oc.adaptive_clip:
            return self.clip([p.grad for p in params])
        return clip_grad_norm(params, oc.clip_initial), oc.clip_initial

    # -- state -------------------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "clip": self.clip.state_dict(), "iteration": self.iteration,
                "skipped_nonfinite": self.skipped_nonfinite, "config": self.cfg.to_dict()}  # fmt: skip

    def check_finite(self, target) -> None:
        """``RLRunError`` before ``target`` is written if the adapter or its EMA holds a NaN or an infinity
        (FSDP2: each rank checks its shards and the verdict is agreed on, so every rank raises alike)."""
        bad = [f"adapter {k}" for k in nonfinite_tensors(self.named)] + [f"EMA {k}" for k in nonfinite_tensors(self.ema.shadow)]
        msg = f"iteration {self.iteration}: refusing to write {target}: non-finite values in {', '.join(bad[:4])}"
        if self.dit is not None:
            from ospfn.parallel import agree

            agree(not bad, msg, error=RLRunError)
        elif bad:
            raise RLRunError(msg)

    def save(self, out_dir) -> Optional[Path]:
        """Write ``out_dir/ckpt-<iteration>`` (adapter, EMA, optimizer, clip statistics, iteration); main rank,
        or (FSDP2) every rank its shards of a DCP checkpoint (collective, ``_save_dcp``)."""
        from ospfn.train.state import save_train_state

        self.check_finite(Path(out_dir) / f"ckpt-{self.iteration:08d}")
        if self.dit is not None:
            return self._save_dcp(out_dir)
        if not self.is_main:
            return None
        return save_train_state(out_dir, self.iteration, params=self.named, ema=self.ema.shadow, state=self.state(),
                                keep=self.cfg.train.keep)  # fmt: skip

    def _save_dcp(self, out_dir) -> Optional[Path]:
        from ospfn.train.distributed import save_dcp
        from ospfn.train.step import RunError

        extra = {"step": self.iteration, "iteration": self.iteration, "data_pos": self.iteration * self.cfg.rollout.prompts_per_iter,
                 "clip": self.clip.state_dict(), "skipped_nonfinite": self.skipped_nonfinite, "world": self.world,
                 "config": self.cfg.to_dict()}  # fmt: skip
        try:
            path = save_dcp(out_dir, self.iteration, self.dit, self.opt, self.ema, extra, keep=self.cfg.train.keep, options=_dcp_options())
        except RunError as e:  # the same message on every rank
            raise RLRunError(str(e)) from None
        return path if self.is_main else None

    def load_dcp(self, path) -> dict:
        """FSDP2: restore a ``save`` checkpoint directory (collective): adapter and EMA shards, optimizer,
        clip statistics, iteration.  Returns its scalar state (with the config it was written with)."""
        from ospfn.train.distributed import load_dcp

        extra = load_dcp(path, self.dit, self.opt, self.ema, options=_dcp_options())
        self.iteration = int(extra["iteration"])
        self.skipped_nonfinite = int(extra.get("skipped_nonfinite", 0))
        self.clip.load_state_dict(extra["clip"])
        return extra

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        """The current adapter, full tensors on the CPU (FSDP2: gathered, collective: every rank must call)."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone() for k, v in self.named.items()}

    def load(self, ckpt: dict) -> None:
        """Restore a ``load_train_state`` result: adapter, EMA, optimizer, clip statistics, iteration."""
        st = ckpt["state"]
        with torch.no_grad():
            for k, v in self.named.items():
                v.copy_(ckpt["params"][k].to(v.device))
        self.opt.load_state_dict(st["optimizer"])
        self.ema.load_state_dict({"decay": self.cfg.optim.ema_decay, "shadow": ckpt["ema"]})
        self.clip.load_state_dict(st["clip"])
        self.iteration = int(st["iteration"])
        self.skipped_nonfinite = int(st.get("skipped_nonfinite", 0))

    def ema_adapter(self):
        """The EMA of the adapter as a ``LoraAdapter`` (what a run exports; FSDP2: gathered, collective)."""
        from ospfn.lora import LoraAdapter

        if self.dit is not None:
            return LoraAdapter(self.adapter.config, self.ema.full())
        return LoraAdapter(self.adapter.config, {k: v.clone() for k, v in self.ema.shadow.items()})

    def export(self, out) -> Optional[Path]:
        """Write the EMA adapter in the diffusers LoRA format (``pytorch_lora_weights.safetensors``); main rank
        (FSDP2: collective, the EMA gathered to rank 0, a failure to write agreed on)."""
        from ospfn.lora import save_lora

        self.check_finite(out)
        ema = self.ema_adapter() if self.dit is not None else None  # collective under FSDP2
        if self.dit is None and not self.is_main:
            return None
        import json

        meta = {"ospfn_rl": json.dumps({"iterations": self.iteration, "rewards": {r.name: r.weight for r in self.rewards}})}
        if self.dit is None:
            save_lora(out, self.ema_adapter(), format="diffusers", metadata=meta)
            return Path(out)
        from ospfn.parallel import agree

        ok, msg = True, ""
        if self.is_main:
            try:
                save_lora(out, ema, format="diffusers", metadata=meta)
            except (OSError, ValueError) as e:
                ok, msg = False, f"iteration {self.iteration}: cannot write the EMA adapter to {out}: {e}"
        agree(ok, msg, error=RLRunError)
        return Path(out) if self.is_main else None


def _dcp_options():
    """What an FSDP2 checkpoint holds of the module: the trainable adapter only (the base is the pipeline's);
    loading leaves the frozen base parameters as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def make_rl_trainer(cfg: RLConfig, out_dir, resume=None, *, device=None) -> RLTrainer:
    """The run of ``cfg``: one process on ``device`` (default cpu), or under torchrun (WORLD_SIZE > 1) every
    rank of ``init_parallel`` with the config's sequence parallelism, the DiT replicated (``parallel.fsdp``
    false) or sharded with FSDP2 (true; collective).  ``resume``: None, "latest" (the newest checkpoint in
    ``out_dir``) or a checkpoint path; the saved config must match ``cfg`` except for ``train.iterations``,
    the logging / checkpoint intervals and ``parallel.fsdp`` (a checkpoint's format must fit the mode: DCP
    directories for FSDP2, single-file checkpoints otherwise).  Raises ``ospfn.train.build.TrainError``."""
    from ospfn.model.checkpoint import CheckpointError
    from ospfn.parallel.mesh import world_from_env
    from ospfn.train.build import TrainError
    from ospfn.train.state import latest_checkpoint, load_train_state

    kw = {}
    if world_from_env(1, where="train_rl") > 1:
        from ospfn.parallel import ParallelConfig, init_parallel

        try:
            st = init_parallel(ParallelConfig(skiparse_sp=cfg.parallel.skiparse_sp, ulysses_sp=cfg.parallel.ulysses_sp),
                               device=None if device is None else torch.device(device).type)  # fmt: skip
        except ValueError as e:
            raise TrainError(f"parallel: {e}") from e
        import torch.distributed as dist

        kw = {"parallel": st, "dp": st.dp, "dp_rank": st.dp_rank, "group": dist.group.WORLD, "world": st.world, "rank": st.rank}
        if cfg.parallel.fsdp:
            return _fsdp_rl_trainer(cfg, out_dir, resume, st, kw)
        device = st.device
    elif cfg.parallel.skiparse_sp * cfg.parallel.ulysses_sp > 1:
        raise TrainError(f"parallel: skiparse_sp * ulysses_sp = {cfg.parallel.skiparse_sp * cfg.parallel.ulysses_sp} needs that many "
                         "processes: launch with torchrun")  # fmt: skip
    try:
        trainer = RLTrainer(cfg, device=device, **kw)
    except (ValueError, OSError) as e:
        raise TrainError(str(e)) from e
    if resume is not None:
        src = Path(out_dir) if resume == "latest" else Path(resume)
        try:
            if latest_checkpoint(src) is None and not (src / "state.pt").exists():
                raise TrainError(f"--resume: no checkpoint found in {src}")
            found = src if (src / "state.pt").exists() else latest_checkpoint(src)
            if _is_dcp(found):
                raise TrainError(f"--resume: {found} is a torch.distributed.checkpoint directory of an FSDP2 run (parallel.fsdp: true); "
                                 "resume it under torchrun with parallel.fsdp: true")  # fmt: skip
            ckpt = load_train_state(src)
        except CheckpointError as e:
            raise TrainError(f"--resume: {e}") from None
        _check_resume(ckpt["state"].get("config"), cfg, ckpt["path"])
        trainer.load(ckpt)
        trainer.resumed_from = ckpt["path"]
    return trainer


def _is_dcp(path) -> bool:
    return path is not None and (Path(path) / ".metadata").is_file() and not (Path(path) / "state.pt").exists()


def _fsdp_rl_trainer(cfg: RLConfig, out_dir, resume, st, kw: dict) -> RLTrainer:
    """``make_rl_trainer`` under torchrun with ``parallel.fsdp: true``.  What only some ranks may see (a
    pipeline or checkpoint missing on one node, a damaged file) is checked on every rank and agreed on before
    the first collective, so every rank raises the same ``TrainError``."""
    from torch.distributed.device_mesh import init_device_mesh

    from ospfn.model.checkpoint import CheckpointError
    from ospfn.parallel import agree
    from ospfn.train.build import TrainError
    from ospfn.train.distributed import check_dcp, latest_dcp

    problem, trainer, src = "", None, None
    try:
        trainer = RLTrainer(cfg, device=st.device, **kw)
        if resume is not None:
            src = Path(out_dir) if resume == "latest" else Path(resume)
            if src.is_dir() and not (src / ".metadata").exists() and not (src / "state.pt").exists():
                src = latest_dcp(src)  # a run directory: its latest checkpoint
            if src is None or not src.exists():
                raise TrainError(f"--resume: no checkpoint found in {out_dir if resume == 'latest' else resume}")
            if (src / "state.pt").exists():
                raise TrainError(f"--resume: {src} is a single-file checkpoint of one process or of the replicated mode "
                                 "(parallel.fsdp: false), not a torch.distributed.checkpoint directory; resume it with parallel.fsdp: false")  # fmt: skip
            why, extra = check_dcp(src)
            if why:
                raise TrainError(f"--resume: {why}")
            _check_resume(extra.get("config"), cfg, src)
    except CheckpointError as e:
        problem = f"--resume: {e}"
    except (ValueError, OSError) as e:  # TrainError, a pipeline that cannot be read, a file that vanished
        problem = str(e) or type(e).__name__
    agree(not problem, problem, error=TrainError)
    trainer.shard(init_device_mesh(st.device.type, (st.world,)))
    if src is not None:
        trainer.load_dcp(src)
        trainer.resumed_from = src
    return trainer


_MAY_CHANGE = {"out_dir", "train.iterations", "train.log_every", "train.ckpt_every", "train.keep", "train.attn_backend", "parallel.fsdp"}


def _check_resume(saved, cfg: RLConfig, path) -> None:
    from ospfn.train.build import TrainError

    def flat(d, pre=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "args":
                out.update(flat(v, f"{pre}{k}."))
            else:
                out[f"{pre}{k}"] = v
        return out

    if not isinstance(saved, dict):
        raise TrainError(f"--resume: {path} holds no RL config (not a train_rl.py checkpoint)")
    a, b = flat(saved), flat(cfg.to_dict())
    differ = sorted(k for k in set(a) | set(b) if k not in _MAY_CHANGE and _norm(a.get(k)) != _norm(b.get(k)))
    if differ:
        raise TrainError(f"--resume: the config differs from the run in {path} at {differ[:8]}; only {sorted(_MAY_CHANGE)} may change")


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v
