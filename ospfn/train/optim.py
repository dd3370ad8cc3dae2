"""Optimisation helpers for the SFT / RL recipes: AdamW, EMA, adaptive gradient clipping, LR schedule.

All are small and stateful only through explicit ``state_dict`` / ``load_state_dict`` so a resumed run
continues bit for bit.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

__all__ = ["make_adamw", "EMA", "AdaptiveGradClip", "warmup_constant", "set_lr", "global_grad_norm", "clip_grad_norm",
           "nonfinite_tensors"]  # fmt: skip


def make_adamw(params: Iterable, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-15):
    """AdamW as OSP-Next trains (eps 1e-15); ``foreach`` kernels, deterministic on CPU.  ``params`` may be
    tensors or param-group dicts (an ``lr_mult`` key scales the group's lr, see ``set_lr``)."""
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, foreach=True)


def set_lr(optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * group.get("lr_mult", 1)``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def global_grad_norm(grads: list[torch.Tensor]) -> float:
    """L2 norm over all gradients (the full norm for sharded DTensor gradients)."""
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    return float(total)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` (fixed threshold) returning the norm before clipping as a float;
    for FSDP2 (DTensor) gradients the norm is the global one."""
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    return float(total)


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the floating-point tensors of ``tensors`` (name -> tensor, or name -> dict of tensors, as an
    optimizer's per-parameter state) holding a NaN or an infinity; for FSDP2 (DTensor) values, of this rank's
    shard only."""
    bad = []
    for name, v in tensors.items():
        if isinstance(v, dict):
            bad += [f"{name}.{k}" for k in nonfinite_tensors(v)]
            continue
        if not isinstance(v, torch.Tensor):
            continue
        local = v.to_local() if hasattr(v, "to_local") else v
        if local.is_floating_point() and local.numel() and not bool(torch.isfinite(local).all()):
            bad.append(name)
    return bad


def warmup_constant(step: int, *, base_lr: float, warmup_steps: int = 0) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then constant (the released recipes' schedule)."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


class EMA:
    """Exponential moving average of a parameter dict: ema <- decay * ema + (1 - decay) * param (fp32)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.shadow = {k: v.detach().float().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [params[k].detach().float() for k in keys], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, sd: dict) -> None:
        if set(sd["shadow"]) != set(self.shadow):
            raise KeyError("EMA.load_state_dict: parameter names differ from the model's")
        self.decay = float(sd["decay"])
        for k, v in sd["shadow"].items():
            self.shadow[k].copy_(v)


class AdaptiveGradClip:
    """Clip the global gradient norm to EMA(norm) + k * sqrt(EMA(var)) (OSP-Next: k = 3, decay 0.99).

    Until the statistics exist the threshold is ``initial`` (1.0).  Statistics are updated with the clipped
    norm so a single spike does not raise the bar for the next steps.  A non-finite norm (a NaN or an
    infinity in the gradients) leaves the gradients and the statistics untouched: the step that produced it
    is stopped or skipped by the trainer, and must not poison the threshold of the steps after it.
    """

    def __init__(self, *, initial: float = 1.0, decay: float = 0.99, k: float = 3.0) -> None:
        self.initial, self.decay, self.k = float(initial), float(decay), float(k)
        self.mean = None
        self.var = 0.0

    def threshold(self) -> float:
        return self.initial if self.mean is None else self.mean + self.k * math.sqrt(self.var)

    @torch.no_grad()
    def __call__(self, grads: list[torch.Tensor]) -> tuple[float, float]:
        """Clip in place; returns (norm before clipping, threshold used).  FSDP2 (DTensor) gradients are
        handled: the norm is the global one, the scaling applies to each rank's shard."""
        norm = global_grad_norm(grads)
        thr = self.threshold()
        if not math.isfinite(norm):
            return norm, thr
        if norm > thr and norm > 0:
            torch._foreach_mul_([g.to_local() if hasattr(g, "to_local") else g for g in grads], thr / norm)
        used = min(norm, thr)
        if self.mean is None:
            self.mean, self.var = used, 0.0
        else:
            delta = used - self.mean
            self.mean += (1 - self.decay) * delta
            self.var = self.decay * (self.var + (1 - self.decay) * delta * delta)
        return norm, thr

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "initial": self.initial, "decay": self.decay, "k": self.k}

    def load_state_dict(self, sd: dict) -> None:
        self.mean, self.var = sd["mean"], sd["var"]
        self.initial, self.decay, self.k = sd["initial"], sd["decay"], sd["k"]
