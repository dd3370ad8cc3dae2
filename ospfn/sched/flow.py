"""Rectified-flow scheduling, sampling and the training loss (docs/training.md#noise-schedules, docs/training.md#mix-grpo-sde-step).

Convention: x_sigma = sigma * eps + (1 - sigma) * x0, sigma in [0, 1] (1 = pure noise); the model predicts
the velocity v = eps - x0 = dx/dsigma; sampling integrates from sigma = 1 down to 0, so d_sigma < 0.
All state is kept in fp32 between steps.
"""

from __future__ import annotations

import math
import numbers
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
    "check_sigmas",
    "MAX_STEPS",
]

# dynamic shift: mu = a * L + b through (256, 0.5) and (4096, 1.15), L = spatial tokens per latent frame
_DS_A = (1.15 - 0.5) / (4096 - 256)
_DS_B = 0.5 - 256 * _DS_A


MAX_STEPS = 1_000_000  # inference_sigmas refuses more steps (a typo like 5e9 would allocate gigabytes)


def _is_num(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_number(v: object, fn: str, arg: str, *, lo: float | None = None, lo_open: bool = False,
                 hi: float | None = None, hi_open: bool = False) -> float:
    """``float(v)`` if ``v`` is a finite real number (not a bool) within the bounds, else ``TypeError`` /
    ``ValueError`` naming ``arg`` and the allowed range (shared by the scheduler, sampler and loss)."""
    rng = ("(" if lo_open else "[") + ("-inf" if lo is None else f"{lo:g}") + ", " + ("inf" if hi is None else f"{hi:g}") + (
        ")" if hi_open or hi is None else "]")
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype.is_floating_point:
        v = v.item()  # a one-element tensor (a schedule entry) is a number too
    if not _is_num(v):
        raise TypeError(f"{fn}: {arg} must be a finite number in {rng}, got {type(v).__name__}")
    f = float(v)
    ok = math.isfinite(f) and (lo is None or (f > lo if lo_open else f >= lo)) and (hi is None or (f < hi if hi_open else f <= hi))
    if not ok:
        raise ValueError(f"{fn}: {arg} must be a finite number in {rng}, got {v!r}")
    return f


def shift_sigmas(sigma, shift: float):
    """sigma' = S * sigma / (1 + (S - 1) * sigma): pushes sigmas toward 1 (more noise) for S > 1.

    ``shift`` must be a finite number > 0 (S = 1 is the identity).

    >>> round(float(shift_sigmas(torch.tensor(0.5), 3.0)), 6)
    0.75
    """
    if not (_is_num(shift) and 0 < shift < math.inf):  # NaN fails too
        raise ValueError(f"shift_sigmas: shift must be a finite number > 0, got {shift!r}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def _tensors(fn: str, **named) -> None:
    for arg, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(t).__name__}")


def _check_pair(v: object, fn: str, arg: str, what: str) -> tuple[int, int]:
    ok = isinstance(v, (tuple, list, torch.Size)) and len(v) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in v)
    if not ok:
        raise ValueError(f"{fn}: {arg} must be a pair of positive ints {what}, got {v!r}")
    return int(v[0]), int(v[1])


def dynamic_shift(latent_hw: Sequence[int], patch_hw: Sequence[int] = (2, 2)) -> float:
    """S = exp(a * L + b) with L = spatial tokens per latent frame (after the 2x2 patch).

    ``latent_hw`` and ``patch_hw`` are pairs of positive ints, the latent no smaller than the patch.

    >>> round(dynamic_shift((60, 104)), 3)   # 480 x 832 video
    2.056
    """
    h, w = _check_pair(latent_hw, "dynamic_shift", "latent_hw", "(latent height, width)")
    ph, pw = _check_pair(patch_hw, "dynamic_shift", "patch_hw", "(patch height, width)")
    if h < ph or w < pw:
        raise ValueError(f"dynamic_shift: latent_hw {(h, w)} is smaller than one patch {(ph, pw)}")
    L = (h // ph) * (w // pw)
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

    Drawn on the CPU generator (reproducible across devices) and moved to ``device``.  ``batch`` is an int
    >= 0 (0 gives an empty tensor); ``mean`` finite, ``std`` finite and > 0, ``shift`` None or finite and > 0.
    """
    fn = "training_sigmas"
    if isinstance(batch, bool) or not isinstance(batch, int):
        raise TypeError(f"{fn}: batch must be an int >= 0, got {type(batch).__name__}")
    if batch < 0:
        raise ValueError(f"{fn}: batch must be an int >= 0, got {batch}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(logit_normal, bool):
        raise TypeError(f"{fn}: logit_normal must be a bool, got {type(logit_normal).__name__}")
    check_number(mean, fn, "mean")
    check_number(std, fn, "std", lo=0, lo_open=True)
    if shift is not None:
        check_number(shift, fn, "shift", lo=0, lo_open=True)
    if logit_normal:
        u = torch.randn(batch, generator=generator, dtype=torch.float64) * std + mean
        sigma = torch.sigmoid(u)
    else:
        sigma = torch.rand(batch, generator=generator, dtype=torch.float64)
    if shift is not None:
        sigma = shift_sigmas(sigma, shift)
    return sigma.clamp(1e-5, 1.0).to(device=device, dtype=torch.float32)


def inference_sigmas(steps: int = 50, shift: float = 7.0) -> torch.Tensor:
    """linspace(1, 0, steps + 1) under a fixed shift, float64 [steps + 1] (first 1, last 0).

    ``steps``: an int in [1, MAX_STEPS]; ``shift``: a finite number > 0.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"inference_sigmas: steps must be an int in [1, {MAX_STEPS}], got {steps!r}")
    if not (_is_num(shift) and 0 < shift < math.inf):
        raise ValueError(f"inference_sigmas: shift must be a finite number > 0, got {shift!r}")
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def euler_step(z: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """z + v * (sigma_next - sigma), in fp32."""
    _tensors("euler_step", z=z, v=v)
    return z.float() + v.float() * (float(sigma_next) - float(sigma))


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance v_u + g (v_c - v_u); ``guidance == 1`` returns the conditional branch."""
    _tensors("cfg_combine", v_uncond=v_uncond, v_cond=v_cond)
    if guidance == 1.0:
        return v_cond
    return v_uncond + guidance * (v_cond - v_uncond)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """Mean over all but the batch dim of log N(x; mean, std^2): [B] fp32."""
    _tensors("gaussian_log_prob", x=x, mean=mean)
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
    fn = "sde_step"
    _tensors(fn, x=x, v=v, prev=prev)
    sigma = check_number(sigma, fn, "sigma", lo=0, lo_open=True, hi=1)
    sigma_next = check_number(sigma_next, fn, "sigma_next", lo=0, hi=1)
    dt = sigma_next - sigma
    if dt >= 0:
        raise ValueError(f"sde_step: sigma_next ({sigma_next}) must be below sigma ({sigma})")
    s = sigma if noise_level is None else check_number(noise_level, fn, "noise_level", lo=0)
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
    """Integrate dz/dsigma = velocity(z, sigma, i) with Euler over ``sigmas`` (decreasing), fp32 state.

    ``sigmas``: at least 2 finite values in [0, 1], strictly decreasing (a 1-D tensor or a sequence).
    """
    s = check_sigmas(sigmas, "euler_sample")
    if not callable(velocity):
        raise TypeError(f"euler_sample: velocity must be callable as velocity(z, sigma, i), got {type(velocity).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"euler_sample: callback must be callable as callback(i, z) or None, got {type(callback).__name__}")
    if not isinstance(z, torch.Tensor) or not z.dtype.is_floating_point:
        raise TypeError(f"euler_sample: z must be a floating-point tensor, got {getattr(z, 'dtype', type(z).__name__)}")
    z = z.float()
    for i in range(len(s) - 1):
        z = euler_step(z, velocity(z, s[i], i), s[i], s[i + 1])
        if callback is not None:
            callback(i, z)
    return z


def check_sigmas(sigmas, fn: str) -> list[float]:
    """The schedule as Python floats: at least 2 finite values in [0, 1], strictly decreasing (``ValueError``
    naming ``sigmas`` otherwise; ``TypeError`` for something that is not a 1-D tensor or a sequence of numbers)."""
    if isinstance(sigmas, torch.Tensor):
        if sigmas.dim() != 1 or sigmas.dtype == torch.bool or sigmas.dtype.is_complex:
            raise TypeError(f"{fn}: sigmas must be a 1-D real tensor or a sequence of numbers, got {sigmas.dtype} {tuple(sigmas.shape)}")
        vals = [float(v) for v in sigmas.detach().cpu().tolist()]
    elif isinstance(sigmas, (list, tuple)) and all(_is_num(v) for v in sigmas):
        vals = [float(v) for v in sigmas]
    else:
        raise TypeError(f"{fn}: sigmas must be a 1-D real tensor or a sequence of numbers, got {type(sigmas).__name__}")
    if len(vals) < 2:
        raise ValueError(f"{fn}: sigmas must hold at least 2 values (one step), got {len(vals)}")
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in vals):
        raise ValueError(f"{fn}: sigmas must be finite values in [0, 1], got {[v for v in vals if not (math.isfinite(v) and 0 <= v <= 1)][:4]}")
    if any(b >= a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{fn}: sigmas must be strictly decreasing (from noise towards 0), got {vals[:8]}{' ...' if len(vals) > 8 else ''}")
    return vals
