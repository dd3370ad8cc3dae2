"""DPM-Solver++ (2nd order, multistep, midpoint) for rectified flow, and the compressed ODE grid of Mix-GRPO
(docs/rl.md#compressed-ode-after-the-window).

Flow-matching convention of ospfn.sched.flow: x_sigma = sigma * eps + (1 - sigma) * x0 and the model predicts
v = eps - x0, so the data prediction is x0 = x - sigma * v.  In DPM-Solver's notation alpha = 1 - sigma and the
half log-SNR is lambda = log(alpha / sigma).  With h = lambda(sigma_next) - lambda(sigma) one step is

    x' = (sigma'/sigma) x + alpha' (1 - e^-h) D0 + 0.5 alpha' (1 - e^-h) D1,     D0 = x0,  D1 = (x0 - x0_prev) / r,

r = (lambda(sigma) - lambda(sigma_prev)) / h, where x0_prev is the data prediction of the previous step (at
sigma_prev).  Without a previous prediction, and for the final step to sigma' = 0, the D1 term is dropped: the
first-order step, which for rectified flow is exactly the Euler step x + (sigma' - sigma) v.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ospfn.sched.flow import check_number, check_sigmas, shift_sigmas

__all__ = ["dpmpp_2m_step", "dpmpp_2m_sample", "compressed_tail", "unshift_sigma"]


def _lam(sigma: float) -> float:
    """Half log-SNR log((1 - sigma) / sigma) for 0 < sigma < 1."""
    return math.log1p(-sigma) - math.log(sigma)


def dpmpp_2m_step(
    z: torch.Tensor,
    x0: torch.Tensor,
    sigma: float,
    sigma_next: float,
    *,
    prev_x0: Optional[torch.Tensor] = None,
    prev_sigma: Optional[float] = None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) midpoint step from ``sigma`` to ``sigma_next`` (< sigma), fp32.

    ``x0`` is the data prediction at (z, sigma), i.e. ``z - sigma * v``.  ``prev_x0`` / ``prev_sigma`` (both or
    neither) are the previous step's prediction and sigma (> sigma); without them, when ``prev_sigma`` is 1 (no
    finite log-SNR) or when ``sigma_next`` is 0, the step is first order (= Euler).

    >>> z, v = torch.tensor([1.0]), torch.tensor([0.5])
    >>> round(float(dpmpp_2m_step(z, z - 0.8 * v, 0.8, 0.6)), 6)   # first order: z + (0.6 - 0.8) v
    0.9
    """
    fn = "dpmpp_2m_step"
    for arg, t in (("z", z), ("x0", x0), ("prev_x0", prev_x0)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if x0.shape != z.shape:
        raise ValueError(f"{fn}: x0 must have the shape of z {tuple(z.shape)}, got {tuple(x0.shape)}")
    sigma = check_number(sigma, fn, "sigma", lo=0, lo_open=True, hi=1, hi_open=True)
    sigma_next = check_number(sigma_next, fn, "sigma_next", lo=0, hi=1)
    if sigma_next >= sigma:
        raise ValueError(f"{fn}: sigma_next ({sigma_next}) must be below sigma ({sigma})")
    if (prev_x0 is None) != (prev_sigma is None):
        raise ValueError(f"{fn}: pass prev_x0 and prev_sigma together (got prev_x0 {'None' if prev_x0 is None else 'set'}, "
                         f"prev_sigma {prev_sigma!r})")
    zf, d0 = z.float(), x0.float()
    ratio = sigma_next / sigma
    alpha_n = 1.0 - sigma_next
    # alpha' (1 - e^-h) = alpha' - (1 - sigma) sigma' / sigma  (exact, also at sigma' = 0 where h = inf)
    coef = alpha_n - (1.0 - sigma) * ratio
    out = ratio * zf + coef * d0
    if prev_x0 is None or sigma_next == 0.0:
        return out
    prev_sigma = check_number(prev_sigma, fn, "prev_sigma", lo=0, lo_open=True, hi=1)
    if prev_sigma <= sigma:
        raise ValueError(f"{fn}: prev_sigma ({prev_sigma}) must be above sigma ({sigma}): the previous step comes first")
    if prev_x0.shape != z.shape:
        raise ValueError(f"{fn}: prev_x0 must have the shape of z {tuple(z.shape)}, got {tuple(prev_x0.shape)}")
    if prev_sigma == 1.0:
        return out  # lambda(1) = -inf: r = inf, D1 = 0
    h = _lam(sigma_next) - _lam(sigma)
    r = (_lam(sigma) - _lam(prev_sigma)) / h
    d1 = (d0 - prev_x0.float()) / r
    return out + (0.5 * coef) * d1


def dpmpp_2m_sample(
    velocity: Callable[[torch.Tensor, float, int], torch.Tensor],
    z: torch.Tensor,
    sigmas,
    *,
    prev_x0: Optional[torch.Tensor] = None,
    prev_sigma: Optional[float] = None,
    index_offset: int = 0,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Integrate dz/dsigma = velocity(z, sigma, i) over ``sigmas`` (decreasing, each < 1 except possibly the
    first) with DPM-Solver++(2M), fp32 state.  The first step is first order unless ``prev_x0`` / ``prev_sigma``
    continue an earlier trajectory; the last step (to 0) is first order.  ``i`` = ``index_offset`` + the step's
    position in ``sigmas`` (also what ``callback(i, z)`` receives).
    """
    fn = "dpmpp_2m_sample"
    s = check_sigmas(sigmas, fn)
    if not callable(velocity):
        raise TypeError(f"{fn}: velocity must be callable as velocity(z, sigma, i), got {type(velocity).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"{fn}: callback must be callable as callback(i, z) or None, got {type(callback).__name__}")
    if not isinstance(z, torch.Tensor) or not z.dtype.is_floating_point:
        raise TypeError(f"{fn}: z must be a floating-point tensor, got {getattr(z, 'dtype', type(z).__name__)}")
    if isinstance(index_offset, bool) or not isinstance(index_offset, int) or index_offset < 0:
        raise ValueError(f"{fn}: index_offset must be an int >= 0, got {index_offset!r}")
    z = z.float()
    for j in range(len(s) - 1):
        i = index_offset + j
        v = velocity(z, s[j], i)
        x0 = z - s[j] * v.float()
        if s[j] == 1.0:  # no data prediction at pure noise: plain Euler, no history
            z, prev_x0, prev_sigma = z + (s[j + 1] - s[j]) * v.float(), None, None
        else:
            z, prev_x0, prev_sigma = dpmpp_2m_step(z, x0, s[j], s[j + 1], prev_x0=prev_x0, prev_sigma=prev_sigma), x0, s[j]
        if callback is not None:
            callback(i, z)
    return z


def unshift_sigma(sigma: float, shift: float) -> float:
    """The inverse of ``shift_sigmas``: t with S t / (1 + (S - 1) t) = sigma, i.e. t = sigma / (S - (S - 1) sigma).

    >>> round(unshift_sigma(0.75, 3.0), 12)
    0.5
    """
    fn = "unshift_sigma"
    sigma = check_number(sigma, fn, "sigma", lo=0, hi=1)
    shift = check_number(shift, fn, "shift", lo=0, lo_open=True)
    return sigma / (shift - (shift - 1.0) * sigma)


def compressed_tail(sigmas, last_sde: int, ratio: float, *, shift: float) -> list[float]:
    """The schedule Mix-GRPO runs when the ODE steps after the SDE window are compressed (docs/rl.md#compressed-ode-after-the-window).

    ``sigmas`` (N + 1 values, N steps) is kept up to index ``last_sde + 1`` (the target of the last SDE step);
    from there to 0 the remaining N - 1 - last_sde steps are replaced by P - 1 steps, P = max(floor((N -
    last_sde) * ratio), 2) points evenly spaced in the unshifted time t (``unshift_sigma``) and shifted back with
    ``shift``.  Returns the whole schedule as floats (``sigmas[: last_sde + 2]`` + the new points, ending at 0).

    >>> s = [round(x, 4) for x in compressed_tail([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], 0, 0.6, shift=1.0)]
    >>> s  # 5 steps, window [0]: P = floor(5 * 0.6) = 3 points from 0.8 to 0
    [1.0, 0.8, 0.4, 0.0]
    """
    fn = "compressed_tail"
    s = check_sigmas(sigmas, fn)
    n = len(s) - 1
    if isinstance(last_sde, bool) or not isinstance(last_sde, int) or not 0 <= last_sde <= n - 2:
        raise ValueError(f"{fn}: last_sde must be an int step index in [0, {n - 2}] (before the last step of {n}), got {last_sde!r}")
    ratio = check_number(ratio, fn, "ratio", lo=0, lo_open=True, hi=1)
    shift = check_number(shift, fn, "shift", lo=0, lo_open=True)
    if s[-1] != 0.0:
        raise ValueError(f"{fn}: sigmas must end at 0 (the compressed tail runs to the clean sample), got {s[-1]}")
    points = max(int((n - last_sde) * ratio), 2)
    first = s[last_sde + 1]
    t0 = unshift_sigma(first, shift)
    tail = [float(shift_sigmas(t0 * (1.0 - k / (points - 1)), shift)) for k in range(1, points - 1)]
    return s[: last_sde + 2] + tail + [0.0]
