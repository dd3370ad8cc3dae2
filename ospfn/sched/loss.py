"""The flow-matching training objective for T2V and FlashI2V (docs/flashi2v.md#training-objective, docs/training.md#flow-matching-loss)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ospfn.sched.flow import check_number, dynamic_shift, training_sigmas

__all__ = ["flow_matching_loss"]


def flow_matching_loss(
    params: dict,
    cfg,
    z0: torch.Tensor,
    context: torch.Tensor,
    *,
    generator: torch.Generator,
    empty_context: Optional[torch.Tensor] = None,
    text_drop: float = 0.1,
    cond_image_latent: Optional[torch.Tensor] = None,
    ratio_range: tuple[float, float] = (0.05, 0.95),
    shift="dynamic",
    logit_normal: bool = True,
    forward_fn: Optional[Callable] = None,
    return_parts: bool = False,
    global_batch: Optional[int] = None,
    batch_offset: int = 0,
    run=None,
):
    """Mean MSE between the predicted velocity and v = eps - z0.

    T2V: x_t = sigma eps + (1 - sigma) z0.  FlashI2V (``cfg.i2v == "flashi2v"``): with p = phi(s),
    x_t = sigma eps + (1 - sigma) z0 - p (both endpoints shifted; the target is unchanged), Fourier features
    with a per-sample ratio rho ~ U(ratio_range).  Per-sample sigma: logit-normal (or uniform) then
    ``shift`` ("dynamic" = from the latent size, a number = fixed, None = none).  Text is replaced by
    ``empty_context`` (the empty prompt's encoding, not zeros) with probability ``text_drop``; the image is
    never dropped.  All randomness comes from ``generator`` (CPU), so a run is reproducible.  Arguments are
    checked before any work: ``text_drop`` in [0, 1] (> 0 needs ``empty_context``), ``ratio_range`` a pair
    0 <= lo <= hi <= 1, a numeric ``shift`` finite and > 0.

    Data parallel: with ``global_batch`` = the batch over all ranks and ``batch_offset`` = this rank's first
    sample, the randomness is drawn for the whole global batch and sliced, so N ranks compute exactly the
    per-sample terms one process computes for the concatenated batch.  phi(s) is evaluated inside the
    model call (``ImageCond(apply_shift=True)``), which keeps it under an FSDP module's forward.
    ``run`` (``ospfn.model.RunOptions``) is passed to the model call; ``forward_fn`` (default
    ``ospfn.model.forward``) is called as ``forward_fn(params, cfg, x_t, t, context, image=..., run=run)``.
    """
    from ospfn.model import DiTConfig, ImageCond, flashi2v_shift, forward, fourier_features

    fn = "flow_matching_loss"
    if not isinstance(cfg, DiTConfig):
        raise TypeError(f"{fn}: cfg must be a DiTConfig, got {type(cfg).__name__}")
    if not isinstance(z0, torch.Tensor) or not z0.dtype.is_floating_point:
        raise TypeError(f"{fn}: z0 must be a floating-point tensor of clean latents [B, C, T, H, W], got "
                        f"{getattr(z0, 'dtype', type(z0).__name__)}")  # fmt: skip
    if z0.dim() != 5 or z0.shape[0] < 1:
        raise ValueError(f"{fn}: z0 must be clean latents [B, C, T, H, W] with B >= 1, got shape {tuple(z0.shape)}")
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"{fn}: context must be a tensor [B, L, text_dim], got {type(context).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator (CPU; all the loss's randomness comes from it), "
                        f"got {type(generator).__name__}")  # fmt: skip
    text_drop = check_number(text_drop, fn, "text_drop", lo=0, hi=1)
    if text_drop > 0 and empty_context is None:
        raise ValueError(f"{fn}: text_drop > 0 (got {text_drop}) needs empty_context (the encoding of the empty prompt)")
    if empty_context is not None and not isinstance(empty_context, torch.Tensor):
        raise TypeError(f"{fn}: empty_context must be a tensor [1, L, text_dim] or None, got {type(empty_context).__name__}")
    if not isinstance(ratio_range, (tuple, list)) or len(ratio_range) != 2:
        raise ValueError(f"{fn}: ratio_range must be a pair (lo, hi) with 0 <= lo <= hi <= 1, got {ratio_range!r}")
    lo = check_number(ratio_range[0], fn, "ratio_range[0]", lo=0, hi=1)
    hi = check_number(ratio_range[1], fn, "ratio_range[1]", lo=0, hi=1)
    if lo > hi:
        raise ValueError(f"{fn}: ratio_range must be a pair (lo, hi) with 0 <= lo <= hi <= 1, got {tuple(ratio_range)!r}")
    if shift is not None and shift != "dynamic":
        check_number(shift, fn, "shift (a number, 'dynamic' or None)", lo=0, lo_open=True)
    if not isinstance(logit_normal, bool):
        raise TypeError(f"{fn}: logit_normal must be a bool, got {type(logit_normal).__name__}")
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"{fn}: forward_fn must be callable like ospfn.model.forward or None, got {type(forward_fn).__name__}")
    fwd = forward if forward_fn is None else forward_fn
    B = z0.shape[0]
    for arg, v in (("global_batch", global_batch), ("batch_offset", batch_offset)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{fn}: {arg} must be an int, got {type(v).__name__}")
    GB = B if global_batch is None else global_batch
    if GB < B:
        raise ValueError(f"{fn}: global_batch ({GB}) must be >= this rank's batch ({B})")
    if not 0 <= batch_offset <= GB - B:
        raise ValueError(f"flow_matching_loss: batch_offset {batch_offset} + batch {B} exceeds global_batch {GB}")
    sl = slice(batch_offset, batch_offset + B)
    dev = z0.device
    z0 = z0.float()
    if shift == "dynamic":
        s_val = dynamic_shift(z0.shape[-2:], cfg.patch_size[1:])
    else:
        s_val = shift
    sigma = training_sigmas(GB, generator=generator, logit_normal=logit_normal, shift=s_val)[sl].to(dev)
    eps = torch.randn((GB, *z0.shape[1:]), generator=generator, dtype=torch.float32)[sl].to(dev)
    drop = (torch.rand(GB, generator=generator) < text_drop)[sl]
    if drop.any():
        from ospfn.sched.sampling import pad_context

        ctx, empty = pad_context(context, empty_context.expand(B, -1, -1))
        context = torch.where(drop.to(dev)[:, None, None], empty.to(ctx.dtype), ctx)
    sig = sigma.view(B, *([1] * (z0.dim() - 1)))
    x_t = sig * eps + (1 - sig) * z0
    target = eps - z0
    rho = None
    image = None
    if cfg.i2v == "flashi2v":
        if cond_image_latent is None:
            raise ValueError("flow_matching_loss: a FlashI2V model needs cond_image_latent (the first-frame latent)")
        rho = (lo + (hi - lo) * torch.rand(GB, generator=generator, dtype=torch.float32))[sl].to(dev)
        # x_t - phi(s) inside the call: phi is trained through the input only
        image = ImageCond(latent=cond_image_latent, fourier_feats=fourier_features(cond_image_latent, rho), apply_shift=True)
    v_pred = fwd(params, cfg, x_t, 1000.0 * sigma, context, image=image, run=run)
    loss = (v_pred.float() - target).pow(2).mean()
    if return_parts:
        if cfg.i2v == "flashi2v":
            with torch.no_grad():
                x_t = x_t - flashi2v_shift(params, cfg, cond_image_latent)
        return loss, {"sigma": sigma, "eps": eps, "x_t": x_t, "target": target, "rho": rho, "drop": drop, "v_pred": v_pred}
    return loss
