"""Sampling T2V and FlashI2V (I2V) videos with the functional DiT (docs/flashi2v.md#sampling,
docs/real_stack.md#sampling).

FlashI2V keeps the UNSHIFTED fp32 state z (z = eps at sigma = 1) and feeds z - phi(s) to the model; phi(s)
and the Fourier features f_high(s) are computed once per sample and shared by every step and both CFG
branches (only the text is swapped).  T2V is the same loop without the image condition.  Two solvers drive
the same model call: Euler (ospfn's, on a shifted linspace or an explicit sigma schedule) and UniPC
(diffusers' scheduler, ``ospfn.sched.unipc``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ospfn.sched.flow import MAX_STEPS, cfg_combine, check_number, check_sigmas, euler_sample, inference_sigmas

__all__ = ["sample", "pad_context", "image_condition", "SCHEDULERS"]

SCHEDULERS = ("euler", "unipc")  # the solvers ``sample`` and ``Pipeline.generate`` drive


def pad_context(*ctxs: torch.Tensor) -> list[torch.Tensor]:
    """Zero-pad text features [B, L_i, D] to a common length (Wan uses zero padding, no text mask)."""
    for i, c in enumerate(ctxs):
        if not isinstance(c, torch.Tensor):
            raise TypeError(f"pad_context: argument {i} must be a tensor [B, L, D], got {type(c).__name__}")
        if c.dim() != 3 or c.shape[2] != ctxs[0].shape[-1]:
            raise ValueError(f"pad_context: every context must be [B, L, D] with one D, got shapes {[tuple(c.shape) for c in ctxs]}")
    if not ctxs:
        return []
    L = max(c.shape[1] for c in ctxs)
    return [F.pad(c, (0, 0, 0, L - c.shape[1])) for c in ctxs]


@torch.no_grad()
def image_condition(params, cfg, cond_image_latent: torch.Tensor, fourier_ratio=0.1):
    """(phi(s), f_high(s)) for a FlashI2V model: the latent shift [B, C, 1, h, w] (fp32) and the Fourier
    features [B, C, 1, h, w]; computed once per sample."""
    from ospfn.model import flashi2v_shift, fourier_features

    return flashi2v_shift(params, cfg, cond_image_latent), fourier_features(cond_image_latent, fourier_ratio)


@torch.no_grad()
def sample(
    params: dict,
    cfg,
    *,
    noise: torch.Tensor,
    context: torch.Tensor,
    neg_context: Optional[torch.Tensor] = None,
    guidance: float = 5.0,
    steps: int = 50,
    shift: float = 7.0,
    cond_image_latent: Optional[torch.Tensor] = None,
    fourier_ratio=0.1,
    run=None,
    forward_fn: Optional[Callable] = None,
    callback: Optional[Callable[[int, torch.Tensor], None]] = None,
    sigmas: Optional[torch.Tensor] = None,
    scheduler: str = "euler",
) -> torch.Tensor:
    """Clean latents (fp32, shape of ``noise``) by an ODE solve from sigma = 1 to 0 with classifier-free guidance.

    ``scheduler``: ``"euler"`` (ospfn's Euler on ``inference_sigmas(steps, shift)`` or on ``sigmas``; the model
    sees ``t = 1000 * sigma``) or ``"unipc"`` (diffusers' ``UniPCMultistepScheduler`` in flow-prediction mode
    with ``flow_shift=shift`` and ``steps`` steps, driven by this loop; the model sees the scheduler's
    timesteps; ``sigmas`` must be None).

    ``neg_context`` is the unconditional text (the empty or negative prompt's encoding); without it, or with
    ``guidance == 1``, only the conditional branch runs.  For ``cfg.i2v == "flashi2v"`` pass the first-frame
    latent ``cond_image_latent`` [B, C, 1, h, w] (phi(s) and the Fourier features are computed once).
    ``run`` (``ospfn.model.RunOptions``) is passed to every model call.  ``forward_fn`` (default
    ``ospfn.model.forward``) is called as ``forward_fn(params, cfg, x, t, context, image=..., run=run)``.

    Checked before the first step: ``guidance`` finite and >= 0 (0 = the unconditional branch only, 1 = no
    guidance), ``steps`` an int >= 1 and ``shift`` finite and > 0 (both unused when ``sigmas`` is given:
    then ``sigmas`` must be >= 2 finite values in [0, 1], strictly decreasing).
    """
    from ospfn.model import DiTConfig, ImageCond, forward

    fn = "sample"
    if not isinstance(cfg, DiTConfig):
        raise TypeError(f"{fn}: cfg must be a DiTConfig, got {type(cfg).__name__}")
    if not isinstance(noise, torch.Tensor) or not noise.dtype.is_floating_point:
        raise TypeError(f"{fn}: noise must be a floating-point tensor [B, C, T, H, W], got {getattr(noise, 'dtype', type(noise).__name__)}")
    if noise.dim() != 5 or noise.shape[0] < 1:
        raise ValueError(f"{fn}: noise must have shape [B, C, T, H, W] with B >= 1, got {tuple(noise.shape)}")
    for arg, v in (("context", context), ("neg_context", neg_context), ("cond_image_latent", cond_image_latent)):
        if (v is not None or arg == "context") and not isinstance(v, torch.Tensor):
            raise TypeError(f"{fn}: {arg} must be a torch.Tensor, got {type(v).__name__}")
    guidance = check_number(guidance, fn, "guidance (1 = no guidance)", lo=0)
    if not isinstance(scheduler, str) or scheduler not in SCHEDULERS:
        raise ValueError(f"{fn}: scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r:.80}")
    if scheduler == "unipc" and sigmas is not None:
        raise ValueError(f"{fn}: sigmas= is an explicit schedule for the Euler sampler; UniPC builds its own from steps "
                         "and shift (pass scheduler='euler' to use sigmas)")  # fmt: skip
    if sigmas is None:
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"{fn}: steps must be an int in [1, {MAX_STEPS}], got {type(steps).__name__}")
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"{fn}: steps must be an int in [1, {MAX_STEPS}], got {steps}")
        shift = check_number(shift, fn, "shift", lo=0, lo_open=True)
    else:
        check_sigmas(sigmas, fn)
    for arg, v in (("forward_fn", forward_fn), ("callback", callback)):
        if v is not None and not callable(v):
            raise TypeError(f"{fn}: {arg} must be callable or None, got {type(v).__name__}")
    if cfg.i2v != "flashi2v" and cond_image_latent is not None:
        raise ValueError(f"{fn}: cond_image_latent is the FlashI2V first-frame condition, but cfg.i2v = {cfg.i2v!r} takes none")
    fwd = forward if forward_fn is None else forward_fn
    B = noise.shape[0]
    for arg, v in (("context", context), ("neg_context", neg_context)):
        if v is not None and (v.dim() != 3 or v.shape[0] != B):
            raise ValueError(f"{fn}: {arg} must be [B={B}, L, text_dim] like noise's batch, got {tuple(v.shape)}")
    shift_p = feats = None
    if cfg.i2v == "flashi2v":
        if cond_image_latent is None:
            raise ValueError("sample: a FlashI2V model (cfg.i2v='flashi2v') needs cond_image_latent [B, C, 1, h, w]")
        shift_p, feats = image_condition(params, cfg, cond_image_latent, fourier_ratio)
    use_cfg = neg_context is not None and guidance != 1.0
    if use_cfg:
        ctx_u, ctx_c = pad_context(neg_context, context)
        ctx_all = torch.cat([ctx_u, ctx_c])
        feats_all = None if feats is None else torch.cat([feats, feats])
    image = None if feats is None else ImageCond(fourier_feats=feats)
    image_all = None if feats is None or not use_cfg else ImageCond(fourier_feats=feats_all)

    def model(z: torch.Tensor, timestep: float, i: int) -> torch.Tensor:
        """The guided velocity at state z and model timestep ``timestep`` (in [0, 1000]); CFG as one batch of 2B."""
        x = z if shift_p is None else z - shift_p
        t = torch.full((B,), timestep, device=z.device, dtype=torch.float32)
        if not use_cfg:
            return fwd(params, cfg, x, t, context, image=image, run=run)
        v = fwd(params, cfg, torch.cat([x, x]), torch.cat([t, t]), ctx_all, image=image_all, run=run)
        return cfg_combine(v[:B], v[B:], guidance)

    if scheduler == "unipc":
        from ospfn.sched.unipc import unipc_sample

        return unipc_sample(model, noise, steps=steps, shift=shift, callback=callback)
    if sigmas is None:
        sigmas = inference_sigmas(steps, shift)
    return euler_sample(lambda z, sigma, i: model(z, 1000.0 * sigma, i), noise, sigmas, callback=callback)
