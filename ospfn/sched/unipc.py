"""UniPC sampling for flow-matching models, driven by ospfn's loop over diffusers' scheduler
(docs/real_stack.md#sampling).

The solver itself is diffusers' ``UniPCMultistepScheduler`` in flow-prediction mode (the scheduler Wan2.1 and
diffusers' ``WanPipeline`` ship, "Flow_UniPC" in Wan's code): ospfn does not re-implement it.  ospfn owns the
loop: it builds the scheduler, asks it for the timesteps, calls the model at each of them and hands the
model's velocity back to ``step``, so every ospfn feature that lives in the model call (CFG batching, the
FlashI2V unshifted state, TeaCache, Skiparse, sequence parallelism) works with UniPC as with Euler.

Conventions are those of the scheduler: the model sees ``t = scheduler.timesteps[i]`` (integers in
[0, 1000), the scheduler's own rounding of ``1000 * sigma``) and predicts the velocity ``eps - x0``; the state
stays in fp32.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ospfn.sched.flow import MAX_STEPS, check_number

__all__ = ["unipc_scheduler", "unipc_schedule", "unipc_sample"]


def _scheduler_class():
    try:
        from diffusers import UniPCMultistepScheduler
    except ImportError as e:  # pragma: no cover - diffusers is a dependency of the real stack
        raise ImportError("ospfn.sched.unipc: the UniPC sampler is diffusers' UniPCMultistepScheduler; "
                          "pip install diffusers (or use scheduler='euler')") from e  # fmt: skip
    return UniPCMultistepScheduler


def _check_steps(steps, fn: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"{fn}: steps must be an int in [1, {MAX_STEPS}], got {type(steps).__name__}")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{fn}: steps must be an int in [1, {MAX_STEPS}], got {steps}")
    return steps


def unipc_scheduler(shift: float = 3.0, **config):
    """A fresh diffusers ``UniPCMultistepScheduler`` configured as Wan2.1's: ``prediction_type="flow_prediction"``,
    ``use_flow_sigmas=True``, ``flow_shift=shift`` (3.0 for Wan at 480p, 5.0 at 720p), the library's defaults
    otherwise (order 2, ``bh2``, final sigma 0); ``config`` overrides other scheduler arguments.

    A scheduler keeps the history of a run (it is multistep): use a new one for every video.
    """
    shift = check_number(shift, "unipc_scheduler", "shift", lo=0, lo_open=True)
    fixed = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}
    clash = sorted(k for k in config if k in fixed or k == "flow_shift")
    if clash:
        raise ValueError(f"unipc_scheduler: {clash} are fixed by the flow-matching setup (flow prediction, flow sigmas, "
                         "flow_shift=shift); pass shift= instead")  # fmt: skip
    return _scheduler_class()(**fixed, flow_shift=shift, **config)


def unipc_schedule(steps: int, shift: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [steps] int64, sigmas [steps + 1] float32) of UniPC with ``steps`` and ``shift``: the values the
    model sees and the noise levels the solver steps through (the first is 1 - 1e-6, the last 0)."""
    sched = unipc_scheduler(shift)
    sched.set_timesteps(_check_steps(steps, "unipc_schedule"))
    return sched.timesteps.clone(), sched.sigmas.clone()


def unipc_sample(
    model: Callable[[torch.Tensor, float, int], torch.Tensor],
    z: torch.Tensor,
    *,
    steps: int,
    shift: float = 3.0,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Integrate from noise ``z`` [B, C, ...] (sigma = 1) to a clean sample with UniPC: for each of the scheduler's
    timesteps ``t``, ``v = model(z, t, i)`` (``t`` a float, the scheduler's timestep; ``v`` the velocity,
    shaped like ``z``), then ``z = scheduler.step(v, t, z)``.  Returns the fp32 state after the last step;
    ``callback(i, z)`` sees it after every step.

    ``steps``: an int in [1, MAX_STEPS]; ``shift``: finite and > 0 (the scheduler's ``flow_shift``).
    """
    fn = "unipc_sample"
    steps = _check_steps(steps, fn)
    shift = check_number(shift, fn, "shift", lo=0, lo_open=True)
    if not callable(model):
        raise TypeError(f"{fn}: model must be callable as model(z, t, i), got {type(model).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"{fn}: callback must be callable as callback(i, z) or None, got {type(callback).__name__}")
    if not isinstance(z, torch.Tensor) or not z.dtype.is_floating_point:
        raise TypeError(f"{fn}: z must be a floating-point tensor [B, ...], got {getattr(z, 'dtype', type(z).__name__)}")
    if z.dim() < 2:
        raise ValueError(f"{fn}: z must have a batch dim and at least one more ([B, C, ...], the scheduler's layout), got {tuple(z.shape)}")
    sched = unipc_scheduler(shift)
    sched.set_timesteps(steps, device=z.device)
    sched.set_begin_index(0)
    z = z.float()
    for i, t in enumerate(sched.timesteps):
        v = model(z, float(t), i)
        if not isinstance(v, torch.Tensor) or v.shape != z.shape:
            raise ValueError(f"{fn}: the model must return a tensor shaped like z {tuple(z.shape)}, got "
                             f"{getattr(v, 'shape', type(v).__name__)} at step {i}")  # fmt: skip
        z = sched.step(v.float(), t, z, return_dict=False)[0].float()
        if callback is not None:
            callback(i, z)
    return z
