"""The flow-matching training objective for T2V and FlashI2V (docs/flashi2v.md#training-objective, docs/training.md#flow-matching-loss)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ospfn.sched.flow import dynamic_shift, training_sigmas

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
    never dropped.  All randomness comes from ``generator`` (CPU), so a run is reproducible.

    Data parallel: with ``global_batch`` = the batch over all ranks and ``batch_offset`` = this rank's first
    sample, the randomness is drawn for the whole global batch and sliced, so N ranks compute exactly the
    per-sample terms one process computes for the concatenated batch.  phi(s) is evaluated inside the
    model call (``ImageCond(apply_shift=True)``), which keeps it under an FSDP module's forward.
    ``run`` (``ospfn.model.RunOptions``) is passed to the model call; ``forward_fn`` (default
    ``ospfn.model.forward``) is called as ``forward_fn(params, cfg, x_t, t, context, image=..., run=run)``.
    """
    from ospfn.model import ImageCond, flashi2v_shift, forward, fourier_features

    fwd = forward_fn or forward
    B = z0.shape[0]
    GB = B if global_batch is None else int(global_batch)
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
        if empty_context is None:
            raise ValueError("flow_matching_loss: text_drop > 0 needs empty_context (the encoding of the empty prompt)")
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
        lo, hi = ratio_range
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
