"""The DiT forward pass as pure functions over a flat parameter dict (spec-dit.md section 2).

Wan2.1 T2V; OSP-Next = the same network with the Skiparse block schedule (``skiparse_model_type="dual_end"``);
FlashI2V = plus the Fourier embedding (here) and the latent shift phi (``flashi2v_shift``, applied by the
caller: the sampler and the loss feed ``z - phi(s)``).

The residual stream is re-laid-out only at block inputs (spec-skiparse-ssp.md section 2):
full -> token: pad + fold; token <-> group: switch; group -> full: unfold + crop.  In the folded layout the
batch axis is (slot, batch) slot-major, so the time modulation and the text keys/values are broadcast over
the P^2 slots instead of being materialised P^2 times (an improvement over the reference; same results).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ospfn.model.config import DiTConfig
from ospfn.ops import (
    apply_rope,
    attention,
    rope_cos_sin,
    skiparse_fold,
    skiparse_key_mask,
    skiparse_positions,
    skiparse_switch,
    skiparse_unfold,
)

__all__ = ["forward", "block_schedule", "flashi2v_shift", "fourier_features", "time_embedding", "DiTRuntime"]


def block_schedule(cfg: DiTConfig) -> list[str]:
    """Layout of every block: "full", "token" or "group" (spec-skiparse-ssp.md section 2).

    >>> block_schedule(DiTConfig.preset("tiny"))
    ['full', 'full', 'token', 'group', 'token', 'group', 'full', 'full']
    """
    L = cfg.num_layers
    if cfg.skiparse_model_type == "full":
        return ["full"] * L
    half = cfg.num_full_blocks // 2
    return ["full" if (i < half or i >= L - half) else ("token" if i % 2 == 0 else "group") for i in range(L)]


# ----------------------------------------------------------------------------------------------------------
# small pieces


def _linear(x: torch.Tensor, params: dict, name: str, quant: Optional[str] = None, amax_group=None, rows=None) -> torch.Tensor:
    w = params[name + ".weight"]
    b = params.get(name + ".bias")
    if quant == "hif8":
        from ospfn.ops import hif8_linear

        if rows is not None:  # Skiparse pad rows must not move the per-tensor amax
            x = x * rows[..., None].to(x.dtype)
        return hif8_linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype), amax_group=amax_group)
    return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def _layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm in fp32 (optionally affine), returned in fp32."""
    return F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), None if bias is None else bias.float(), eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, scaled by ``weight``, returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def _slot_view(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[G*B, L, C] (slot-major) -> [G, B, L, C] (a view)."""
    return x.view(x.shape[0] // batch, batch, *x.shape[1:])


def _modulate(xn: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, batch: int) -> torch.Tensor:
    """xn * (1 + scale) + shift with [B, C] modulation broadcast over the folded slots (fp32)."""
    v = _slot_view(xn, batch)
    return (v * (1 + scale[None, :, None, :]) + shift[None, :, None, :]).view(xn.shape)


def _gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, batch: int) -> torch.Tensor:
    """x + y * gate in fp32, cast back to x's dtype; gate [B, C] broadcast over slots."""
    r = _slot_view(x.float(), batch) + _slot_view(y.float(), batch) * gate[None, :, None, :]
    return r.view(x.shape).to(x.dtype)


def time_embedding(t: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """Sinusoid of the (float) timestep: [cos, sin] halves, omega_i = 10000^(-i/half); fp32 [B, freq_dim].

    Frequencies and arguments are formed in float64 and rounded once to fp32.
    """
    half = freq_dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    arg = t.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).float()


def _hif8_ste(x: torch.Tensor, amax_group=None) -> torch.Tensor:
    from ospfn.model.quant import hif8_fake_quant_ste

    return hif8_fake_quant_ste(x, amax_group=amax_group)


# ----------------------------------------------------------------------------------------------------------
# FlashI2V pieces


def _as_frame(s: torch.Tensor, fn: str) -> torch.Tensor:
    if s.dim() == 5:
        if s.shape[2] != 1:
            raise ValueError(f"{fn}: cond_image_latent must be one frame [B, C, 1, H, W], got {tuple(s.shape)}")
        return s[:, :, 0]
    if s.dim() != 4:
        raise ValueError(f"{fn}: cond_image_latent must have shape [B, C, 1, H, W] or [B, C, H, W], got {tuple(s.shape)}")
    return s


def flashi2v_shift(params: dict, cfg: DiTConfig, s: torch.Tensor) -> torch.Tensor:
    """phi(s): the FlashI2V latent shift, fp32 [B, C, 1, H, W] (broadcasts over the latent frames).

    Conv3d(C -> 4C, k) -> SiLU -> Conv3d(4C -> C, k), k = (1,3,3) (or (3,3,3) with ``conv3x3x3_proj``,
    applied to the single frame with zero temporal padding).  Computed in fp32 (shift precision).
    """
    if cfg.i2v != "flashi2v":
        raise ValueError(f"flashi2v_shift: cfg.i2v must be 'flashi2v', got {cfg.i2v!r}")
    s = _as_frame(s, "flashi2v_shift")[:, :, None].float()
    pad = (1, 1, 1) if cfg.conv3x3x3_proj else (0, 1, 1)
    h = F.conv3d(s, params["learnable_proj.proj.0.weight"].float(), params["learnable_proj.proj.0.bias"].float(), padding=pad)
    h = F.silu(h)
    return F.conv3d(h, params["learnable_proj.proj.2.weight"].float(), params["learnable_proj.proj.2.bias"].float(), padding=pad)


def fourier_features(s: torch.Tensor, ratio) -> torch.Tensor:
    """f_high(s) of spec-flashi2v.md section 1 for a [B, C, 1, H, W] (or [B, C, H, W]) first-frame latent, in fp32
    [B, C, 1, H, W] (the model broadcasts it over the latent frames)."""
    from ospfn.ops import fourier_high_freq

    s = _as_frame(s, "fourier_features")
    return fourier_high_freq(s.float(), ratio)[:, :, None]


# ----------------------------------------------------------------------------------------------------------
# forward


@dataclass
class DiTRuntime:
    """Per-call options that are not model hyper-parameters."""

    attn_backend: Optional[str] = None
    grad_checkpoint: bool = False
    amax_group: object = None  # process group for HiF8 amax all-reduce under sequence parallelism
    parallel: object = None  # ospfn.dist.ParallelState, or None on one process
    layout: str = "full"  # layout of the block being run

    def attend(self, q, k, v, key_mask):
        """Self-attention of the current block: local, or Ulysses over the right group under SP."""
        st = self.parallel
        if st is None:
            return attention(q, k, v, key_mask=key_mask, backend=self.attn_backend)
        from ospfn.dist import ulysses_attention

        group = st.sp_group if self.layout == "full" else st.ulysses_group
        return ulysses_attention(q, k, v, group=group, key_mask=key_mask, backend=self.attn_backend)


def _self_attention(x, params, cfg, p, rope, mask, batch, rt: DiTRuntime, rows=None):
    n_h, d = cfg.num_heads, cfg.head_dim
    lin = lambda t, name: _linear(t, params, p + name, cfg.quant, rt.amax_group, rows)  # noqa: E731
    q = _rms_norm(lin(x, "self_attn.q"), params[p + "self_attn.norm_q.weight"], cfg.eps)
    k = _rms_norm(lin(x, "self_attn.k"), params[p + "self_attn.norm_k.weight"], cfg.eps)
    v = lin(x, "self_attn.v")
    q, k, v = (t.view(t.shape[0], t.shape[1], n_h, d) for t in (q, k, v))
    cos, sin = rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cfg.quant_attn == "hif8":
        if rows is not None:  # pad rows out of the amax (they are masked keys and cropped queries anyway)
            keep = rows[:, :, None, None].to(q.dtype)
            q, k, v = q * keep, k * keep, v * keep
        q, k, v = (_hif8_ste(z, rt.amax_group) for z in (q, k, v))
    o = rt.attend(q, k, v, mask)
    return lin(o.reshape(o.shape[0], o.shape[1], cfg.dim), "self_attn.o")


def _cross_attention(x, ctx, params, cfg, p, batch, rt: DiTRuntime, rows=None):
    n_h, d = cfg.num_heads, cfg.head_dim
    q = _rms_norm(_linear(x, params, p + "cross_attn.q", cfg.quant, rt.amax_group, rows), params[p + "cross_attn.norm_q.weight"], cfg.eps)
    k = _linear(ctx, params, p + "cross_attn.k", cfg.quant, rt.amax_group)
    v = _linear(ctx, params, p + "cross_attn.v", cfg.quant, rt.amax_group)
    if cfg.quant == "hif8" and rt.parallel is not None and rt.parallel.sp_size > 1:
        # text K/V are replicated over the SP group but each rank's gradient covers its own queries only;
        # the HiF8 backward quantises that gradient, so it must see the whole of it (see replicated_grad)
        from ospfn.dist.comm import replicated_grad

        k, v = replicated_grad(k, rt.parallel.sp_group), replicated_grad(v, rt.parallel.sp_group)
    k = _rms_norm(k, params[p + "cross_attn.norm_k.weight"], cfg.eps)
    G = x.shape[0] // batch
    # text K/V are computed once per sample and tiled over the folded slots (slot-major batch)
    k = k.view(batch, -1, n_h, d).repeat(G, 1, 1, 1)
    v = v.view(batch, -1, n_h, d).repeat(G, 1, 1, 1)
    o = attention(q.view(q.shape[0], q.shape[1], n_h, d), k, v, backend=rt.attn_backend)
    return _linear(o.reshape(o.shape[0], o.shape[1], cfg.dim), params, p + "cross_attn.o", cfg.quant, rt.amax_group, rows)


def _block(x, e0, ctx, params, cfg, i, rope, mask, batch, rt: DiTRuntime, rows="same"):
    """One DiT block.  ``mask``: key-padding mask of self-attention; ``rows``: which local rows are real
    tokens (the same as ``mask`` on one process; the local part of it under sequence parallelism)."""
    p = f"blocks.{i}."
    rows = mask if isinstance(rows, str) else rows
    mod = (params[p + "modulation"].float() + e0).unbind(1)  # 6 x [B, C] fp32
    sh1, sc1, g1, sh2, sc2, g2 = mod
    h = _modulate(_layer_norm(x, cfg.eps), sh1, sc1, batch).to(x.dtype)
    x = _gated_residual(x, _self_attention(h, params, cfg, p, rope, mask, batch, rt, rows), g1, batch)
    h = _layer_norm(x, cfg.eps, params[p + "norm3.weight"], params[p + "norm3.bias"]).to(x.dtype)
    x = x + _cross_attention(h, ctx, params, cfg, p, batch, rt, rows)
    h = _modulate(_layer_norm(x, cfg.eps), sh2, sc2, batch).to(x.dtype)
    f = _linear(h, params, p + "ffn.0", cfg.quant, rt.amax_group, rows)
    f = _linear(F.gelu(f, approximate="tanh"), params, p + "ffn.2", cfg.quant, rt.amax_group, rows)
    return _gated_residual(x, f, g2, batch)


def _check_inputs(params, cfg, x, t, context):
    fn = "forward"
    if not isinstance(cfg, DiTConfig):
        raise TypeError(f"{fn}: cfg must be a DiTConfig, got {type(cfg).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        raise ValueError(f"{fn}: x must be latents [B, in_dim, T, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    B, C, T, H, W = x.shape
    if C != cfg.in_dim:
        raise ValueError(f"{fn}: x has {C} channels but cfg.in_dim = {cfg.in_dim}")
    pt, ph, pw = cfg.patch_size
    if T % pt or H % ph or W % pw:
        raise ValueError(f"{fn}: latent size (T, H, W) = {(T, H, W)} must be divisible by patch_size {cfg.patch_size}")
    if not isinstance(t, torch.Tensor) or t.shape != (B,):
        raise ValueError(f"{fn}: t must be a tensor of shape [{B}] (1000 * sigma), got {getattr(t, 'shape', t)!r}")
    if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[0] != B or context.shape[2] != cfg.text_dim:
        raise ValueError(f"{fn}: context must be [{B}, L, text_dim={cfg.text_dim}], got {getattr(context, 'shape', context)!r}")
    if "patch_embedding.weight" not in params:
        raise KeyError(f"{fn}: params lacks 'patch_embedding.weight' (use init_params or load_checkpoint)")


def forward(
    params: dict[str, torch.Tensor],
    cfg: DiTConfig,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    *,
    cond_image_latent: Optional[torch.Tensor] = None,
    fourier_ratio=None,
    fourier_feats: Optional[torch.Tensor] = None,
    attn_backend: Optional[str] = None,
    grad_checkpoint: bool = False,
    amax_group=None,
    block_hook: Optional[Callable[[int, str, torch.Tensor], None]] = None,
    block_fn: Optional[Callable] = None,
    parallel=None,
    shift_cond: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Predicted velocity, fp32 [B, out_dim, T, H, W].

    x: latents [B, in_dim, T, H, W] (for FlashI2V already shifted: ``z - flashi2v_shift(...)``); t: [B] float
    timesteps (1000 * sigma); context: [B, L, text_dim] text features (zero-padded, no mask).
    FlashI2V (``cfg.i2v == "flashi2v"``): give either ``cond_image_latent`` s [B, C, 1, H, W] with
    ``fourier_ratio`` (float or [B]) or precomputed ``fourier_feats`` = ``fourier_features(s, ratio)``.
    ``attn_backend`` selects the attention backend; ``grad_checkpoint`` recomputes each block in backward;
    ``amax_group`` is passed to HiF8 linears; ``block_hook(i, layout, x)`` sees the stream after each block.
    ``block_fn(i, x, *block_args)`` replaces the block call (the ``ospfn.nn`` module shells route blocks
    through their submodules this way, for FSDP2 / activation checkpointing wrappers).
    ``shift_cond`` (FlashI2V): subtract ``flashi2v_shift(params, cfg, shift_cond)`` from x first, so phi is
    evaluated inside the call (needed where parameters are only materialised during a module's forward,
    e.g. under FSDP2); ``x - flashi2v_shift(...)`` passed directly is the same computation.
    ``parallel`` (``ospfn.dist.ParallelState``) runs the model sequence-parallel over the state's SP group:
    every rank gets the same inputs and returns the full output; Skiparse blocks keep whole sub-sequences
    per rank (one all-to-all per layout change), full blocks use Ulysses.  Gradients of the (replicated)
    parameters are then partial per rank: sum them over the SP group (``ospfn.dist.sum_sp_grads``).
    """
    _check_inputs(params, cfg, x, t, context)
    if parallel is not None and parallel.sp_size > 1 and cfg.quant == "hif8" and amax_group is None:
        amax_group = parallel.sp_group  # SP ranks must quantise with one amax
    rt = DiTRuntime(attn_backend=attn_backend, grad_checkpoint=grad_checkpoint, amax_group=amax_group, parallel=parallel)
    B = x.shape[0]
    pt, ph, pw = cfg.patch_size
    grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
    wdtype = params["patch_embedding.weight"].dtype
    if shift_cond is not None:
        x = x - flashi2v_shift(params, cfg, shift_cond)

    # patchify (+ FlashI2V Fourier embedding, identical on every frame: computed once, broadcast over T)
    h = F.conv3d(x.to(wdtype), params["patch_embedding.weight"], params["patch_embedding.bias"], stride=cfg.patch_size)
    if cfg.i2v == "flashi2v":
        if fourier_feats is None:
            if cond_image_latent is None or fourier_ratio is None:
                raise ValueError("forward: a FlashI2V model needs cond_image_latent and fourier_ratio (or fourier_feats)")
            fourier_feats = fourier_features(cond_image_latent, fourier_ratio)
        f = _as_frame(fourier_feats, "forward")[:, :, None].to(wdtype)
        if f.shape[0] != B or f.shape[1] != cfg.in_dim or f.shape[3:] != x.shape[3:]:
            raise ValueError(f"forward: Fourier features {tuple(f.shape)} do not match the latents {tuple(x.shape)}")
        if pt != 1:  # a temporal patch needs the frames themselves; with pt = 1 one frame suffices
            f = f.expand(-1, -1, x.shape[2], -1, -1)
        f = F.conv3d(f, params["fourier_embedding.0.weight"], params["fourier_embedding.0.bias"], stride=cfg.patch_size)
        f = F.conv3d(f, params["fourier_embedding.1.weight"], params["fourier_embedding.1.bias"])
        h = h + f
    x_tok = h.flatten(2).transpose(1, 2)  # [B, N, dim] raster order (t, h, w)

    # time (fp32) and text
    e = F.linear(time_embedding(t, cfg.freq_dim), params["time_embedding.0.weight"].float(), params["time_embedding.0.bias"].float())
    e = F.linear(F.silu(e), params["time_embedding.2.weight"].float(), params["time_embedding.2.bias"].float())
    e0 = F.linear(F.silu(e), params["time_projection.1.weight"].float(), params["time_projection.1.bias"].float()).unflatten(1, (6, cfg.dim))
    ctx = F.linear(context.to(wdtype), params["text_embedding.0.weight"], params["text_embedding.0.bias"])
    ctx = F.linear(F.gelu(ctx, approximate="tanh"), params["text_embedding.2.weight"], params["text_embedding.2.bias"])

    # per-layout RoPE tables and key masks, built once
    P = cfg.sparse_ratio
    schedule = block_schedule(cfg)
    if parallel is not None and parallel.sp_size > 1:
        return _forward_parallel(x_tok, e, e0, ctx, params, cfg, grid, schedule, B, rt, block_fn, block_hook)
    ropes, masks = {}, {}
    for layout in set(schedule):
        if layout == "full":
            pos = skiparse_positions(grid, 1, None, device=x.device)
            masks[layout] = None
        else:
            pos = skiparse_positions(grid, P, layout, device=x.device)
            masks[layout] = skiparse_key_mask(grid, P, layout, B, device=x.device)
        ropes[layout] = rope_cos_sin(pos, cfg.head_dim, theta=cfg.rope_theta)

    cur = "full"
    for i, layout in enumerate(schedule):
        x_tok = _relayout(x_tok, grid, P, cur, layout)
        cur = layout
        rt.layout = layout
        x_tok = _run_block(x_tok, (e0, ctx, params, cfg, i, ropes[layout], masks[layout], B, rt), i, block_fn, grad_checkpoint)
        if block_hook is not None:
            block_hook(i, layout, x_tok)
    x_tok = _relayout(x_tok, grid, P, cur, "full")
    return _head(x_tok, e, params, cfg, grid, B)


def _run_block(x_tok, args, i, block_fn, grad_checkpoint):
    if block_fn is not None:
        # a module block uses its own parameters: do not hand it the model's dict (under FSDP2 that dict
        # holds other units' sharded parameters, which must not become inputs of this unit)
        args = args[:2] + (None,) + args[3:]
    run = _block if block_fn is None else (lambda x_, *a, _i=i: block_fn(_i, x_, *a))
    if grad_checkpoint and torch.is_grad_enabled():
        return checkpoint(run, x_tok, *args, use_reentrant=False)
    return run(x_tok, *args)


def _head_tokens(x_tok, e, params, cfg):
    """Per-token head output [B, n, out_dim * prod(patch)] (modulated LayerNorm + Linear)."""
    shift, scale = (params["head.modulation"].float() + e[:, None]).unbind(1)
    h = (_layer_norm(x_tok, cfg.eps) * (1 + scale[:, None]) + shift[:, None]).to(x_tok.dtype)
    return _linear(h, params, "head.head")


def _unpatchify(out, cfg, grid, B):
    pt, ph, pw = cfg.patch_size
    T_, H_, W_ = grid
    out = out.view(B, T_, H_, W_, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, cfg.out_dim, T_ * pt, H_ * ph, W_ * pw).float()


def _head(x_tok, e, params, cfg, grid, B):
    return _unpatchify(_head_tokens(x_tok, e, params, cfg), cfg, grid, B)


def _forward_parallel(x_tok, e, e0, ctx, params, cfg, grid, schedule, B, rt, block_fn, block_hook):
    """The block loop on one rank of the SP group (inputs replicated, output gathered)."""
    from ospfn.dist import all_gather_seq, check_model_parallel, comm_tag, local_rows_of, relayout

    st = rt.parallel
    check_model_parallel(cfg, st, grid)
    P = cfg.sparse_ratio
    dev = x_tok.device
    ropes, masks, rows = {}, {}, {}
    for layout in set(schedule):
        if layout == "full":
            pos = local_rows_of(skiparse_positions(grid, 1, None, device=dev)[0], grid, P, "full", st)[None]
            masks[layout] = rows[layout] = None
        else:
            pos = local_rows_of(skiparse_positions(grid, P, layout, device=dev), grid, P, layout, st)
            full_mask = skiparse_key_mask(grid, P, layout, B, device=dev)
            if full_mask is None:
                masks[layout] = rows[layout] = None
            else:
                G = P * P // st.S
                keys = full_mask[st.s_rank * G * B : (st.s_rank + 1) * G * B]  # local slots, whole sub-sequences
                L = keys.shape[1] // st.U
                masks[layout] = keys
                rows[layout] = keys[:, st.u_rank * L : (st.u_rank + 1) * L]
        ropes[layout] = rope_cos_sin(pos, cfg.head_dim, theta=cfg.rope_theta)
    n_local = x_tok.shape[1] // st.sp_size
    x_loc = x_tok[:, st.sp_rank * n_local : (st.sp_rank + 1) * n_local]
    cur = "full"
    for i, layout in enumerate(schedule):
        with comm_tag(f"block{i}:{layout}"):
            x_loc = relayout(x_loc, grid, P, cur, layout, st, batch=B)
            cur = layout
            rt.layout = layout
            args = (e0, ctx, params, cfg, i, ropes[layout], masks[layout], B, rt, rows[layout])
            x_loc = _run_block(x_loc, args, i, block_fn, rt.grad_checkpoint)
        if block_hook is not None:
            block_hook(i, layout, x_loc)
    with comm_tag("head"):
        x_loc = relayout(x_loc, grid, P, cur, "full", st, batch=B)
        out = all_gather_seq(_head_tokens(x_loc, e, params, cfg), 1, st.sp_group)  # head on local tokens only
    return _unpatchify(out, cfg, grid, B)


def _relayout(x: torch.Tensor, grid, P: int, src: str, dst: str) -> torch.Tensor:
    if src == dst:
        return x
    if src == "full":
        return skiparse_fold(x, grid, P, dst)
    if dst == "full":
        return skiparse_unfold(x, grid, P, src)
    return skiparse_switch(x, grid, P)
