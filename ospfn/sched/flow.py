"""Rectified-flow scheduling, sampling and the training loss (docs/training.md#noise-schedules, docs/training.md#mix-grpo-sde-step).

Convention: x_sigma = sigma * eps + (1 - sigma) * x0, sigma in [0, 1] (1 = pure noise); the model predicts
the velocity v = eps - x0 = dx/dsigma; sampling integrates from sigma = 1 down to 0, so d_sigma < 0.
All state is kept in fp32 between steps.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

__all__ = [
    "shift_sigmas",
    "dynamic_shift",
    "training_sigmas",
    "inference_sigmas",
    "euler_step",
    "cfg_combine",
    "sde_step",
    "gaussian_log_prob",
    "euler_sample",
]

# dynamic shift: mu = a * L + b through (256, 0.5) and (4096, 1.15), L = spatial tokens per latent frame
_DS_A = (1.15 - 0.5) / (4096 - 256)
_DS_B = 0.5 - 256 * _DS_A


def shift_sigmas(sigma, shift: float):
    """sigma' = S * sigma / (1 + (S - 1) * sigma): pushes sigmas toward 1 (more noise) for S > 1.

    >>> round(float(shift_sigmas(torch.tensor(0.5), 3.0)), 6)
    0.75
    """
    if not (isinstance(shift, (int, float)) and shift > 0 and math.isfinite(shift)):
        raise ValueError(f"shift_sigmas: shift must be a finite number > 0, got {shift!r}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def dynamic_shift(latent_hw: Sequence[int], patch_hw: Sequence[int] = (2, 2)) -> float:
    """S = exp(a * L + b) with L = spatial tokens per latent frame (after the 2x2 patch).

    >>> round(dynamic_shift((60, 104)), 3)   # 480 x 832 video
    2.056
    """
    h, w = latent_hw
    L = (h // patch_hw[0]) * (w // patch_hw[1])
    return math.exp(_DS_A * L + _DS_B)


def training_sigmas(
    batch: int,
    *,
    generator: Optional[torch.Generator] = None,
    logit_normal: bool = True,
    mean: float = 0.0,
    std: float = 1.0,
    shift: Optional[float] = None,
    device=None,
) -> torch.Tensor:
    """Per-sample training sigmas, fp32 [batch]: sigmoid(N(mean, std)) (or U(0, 1)), then ``shift_sigmas``.

    Drawn on the CPU generator (reproducible across devices) and moved to ``device``.
    """
    if logit_normal:
        u = torch.randn(batch, generator=generator, dtype=torch.float64) * std + mean
        sigma = torch.sigmoid(u)
    else:
        sigma = torch.rand(batch, generator=generator, dtype=torch.float64)
    if shift is not None:
        sigma = shift_sigmas(sigma, shift)
    return sigma.clamp(1e-5, 1.0).to(device=device, dtype=torch.float32)


def inference_sigmas(steps: int = 50, shift: float = 7.0) -> torch.Tensor:
    """linspace(1, 0, steps + 1) under a fixed shift, float64 [steps + 1] (first 1, last 0)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"inference_sigmas: steps must be an int >= 1, got {steps!r}")
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def euler_step(z: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """z + v * (sigma_next - sigma), in fp32."""
    return z.float() + v.float() * (float(sigma_next) - float(sigma))


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance v_u + g (v_c - v_u); ``guidance == 1`` returns the conditional branch."""
    if guidance == 1.0:
        return v_cond
    return v_uncond + guidance * (v_cond - v_uncond)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """Mean over all but the batch dim of log N(x; mean, std^2): [B] fp32."""
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    lp = -((x.float() - mean.float()) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    noise_level: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    prev: Optional[torch.Tensor] = None,
):
    """One stochastic step of Mix-GRPO (docs/training.md#mix-grpo-sde-step), returning (x_next, mean, std, log_prob).

    mu = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt;  x' = mu + s sqrt(-dt) eps,
    s = ``noise_level`` (default sigma).  ``prev`` evaluates the log-probability of a given x' instead of
    sampling one (the policy-ratio computation).  A step to sigma_next = 0 is noiseless (std 0, log_prob 0).
    """
    sigma, sigma_next = float(sigma), float(sigma_next)
    dt = sigma_next - sigma
    if dt >= 0:
        raise ValueError(f"sde_step: sigma_next ({sigma_next}) must be below sigma ({sigma})")
    s = sigma if noise_level is None else float(noise_level)
    xf, vf = x.float(), v.float()
    mu = xf * (1 + s * s * dt / (2 * sigma)) + vf * (1 + s * s * (1 - sigma) / (2 * sigma)) * dt
    if sigma_next == 0.0:
        out = mu if prev is None else prev.float()
        return out, mu, 0.0, torch.zeros(x.shape[0], device=x.device)
    std = s * math.sqrt(-dt)
    if prev is None:
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        out = mu + std * eps
    else:
        out = prev.float()
    return out, mu, std, gaussian_log_prob(out, mu, std)


def euler_sample(
    velocity: Callable[[torch.Tensor, float, int], torch.Tensor],
    z: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Integrate dz/dsigma = velocity(z, sigma, i) with Euler over ``sigmas`` (decreasing), fp32 state."""
    z = z.float()
    s = [float(v) for v in sigmas]
    for i in range(len(s) - 1):
        z = euler_step(z, velocity(z, s[i], i), s[i], s[i + 1])
        if callback is not None:
            callback(i, z)
    return z
