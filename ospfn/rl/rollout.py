"""GRPO rollouts: sampling with a window of stochastic (SDE) steps and deterministic ODE steps elsewhere
(docs/rl.md#rollouts).

The model enters only through ``velocity(z, sigma, i) -> v`` (the caller applies CFG, the FlashI2V shift, a LoRA
adapter ...), so everything here is model-agnostic.  Convention of ospfn.sched.flow: sigma runs from 1 (noise)
to 0, v = eps - x0, dt = sigma_next - sigma < 0.

SDE step (both formulations share it; they differ in the noise level s):

    mean   = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt
    x_next = mean + s sqrt(-dt) eps,        log p = mean over elements of log N(x_next; mean, (s sqrt(-dt))^2)

- ``sde="osp"`` (OSP-Next): s = sigma, or the constant ``noise_level`` when given;
- ``sde="flow_grpo"`` (Flow-GRPO / Mix-GRPO): s = a sqrt(sigma / (1 - sigma')), a = ``noise_level`` (0.7),
  sigma' = sigma except at sigma = 1 where it is ``sigma_max`` (the schedule's second value, sigmas[1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from ospfn.rl.window import mix_seed
from ospfn.sched.dpm_solver import compressed_tail, dpmpp_2m_step
from ospfn.sched.flow import check_number, check_sigmas, euler_step, gaussian_log_prob, sde_step

__all__ = ["SDE_KINDS", "FLOW_GRPO_NOISE", "sde_noise_level", "sde_log_prob", "step_generator", "initial_noise", "rollout",
           "Rollout", "SdeStep"]

SDE_KINDS = ("osp", "flow_grpo")
FLOW_GRPO_NOISE = 0.7  # Flow-GRPO's / Mix-GRPO's default a


def _check_sde(sde: object, fn: str) -> str:
    if not isinstance(sde, str) or sde not in SDE_KINDS:
        raise ValueError(f"{fn}: sde must be one of {SDE_KINDS}, got {sde!r}")
    return sde


def sde_noise_level(sde: str, sigma: float, *, noise_level: Optional[float] = None, sigma_max: Optional[float] = None) -> float:
    """The SDE noise level s of a step from ``sigma`` (see the module docstring).

    ``noise_level``: osp: None (s = sigma) or a number > 0 (constant s); flow_grpo: a > 0 (None = 0.7).
    ``sigma_max`` (flow_grpo only, needed when sigma = 1): the value replacing sigma = 1 in 1 - sigma, in (0, 1).

    >>> sde_noise_level("osp", 0.5), round(sde_noise_level("flow_grpo", 0.5), 6)
    (0.5, 0.7)
    >>> round(sde_noise_level("flow_grpo", 1.0, sigma_max=0.96), 6)   # 0.7 * sqrt(1 / (1 - 0.96))
    3.5
    """
    fn = "sde_noise_level"
    sde = _check_sde(sde, fn)
    sigma = check_number(sigma, fn, "sigma", lo=0, lo_open=True, hi=1)
    if sde == "osp":
        return sigma if noise_level is None else check_number(noise_level, fn, "noise_level", lo=0, lo_open=True)
    a = FLOW_GRPO_NOISE if noise_level is None else check_number(noise_level, fn, "noise_level", lo=0, lo_open=True)
    denom = sigma
    if sigma == 1.0:
        if sigma_max is None:
            raise ValueError(f"{fn}: sde='flow_grpo' at sigma = 1 needs sigma_max (the schedule's sigmas[1]), got None")
        denom = check_number(sigma_max, fn, "sigma_max", lo=0, lo_open=True, hi=1, hi_open=True)
    return a * math.sqrt(sigma / (1.0 - denom))


def sde_log_prob(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: float,
    sigma_next: float,
    x_next: torch.Tensor,
    *,
    sde: str = "osp",
    noise_level: Optional[float] = None,
    sigma_max: Optional[float] = None,
):
    """(log_prob [B], mean, std) of the transition ``x -> x_next`` under velocity ``v`` (differentiable in ``v``):
    the policy term of the GRPO ratio.  ``sigma_next`` must be > 0 (a step to 0 has no noise); the other
    arguments as in ``sde_noise_level``.  fp32.
    """
    fn = "sde_log_prob"
    for arg, t in (("x", x), ("v", v), ("x_next", x_next)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if v.shape != x.shape or x_next.shape != x.shape:
        raise ValueError(f"{fn}: x, v and x_next must have one shape, got {tuple(x.shape)}, {tuple(v.shape)}, {tuple(x_next.shape)}")
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have a batch dimension, got a 0-dim tensor")
    sigma_next = check_number(sigma_next, fn, "sigma_next", lo=0, lo_open=True, hi=1)
    s = sde_noise_level(sde, sigma, noise_level=noise_level, sigma_max=sigma_max)
    _, mean, std, log_prob = sde_step(x, v, sigma, sigma_next, noise_level=s, prev=x_next)
    return log_prob, mean, std


def step_generator(seed: int, iteration: int, step: int) -> torch.Generator:
    """The CPU generator of the SDE noise of ``step`` at ``iteration``: seeded with ``mix_seed(seed, iteration,
    step)``, so every rank that passes the same (seed, iteration) draws the same noise for a step, in any order."""
    return torch.Generator().manual_seed(mix_seed(seed, iteration, step))


def _check_int(v: object, fn: str, arg: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{fn}: {arg} must be an int >= {lo}, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{fn}: {arg} must be an int >= {lo}, got {v}")
    return v


def _check_rng(fn: str, generator, seed) -> None:
    if generator is not None and seed is not None:
        raise ValueError(f"{fn}: pass generator or seed, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(f"{fn}: generator must be a CPU torch.Generator (noise is drawn on the CPU, then moved), got one on {generator.device}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{fn}: seed must be an int or None, got {type(seed).__name__}")


def initial_noise(
    shape: Sequence[int],
    groups: int,
    k: int,
    *,
    shared: bool = False,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Initial noise [groups * k, *shape] for ``k`` generations of each of ``groups`` prompts, sample b in group
    b // k (the order of ``repeat_interleave``).  ``shared=True`` gives all k samples of a group the same noise
    (Mix-GRPO's ``init_same_noise``).  Drawn on the CPU from ``generator`` (or a generator seeded with ``seed``;
    neither: torch's global generator) in fp32, then moved to ``device`` / ``dtype``.

    >>> z = initial_noise((2, 3), groups=2, k=3, shared=True, seed=0)
    >>> z.shape, bool((z[0] == z[2]).all()), bool((z[2] == z[3]).all())
    (torch.Size([6, 2, 3]), True, False)
    """
    fn = "initial_noise"
    ok = isinstance(shape, (tuple, list, torch.Size)) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
    if not ok:
        raise ValueError(f"{fn}: shape must be a sequence of positive ints (one sample's shape), got {shape!r}")
    groups = _check_int(groups, fn, "groups", 1)
    k = _check_int(k, fn, "k", 1)
    if not isinstance(shared, bool):
        raise TypeError(f"{fn}: shared must be a bool, got {type(shared).__name__}")
    _check_rng(fn, generator, seed)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{fn}: dtype must be a floating-point torch.dtype, got {dtype!r}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else generator
    n = groups if shared else groups * k
    noise = torch.randn((n, *shape), generator=gen, dtype=torch.float32)
    if shared:
        noise = noise.repeat_interleave(k, dim=0)
    return noise.to(device=device, dtype=dtype)


@dataclass
class SdeStep:
    """One recorded stochastic transition x -> x_next of a rollout (all tensors fp32, detached)."""

    index: int  # the step index i (velocity(x, sigma, i) was called with it)
    sigma: float
    sigma_next: float
    x: torch.Tensor
    x_next: torch.Tensor
    log_prob: torch.Tensor  # [B]: the old log-probability
    mean: torch.Tensor
    std: float  # s * sqrt(-dt)
    sde: str
    noise_level: Optional[float]
    sigma_max: float

    def log_prob_of(self, v: torch.Tensor):
        """(log_prob [B], mean, std) of this transition under velocity ``v`` (``sde_log_prob``)."""
        return sde_log_prob(self.x, v, self.sigma, self.sigma_next, self.x_next, sde=self.sde, noise_level=self.noise_level,
                            sigma_max=self.sigma_max)


@dataclass
class Rollout:
    """The result of ``rollout``: the final latent and the SDE transitions in step order."""

    z: torch.Tensor
    sigmas: tuple  # the schedule actually run (the compressed one when ``compress`` was given)
    window: tuple  # the SDE step indices
    steps: list = field(default_factory=list)  # list[SdeStep], one per window step

    @property
    def log_probs(self) -> torch.Tensor:
        """[S, B] old log-probabilities of the S window steps."""
        if not self.steps:
            return torch.zeros(0, self.z.shape[0], device=self.z.device)
        return torch.stack([st.log_prob for st in self.steps])

    def step(self, index: int) -> SdeStep:
        """The record of SDE step ``index``."""
        for st in self.steps:
            if st.index == index:
                return st
        raise KeyError(f"Rollout.step: step {index!r} is not in the SDE window {self.window}")


def _window(window: Iterable[int], n: int, fn: str) -> tuple[int, ...]:
    if isinstance(window, (str, bytes)) or not hasattr(window, "__iter__"):
        raise TypeError(f"{fn}: window must be an iterable of step indices (e.g. WindowSchedule.window(it)), got {type(window).__name__}")
    idx = list(window)
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= n - 2:
            raise ValueError(f"{fn}: window steps must be ints in [0, {n - 2}] (the last of {n} steps, to sigma 0, is never "
                             f"stochastic), got {i!r}")
    if len(set(idx)) != len(idx):
        raise ValueError(f"{fn}: window has repeated steps: {idx}")
    return tuple(sorted(idx))


def rollout(
    velocity: Callable[[torch.Tensor, float, int], torch.Tensor],
    z: torch.Tensor,
    sigmas,
    window: Iterable[int],
    *,
    sde: str = "osp",
    noise_level: Optional[float] = None,
    seed: Optional[int] = None,
    iteration: int = 0,
    generator: Optional[torch.Generator] = None,
    compress: Optional[float] = None,
    shift: Optional[float] = None,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
    batch_offset: int = 0,
    global_batch: Optional[int] = None,
) -> Rollout:
    """Sample from ``z`` (the noise at sigmas[0]) over ``sigmas`` with SDE steps at the ``window`` indices and
    Euler steps elsewhere, recording each SDE transition (docs/rl.md#rollouts).  Runs under ``torch.no_grad``.

    - ``sde`` / ``noise_level``: the SDE formulation (``sde_noise_level``); Flow-GRPO's sigma_max is sigmas[1].
    - Noise: with ``seed``, step i draws from ``step_generator(seed, iteration, i)`` (reproducible per step,
      shared by the ranks of a sequence-parallel group that pass the same seed); with ``generator`` (a CPU
      generator) the steps draw from it in order; with neither, from torch's global generator.
    - ``compress`` (e.g. 0.4 / 0.2, Mix-GRPO-Flash / Flash*): after the last SDE step the rest of the schedule
      is replaced by ``compressed_tail(sigmas, last, compress, shift=shift)`` and integrated with
      DPM-Solver++(2M) (continuing from the last SDE step's data prediction); needs ``shift``, the schedule's
      shift.  Steps before the window are always Euler; an empty window runs plain Euler.
    - ``velocity(z, sigma, i)`` and ``callback(i, z)`` get i = the position in ``Rollout.sigmas``.
    - ``global_batch`` / ``batch_offset``: ``z`` is samples [offset, offset + B) of a global batch (one
      data-parallel replica's share): each SDE step draws the global batch's noise and takes this share, so
      the replicas together sample exactly what one process sampling the whole batch would.
    """
    fn = "rollout"
    s = check_sigmas(sigmas, fn)
    n = len(s) - 1
    if not callable(velocity):
        raise TypeError(f"{fn}: velocity must be callable as velocity(z, sigma, i), got {type(velocity).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"{fn}: callback must be callable as callback(i, z) or None, got {type(callback).__name__}")
    if not isinstance(z, torch.Tensor) or not z.dtype.is_floating_point or z.dim() < 1:
        raise TypeError(f"{fn}: z must be a floating-point tensor with a batch dimension, got "
                        f"{getattr(z, 'dtype', type(z).__name__)} {tuple(getattr(z, 'shape', ()))}")
    sde = _check_sde(sde, fn)
    steps = _window(window, n, fn)
    _check_rng(fn, generator, seed)
    iteration = _check_int(iteration, fn, "iteration", 0)
    batch_offset = _check_int(batch_offset, fn, "batch_offset", 0)
    if global_batch is not None:
        global_batch = _check_int(global_batch, fn, "global_batch", 1)
        if batch_offset + z.shape[0] > global_batch:
            raise ValueError(f"{fn}: batch_offset + batch ({batch_offset} + {z.shape[0]}) exceeds global_batch {global_batch}")
    elif batch_offset:
        raise ValueError(f"{fn}: batch_offset={batch_offset} needs global_batch (the size of the batch it is an offset into)")
    if steps:
        sde_noise_level(sde, s[steps[0]], noise_level=noise_level, sigma_max=s[1])  # validates noise_level early
    if compress is not None:
        check_number(compress, fn, "compress", lo=0, lo_open=True, hi=1)
        if shift is None:
            raise ValueError(f"{fn}: compress={compress} needs shift (the shift of the sigmas schedule, to place the coarse grid)")
        check_number(shift, fn, "shift", lo=0, lo_open=True)
        if s[-1] != 0.0:
            raise ValueError(f"{fn}: compress needs sigmas that end at 0, got {s[-1]}")
    run = compressed_tail(s, steps[-1], compress, shift=shift) if compress is not None and steps else s
    last = steps[-1] if steps else -1
    dpm = compress is not None and bool(steps)
    sigma_max = s[1]
    records: list[SdeStep] = []
    prev_x0 = prev_sigma = None
    in_window = set(steps)
    z = z.float()
    with torch.no_grad():
        for i in range(len(run) - 1):
            sig, nxt = run[i], run[i + 1]
            v = velocity(z, sig, i)
            if not isinstance(v, torch.Tensor) or v.shape != z.shape:
                raise ValueError(f"{fn}: velocity(z, sigma, {i}) must return a tensor of z's shape {tuple(z.shape)}, got "
                                 f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
            v = v.float()
            if i in in_window:
                gen = step_generator(seed, iteration, i) if seed is not None else generator
                level = sde_noise_level(sde, sig, noise_level=noise_level, sigma_max=sigma_max)
                if global_batch is None:
                    x_next, mean, std, lp = sde_step(z, v, sig, nxt, noise_level=level, generator=gen)
                else:  # this share of the global batch's noise
                    _, mean, std, _ = sde_step(z, v, sig, nxt, noise_level=level, prev=z)
                    eps = torch.randn((global_batch, *z.shape[1:]), generator=gen, dtype=torch.float32)
                    x_next = mean + std * eps[batch_offset : batch_offset + z.shape[0]].to(z.device)
                    lp = gaussian_log_prob(x_next, mean, std)
                records.append(SdeStep(i, sig, nxt, z, x_next, lp, mean, std, sde, noise_level, sigma_max))
                if dpm and i == last:
                    prev_x0, prev_sigma = z - sig * v, sig
                z = x_next
            elif dpm and i > last:
                x0 = z - sig * v
                z = dpmpp_2m_step(z, x0, sig, nxt, prev_x0=prev_x0, prev_sigma=prev_sigma)
                prev_x0, prev_sigma = x0, sig
            else:
                z = euler_step(z, v, sig, nxt)
            if callback is not None:
                callback(i, z)
    return Rollout(z=z, sigmas=tuple(run), window=steps, steps=records)
