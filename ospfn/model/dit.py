"""The DiT forward pass as pure functions over a flat parameter dict (docs/dit.md#forward-pass).

Wan2.1 T2V; OSP-Next = the same network with the Skiparse block schedule (``skiparse_model_type="dual_end"``);
FlashI2V = plus the Fourier embedding (here) and the latent shift phi (``flashi2v_shift``: the sampler
feeds ``z - phi(s)``; the loss asks ``forward`` to subtract it, ``ImageCond(apply_shift=True)``).

``forward(params, cfg, x, t, context, *, image=None, run=None, lora=None)``: what the model sees (latents,
timesteps, context tokens, the FlashI2V first-frame condition ``ImageCond``) is separate from how the call runs
(``RunOptions``: attention backend, checkpointing, the parallel layout, per-block hooks, a sampling cache);
``lora`` names the LoRA adapters of the call (docs/lora.md), None for the base model.

One loop runs the blocks, on one process or many: the single-process model is the sequence-parallel one on a
trivial mesh (``ParallelState.single``).  Each block is ``dit_block(x, params_of_block, bc, lay)`` with a
frozen per-call ``BlockContext`` and the ``LayoutTables`` of its layout; ``forward`` builds both once.
Every block Linear runs through ``_linear`` (the one place a low-rank delta or quantisation applies); the
context tokens are ``bc.text``; the loop is the one place blocks are run, skipped or cached.

The residual stream is re-laid-out only at block inputs (docs/skiparse.md#block-schedule):
full -> token: pad + fold; token <-> group: switch; group -> full: unfold + crop (``ospfn.parallel.relayout``:
local permutations on one process, one all-to-all under SP).  In the folded layout the
batch axis is (slot, batch) slot-major, so the time modulation and the text keys/values are broadcast over
the P^2 slots instead of being materialised P^2 times (an improvement over the reference; same results).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ospfn.model.config import DiTConfig
from ospfn.model.params import expected_shapes
from ospfn.ops import (
    apply_rope,
    attention,
    fourier_high_freq,
    hif8_fake_quant,
    hif8_linear,
    rope_cos_sin,
    skiparse_key_mask,
    skiparse_positions,
)
from ospfn.parallel import ParallelState, all_gather_seq, check_model_parallel, local_rows_of, relayout, replicated_grad, ulysses_attention

__all__ = [
    "forward",
    "ImageCond",
    "RunOptions",
    "dit_block",
    "block_params",
    "block_schedule",
    "layout_tables",
    "BlockContext",
    "LayoutTables",
    "flashi2v_shift",
    "fourier_features",
    "time_embedding",
]


def block_schedule(cfg: DiTConfig) -> list[str]:
    """Layout of every block: "full", "token" or "group" (docs/skiparse.md#block-schedule).

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


def _layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm in fp32 (optionally affine), returned in fp32."""
    return F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(), None if bias is None else bias.float(), eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, scaled by ``weight``, returned in x's dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def _slot_view(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[G*B, L, C] (slot-major) -> [G, B, L, C] (a view)."""
    return x.view(x.shape[0] // batch, batch, *x.shape[1:])


def _modulate(xn: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, batch: int) -> torch.Tensor:
    """xn * (1 + scale) + shift with [B, C] modulation broadcast over the folded slots (fp32)."""
    v = _slot_view(xn, batch)
    return torch.addcmul(shift[None, :, None, :], v, 1 + scale[None, :, None, :]).view(xn.shape)


def _gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, batch: int) -> torch.Tensor:
    """x + y * gate in fp32, cast back to x's dtype; gate [B, C] broadcast over slots."""
    r = torch.addcmul(_slot_view(x.float(), batch), _slot_view(y.float(), batch), gate[None, :, None, :])
    return r.view(x.shape).to(x.dtype)


def time_embedding(t: torch.Tensor, freq_dim: int) -> torch.Tensor:
    """Sinusoid of the (float) timestep: [cos, sin] halves, omega_i = 10000^(-i/half); fp32 [B, freq_dim].

    Frequencies and arguments are formed in float64 and rounded once to fp32.
    """
    half = freq_dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    arg = t.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).float()


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
    """f_high(s) of docs/flashi2v.md#fourier-guidance for a [B, C, 1, H, W] (or [B, C, H, W]) first-frame latent, in fp32
    [B, C, 1, H, W] (the model broadcasts it over the latent frames)."""
    s = _as_frame(s, "fourier_features")
    return fourier_high_freq(s.float(), ratio)[:, :, None]


# ----------------------------------------------------------------------------------------------------------
# the block: one public function over a frozen per-call context and one small per-layout value


@dataclass(frozen=True)
class BlockContext:
    """What every block of one forward call shares (frozen; built once per call by ``forward``).

    ``e0`` [B, 6, dim] fp32 time modulation; ``text`` [B, L, dim] the embedded context tokens (text, and in
    later models extra tokens appended to it); ``batch`` B; ``mesh`` the ``ospfn.parallel.ParallelState``
    (a trivial one on one process); ``amax_group`` the HiF8 amax group (None: local amax).
    """

    cfg: DiTConfig
    batch: int
    e0: torch.Tensor
    text: torch.Tensor
    mesh: ParallelState
    attn_backend: Optional[str] = None
    amax_group: object = None


@dataclass(frozen=True)
class LayoutTables:
    """The per-layout tables of one call: the layout name ("full", "token" or "group"), the RoPE (cos, sin)
    of the local rows, the self-attention key mask (None: no padding; under SP the keys of the local
    sub-sequences, which Ulysses gathers), the local rows that are real tokens (None: all), and the process
    group self-attention runs over (None: local)."""

    name: str
    rope: tuple
    key_mask: Optional[torch.Tensor]
    rows: Optional[torch.Tensor]
    attn_group: object = None


def _linear(x: torch.Tensor, params: dict, name: str, bc: Optional[BlockContext] = None, rows=None) -> torch.Tensor:
    """The one place every block Linear runs: ``x W^T + b`` in x's dtype, or the HiF8 straight-through
    linear (``cfg.quant == "hif8"``) with Skiparse pad rows zeroed so they do not move the amax.

    A LoRA delta applies here when the block's dict carries ``name + ".lora"`` (``forward(..., lora=)`` puts
    it there, docs/lora.md#how-the-delta-reaches-the-linears): per adapter a term ``(A, B, bias, c, w)`` adds
    ``c * (x A^T) B^T + w * bias``, computed in ``promote_types(x.dtype, A.dtype, B.dtype)`` and never
    quantised, then cast to x's dtype and added to the (possibly HiF8) base output.  Without the entry nothing
    else runs."""
    w = params[name + ".weight"]
    b = params.get(name + ".bias")
    b = None if b is None else b.to(x.dtype)
    lora = params.get(name + ".lora")
    if bc is not None and bc.cfg.quant == "hif8":
        if rows is not None:
            x = x * rows[..., None].to(x.dtype)
        y = hif8_linear(x, w.to(x.dtype), b, amax_group=bc.amax_group)
    else:
        y = F.linear(x, w.to(x.dtype), b)
    if lora is not None:
        y = y + _lora_delta(x, lora).to(y.dtype)
    return y


def _lora_delta(x: torch.Tensor, terms) -> torch.Tensor:
    """Sum over the terms ``(A, B, bias, c, w)`` of ``c * (x A^T) B^T (+ w * bias)`` in high precision (the
    promoted dtype of x and the adapter: fp32 for an fp32 adapter); the scale multiplies the rank-r activation."""
    out = None
    for a, b, bias, coef, wb in terms:
        ct = torch.promote_types(torch.promote_types(x.dtype, a.dtype), b.dtype)
        d = F.linear(F.linear(x.to(ct), a.to(ct)) * coef, b.to(ct))
        if bias is not None:
            d = d + bias.to(ct) * wb
        out = d if out is None else out + d
    return out


def _attend(q, k, v, bc: BlockContext, lay: LayoutTables):
    if lay.attn_group is None:
        return attention(q, k, v, key_mask=lay.key_mask, backend=bc.attn_backend)
    return ulysses_attention(q, k, v, group=lay.attn_group, key_mask=lay.key_mask, backend=bc.attn_backend)


def _self_attention(x, p: dict, bc: BlockContext, lay: LayoutTables):
    cfg = bc.cfg
    n_h, d = cfg.num_heads, cfg.head_dim
    q = _rms_norm(_linear(x, p, "self_attn.q", bc, lay.rows), p["self_attn.norm_q.weight"], cfg.eps)
    k = _rms_norm(_linear(x, p, "self_attn.k", bc, lay.rows), p["self_attn.norm_k.weight"], cfg.eps)
    v = _linear(x, p, "self_attn.v", bc, lay.rows)
    q, k, v = (t.view(t.shape[0], t.shape[1], n_h, d) for t in (q, k, v))
    cos, sin = lay.rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cfg.quant_attn == "hif8":
        if lay.rows is not None:  # pad rows out of the amax (they are masked keys and cropped queries anyway)
            keep = lay.rows[:, :, None, None].to(q.dtype)
            q, k, v = q * keep, k * keep, v * keep
        q, k, v = (hif8_fake_quant(z, amax_group=bc.amax_group) for z in (q, k, v))
    o = _attend(q, k, v, bc, lay)
    return _linear(o.reshape(o.shape[0], o.shape[1], cfg.dim), p, "self_attn.o", bc, lay.rows)


def _cross_attention(x, p: dict, bc: BlockContext, lay: LayoutTables):
    cfg = bc.cfg
    n_h, d = cfg.num_heads, cfg.head_dim
    q = _rms_norm(_linear(x, p, "cross_attn.q", bc, lay.rows), p["cross_attn.norm_q.weight"], cfg.eps)
    k = _linear(bc.text, p, "cross_attn.k", bc)
    v = _linear(bc.text, p, "cross_attn.v", bc)
    if cfg.quant == "hif8" and bc.mesh.sp_size > 1:
        # text K/V are replicated over the SP group but each rank's gradient covers its own queries only;
        # the HiF8 backward quantises that gradient, so it must see the whole of it (see replicated_grad)
        k, v = replicated_grad(k, bc.mesh.sp_group), replicated_grad(v, bc.mesh.sp_group)
    k = _rms_norm(k, p["cross_attn.norm_k.weight"], cfg.eps)
    G = x.shape[0] // bc.batch
    # text K/V are computed once per sample and tiled over the folded slots (slot-major batch)
    k, v = k.view(bc.batch, -1, n_h, d), v.view(bc.batch, -1, n_h, d)
    if G > 1:
        k, v = k.repeat(G, 1, 1, 1), v.repeat(G, 1, 1, 1)
    o = attention(q.view(q.shape[0], q.shape[1], n_h, d), k, v, backend=bc.attn_backend)
    return _linear(o.reshape(o.shape[0], o.shape[1], cfg.dim), p, "cross_attn.o", bc, lay.rows)


def dit_block(x: torch.Tensor, params: dict, bc: BlockContext, lay: LayoutTables) -> torch.Tensor:
    """One DiT block on the local stream ``x`` [G*B, n, dim] (G folded slots, slot-major; G = 1 for "full").

    ``params``: this block's parameters under their names inside the block (``"self_attn.q.weight"``, ...,
    see ``block_params``), plus, for a LoRA-adapted Linear, its low-rank terms under ``name + ".lora"`` (see
    ``_linear``); ``bc``: the call's ``BlockContext``; ``lay``: the ``LayoutTables`` of this block's
    layout.  Self-attention (modulated, gated), cross-attention to ``bc.text``, feed-forward (modulated,
    gated); every Linear goes through ``_linear``.
    """
    cfg, batch = bc.cfg, bc.batch
    sh1, sc1, g1, sh2, sc2, g2 = (params["modulation"].float() + bc.e0).unbind(1)  # 6 x [B, C] fp32
    h = _modulate(_layer_norm(x, cfg.eps), sh1, sc1, batch).to(x.dtype)
    x = _gated_residual(x, _self_attention(h, params, bc, lay), g1, batch)
    h = _layer_norm(x, cfg.eps, params["norm3.weight"], params["norm3.bias"]).to(x.dtype)
    x = x + _cross_attention(h, params, bc, lay)
    h = _modulate(_layer_norm(x, cfg.eps), sh2, sc2, batch).to(x.dtype)
    f = _linear(h, params, "ffn.0", bc, lay.rows)
    del h  # free the [n, dim] input and the [n, ffn_dim] pre-activation as soon as they are consumed:
    f = F.gelu(f, approximate="tanh")  # (no grad) the peak is then ffn.0 output + GELU output, not also ffn.2's
    f = _linear(f, params, "ffn.2", bc, lay.rows)
    return _gated_residual(x, f, g2, batch)


def block_params(params: dict, num_layers: int) -> list[dict]:
    """Split a model's parameter dict into one dict per block, keyed by the names inside the block
    (``"blocks.3.ffn.0.weight"`` -> ``block_params(...)[3]["ffn.0.weight"]``); one pass, no copies."""
    out: list[dict] = [{} for _ in range(num_layers)]
    for name, value in params.items():
        if name.startswith("blocks."):
            idx, _, rest = name[7:].partition(".")
            out[int(idx)][rest] = value
    return out


# ----------------------------------------------------------------------------------------------------------
# forward


@dataclass(frozen=True)
class ImageCond:
    """The FlashI2V first-frame condition of one ``forward`` call (``cfg.i2v == "flashi2v"`` only).

    ``latent``: the first-frame latent s [B, C, 1, H, W].  ``fourier_ratio`` (float or [B]) with ``latent``
    gives the Fourier features f_high(s); or pass ``fourier_feats`` = ``fourier_features(s, ratio)``
    precomputed (the sampler computes them once for all steps).  ``apply_shift=True`` subtracts
    ``flashi2v_shift(params, cfg, latent)`` from x inside the call, so phi is evaluated where the parameters
    live (under FSDP2 they are materialised only during the module's forward); ``x - flashi2v_shift(...)``
    passed directly is the same computation.
    """

    latent: Optional[torch.Tensor] = None
    fourier_ratio: object = None
    fourier_feats: Optional[torch.Tensor] = None
    apply_shift: bool = False


@dataclass(frozen=True)
class RunOptions:
    """How one ``forward`` call runs; none of it changes the result beyond floating-point rounding, except a
    ``cache``.

    ``attn_backend``: the attention backend (None: dispatch's default, see ``ospfn.backends``).
    ``grad_checkpoint``: recompute each block in backward.  ``parallel``: an
    ``ospfn.parallel.ParallelState`` to run sequence-parallel over its SP group (every rank gets the same
    inputs and returns the full output; Skiparse blocks keep whole sub-sequences per rank, one all-to-all
    per layout change; full blocks use Ulysses; gradients of the replicated parameters are partial per rank:
    sum them with ``ospfn.parallel.sum_sp_grads``).  ``amax_group``: the process group HiF8 amaxes are
    reduced over (default: the SP group under SP, else local).  ``block_fn(i, x, bc, lay)`` replaces
    ``dit_block(x, block_params[i], bc, lay)`` (the ``ospfn.nn`` module shells route blocks through their
    submodules this way, for FSDP2 / per-block ``torch.compile``).  ``block_hook(i, layout, x)`` sees the
    local stream after each block.  ``cache``: a sampling cache that may skip the whole block stack (below);
    with one the result is the cache's approximation of the uncached forward.

    The ``cache`` protocol (``ospfn.sched.teacache`` implements it; docs/real_stack.md#teacache).  ``forward``
    calls, once per call, in this order:

    * ``cache.before_blocks(x, e, e0)`` before the first block, with the local stream ``x`` [B, n, dim] in
      the "full" layout (under SP this rank's rows), the time embedding ``e`` [B, dim] and the blocks' time
      modulation ``e0`` [B, 6, dim] (both fp32 and replicated over SP ranks).  It returns None (run the
      blocks) or a tensor shaped like ``x``: the stream after the blocks, used in their place (no block runs
      and ``block_hook`` is not called).
    * ``cache.after_blocks(x_in, x_out)`` only when the blocks ran: the local "full"-layout stream before the
      first and after the last block (what the head reads).

    Under sequence parallelism every rank must take the same decision (one rank running the blocks alone
    would hang the collectives): a cache may decide from ``e``, ``e0`` and its own state only, never from
    the local rows of ``x``.  ``cache=None`` (the default) costs nothing and keeps ``forward`` one
    ``torch.compile`` graph; a cache's decision reads a number from the device and breaks the graph.
    """

    attn_backend: Optional[str] = None
    grad_checkpoint: bool = False
    parallel: Optional[ParallelState] = None
    amax_group: object = None
    block_fn: Optional[Callable] = None
    block_hook: Optional[Callable[[int, str, torch.Tensor], None]] = None
    cache: object = None

    def replace(self, **changes) -> "RunOptions":
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def _shape_of(v) -> str:
    return str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__


def _check_params(params, cfg: DiTConfig, device: torch.device, skip_blocks: bool, fn: str) -> None:
    """Every parameter ``cfg`` needs is in ``params`` with its shape and on ``device`` (keys of other models are
    ignored).  Shapes are compared with the cached table of ``expected_shapes``; no tensor data is read."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{fn}: params must be a dict of tensors (from init_params or load_checkpoint), got {type(params).__name__}")
    expected = expected_shapes(cfg)
    bad = [k for k, shape in expected.items()
           if not (skip_blocks and k.startswith("blocks."))
           and not (isinstance(v := params.get(k), torch.Tensor) and v.shape == shape and v.device == device)]  # fmt: skip
    if not bad:
        return
    missing = [k for k in bad if k not in params]
    misshaped = [f"{k}: got {_shape_of(params[k])}, expected {expected[k]}" for k in bad
                 if k in params and not (isinstance(params[k], torch.Tensor) and params[k].shape == expected[k])]  # fmt: skip
    if missing or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:30]}{' ...' if len(missing) > 30 else ''}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {misshaped[:30]}{' ...' if len(misshaped) > 30 else ''}")
        raise ValueError(f"{fn}: params do not match cfg (DiTConfig(dim={cfg.dim}, num_layers={cfg.num_layers}, "
                         f"i2v={cfg.i2v!r})): " + "; ".join(parts) + " (build params with init_params(cfg) or "
                         "load_checkpoint(path, cfg))")  # fmt: skip
    elsewhere = [f"{k} on {params[k].device}" for k in bad]
    raise ValueError(f"{fn}: params and inputs must be on one device: x is on {device} but {len(elsewhere)} parameter(s) "
                     f"are not: {elsewhere[:10]}{' ...' if len(elsewhere) > 10 else ''} (move them with "
                     f"{{k: v.to({str(device)!r}) for k, v in params.items()}})")  # fmt: skip


def _check_tensor(v, fn: str, arg: str, layout: str, device: torch.device) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{fn}: {arg} must be a torch.Tensor {layout}, got {type(v).__name__}")
    if v.device != device:
        raise ValueError(f"{fn}: {arg} must be on x's device {device}, got {v.device}")


def _check_inputs(params, cfg, x, t, context, image, run):
    """Validate one ``forward`` call before any work: cheap (shapes, dtypes, devices; no tensor data is read, so no
    device synchronisation) and traceable by torch.compile without a graph break."""
    fn = "forward"
    if not isinstance(cfg, DiTConfig):
        raise TypeError(f"{fn}: cfg must be a DiTConfig, got {type(cfg).__name__}")
    if run is not None and not isinstance(run, RunOptions):
        raise TypeError(f"{fn}: run must be an ospfn.model.RunOptions or None, got {type(run).__name__}")
    if run is not None and run.cache is not None and not all(callable(getattr(run.cache, m, None)) for m in ("before_blocks", "after_blocks")):  # fmt: skip
        raise TypeError(f"{fn}: run.cache must have before_blocks(x, e, e0) and after_blocks(x_in, x_out) methods (see RunOptions; "
                        f"e.g. an ospfn.sched.teacache.TeaCache wrapper sets it), got {type(run.cache).__name__}")  # fmt: skip
    if image is not None and not isinstance(image, ImageCond):
        raise TypeError(f"{fn}: image must be an ospfn.model.ImageCond or None, got {type(image).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor of latents [B, in_dim, T, H, W], got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{fn}: x must be latents [B, in_dim, T, H, W], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{fn}: x must be a floating-point tensor, got {x.dtype}")
    B, C, T, H, W = x.shape
    dev = x.device
    if C != cfg.in_dim:
        raise ValueError(f"{fn}: x has {C} channels but cfg.in_dim = {cfg.in_dim}")
    if B < 1 or T < 1 or H < 1 or W < 1:
        raise ValueError(f"{fn}: x must have B, T, H, W >= 1 (an empty batch or grid has nothing to denoise), got shape {tuple(x.shape)}")
    pt, ph, pw = cfg.patch_size
    if T % pt or H % ph or W % pw:
        raise ValueError(f"{fn}: latent size (T, H, W) = {(T, H, W)} must be divisible by patch_size {cfg.patch_size}")
    _check_tensor(t, fn, "t", f"of shape [{B}] (1000 * sigma)", dev)
    if t.shape != (B,):
        raise ValueError(f"{fn}: t must be a tensor of shape [{B}] (1000 * sigma), got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{fn}: t must be a real (float or int) tensor of timesteps, got {t.dtype}")
    _check_tensor(context, fn, "context", f"[{B}, L, text_dim={cfg.text_dim}]", dev)
    if context.dim() != 3 or context.shape[0] != B or context.shape[2] != cfg.text_dim:
        raise ValueError(f"{fn}: context must be [{B}, L, text_dim={cfg.text_dim}], got {tuple(context.shape)}")
    if context.shape[1] < 1:
        raise ValueError(f"{fn}: context must hold at least one token (L >= 1), got shape {tuple(context.shape)}; for "
                         "no text pass the encoding of the empty prompt")  # fmt: skip
    if not context.dtype.is_floating_point:
        raise TypeError(f"{fn}: context must be a floating-point tensor, got {context.dtype}")
    _check_params(params, cfg, dev, run is not None and run.block_fn is not None, fn)
    if cfg.i2v != "flashi2v":
        if image is not None:
            raise ValueError(f"{fn}: image= is the FlashI2V condition, but cfg.i2v = {cfg.i2v!r} takes none")
        return
    if image is None:
        raise ValueError(f"{fn}: a FlashI2V model (cfg.i2v='flashi2v') needs image=ImageCond(latent=s, fourier_ratio=r) "
                         "or ImageCond(fourier_feats=fourier_features(s, r))")  # fmt: skip
    if image.fourier_feats is None and (image.latent is None or image.fourier_ratio is None):
        raise ValueError(f"{fn}: ImageCond needs fourier_feats, or latent and fourier_ratio (got latent="
                         f"{None if not isinstance(image.latent, torch.Tensor) else tuple(image.latent.shape)}, "
                         f"fourier_ratio={image.fourier_ratio!r})")  # fmt: skip
    if not isinstance(image.apply_shift, bool):
        raise TypeError(f"{fn}: ImageCond.apply_shift must be a bool, got {type(image.apply_shift).__name__}")
    if image.apply_shift and image.latent is None:
        raise ValueError(f"{fn}: ImageCond(apply_shift=True) needs latent (the first-frame latent s phi is applied to)")
    want = f"[{B}, {cfg.in_dim}, 1, {H}, {W}]"
    for arg, v in (("image.latent", image.latent), ("image.fourier_feats", image.fourier_feats)):
        if v is None:
            continue
        _check_tensor(v, fn, arg, want, dev)
        if not v.dtype.is_floating_point:
            raise TypeError(f"{fn}: {arg} must be a floating-point tensor {want}, got {v.dtype}")
        if v.dim() not in (4, 5) or (v.dim() == 5 and v.shape[2] != 1) or v.shape[0] != B or v.shape[1] != cfg.in_dim \
                or tuple(v.shape[-2:]) != (H, W):  # fmt: skip
            raise ValueError(f"{fn}: {arg} must be one frame {want} (or [{B}, {cfg.in_dim}, {H}, {W}]) matching the latents "
                             f"{tuple(x.shape)}, got {tuple(v.shape)}")  # fmt: skip


def forward(
    params: dict[str, torch.Tensor],
    cfg: DiTConfig,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    *,
    image: Optional[ImageCond] = None,
    run: Optional[RunOptions] = None,
    lora=None,
) -> torch.Tensor:
    """Predicted velocity, fp32 [B, out_dim, T, H, W].

    x: latents [B, in_dim, T, H, W] (for FlashI2V shifted, ``z - flashi2v_shift(...)``, unless
    ``image.apply_shift``); t: [B] float timesteps (1000 * sigma); context: [B, L, text_dim] context tokens
    (zero-padded text features, no mask).  ``image``: the FlashI2V first-frame condition (``ImageCond``),
    required by ``cfg.i2v == "flashi2v"`` and refused otherwise.  ``run``: how the call runs
    (``RunOptions``: attention backend, gradient checkpointing, sequence parallelism, block hooks, a sampling
    cache such as TeaCache).  ``lora``: LoRA adapters for this call (docs/lora.md): None (the base model), an
    ``ospfn.lora.LoraAdapter``, an ``(adapter, weight)`` pair or a list of adapters and pairs (bare adapters
    weigh 1); each targeted block Linear gains ``weight * scale * (x A^T) B^T (+ weight * lora_bias)``,
    computed in high precision (never HiF8-quantised).  A weight of 0 and ``lora=None`` cost nothing.  With
    ``run.block_fn`` (the ``ospfn.nn`` module shells) the adapter lives in the modules instead
    (``ospfn.nn.DiT(cfg, params, lora=adapter)``), and ``lora=`` is refused.

    Every call is validated before any work, cheaply (shapes, dtypes and devices; no tensor data is read, so
    no device synchronisation, and torch.compile traces the checks without a graph break): ``params`` must
    hold every parameter of ``cfg`` with its shape (all missing and mis-shaped keys are listed; keys of
    other models are ignored; with ``run.block_fn`` the blocks' entries are the block function's business),
    on x's device, like ``t``, ``context``, the ``image`` tensors and the adapters (whose keys and shapes must
    fit ``cfg``: unknown modules, block indices beyond ``num_layers`` and wrong shapes are named).  B, T, H, W must be >= 1 (an empty
    batch or grid is an error, not an empty result) and the context must hold at least one token (L >= 1:
    "no text" is the encoding of the empty prompt, which has one).  Non-tensor inputs raise ``TypeError``
    naming the argument, wrong shapes / devices ``ValueError``.  Any strides are accepted.

    Example::

        >>> import torch
        >>> from ospfn.model import DiTConfig, RunOptions, forward, init_params
        >>> cfg = DiTConfig.preset("tiny")
        >>> params = init_params(cfg, seed=0)
        >>> x = torch.randn(1, cfg.in_dim, 3, 8, 8)
        >>> v = forward(params, cfg, x, torch.tensor([500.0]), torch.randn(1, 4, cfg.text_dim),
        ...             run=RunOptions(attn_backend="torch"))
        >>> v.shape
        torch.Size([1, 16, 3, 8, 8])
    """
    _check_inputs(params, cfg, x, t, context, image, run)
    lora_tables = None
    if lora is not None:  # ospfn.lora builds on this module: imported when used, so either may be imported first
        from ospfn.lora.adapter import block_lora_tables

        lora_tables = block_lora_tables(lora, cfg, x.device, "forward")
        if lora_tables is not None and run is not None and run.block_fn is not None:
            raise ValueError("forward: lora= cannot be combined with run.block_fn: a module block computes with its own "
                             "parameters, so attach the adapter to the modules (ospfn.nn.DiT(cfg, params, lora=adapter)) "
                             "and pick its weight per call with DiT.forward(..., lora_weight=)")  # fmt: skip
    run = RunOptions() if run is None else run
    mesh = run.parallel if run.parallel is not None else ParallelState.single(x.device)
    amax_group = run.amax_group
    if mesh.sp_size > 1 and cfg.quant == "hif8" and amax_group is None:
        amax_group = mesh.sp_group  # SP ranks must quantise with one amax
    B = x.shape[0]
    pt, ph, pw = cfg.patch_size
    grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
    wdtype = params["patch_embedding.weight"].dtype
    if image is not None and image.apply_shift:
        x = x - flashi2v_shift(params, cfg, image.latent)

    x_tok = _embed_latents(params, cfg, x, image, wdtype)
    e, e0 = _time_embed(params, cfg, t)
    ctx = F.linear(context.to(wdtype), params["text_embedding.0.weight"], params["text_embedding.0.bias"])
    ctx = F.linear(F.gelu(ctx, approximate="tanh"), params["text_embedding.2.weight"], params["text_embedding.2.bias"])

    schedule = block_schedule(cfg)
    if mesh.sp_size > 1:
        check_model_parallel(cfg, mesh, grid)
    tables = {kind: layout_tables(cfg, grid, kind, B, mesh, x.device) for kind in set(schedule)}
    bc = BlockContext(cfg, B, e0, ctx, mesh, run.attn_backend, amax_group)
    block_fn, block_hook = run.block_fn, run.block_hook
    per_block = None if block_fn is not None else block_params(params, cfg.num_layers)
    if lora_tables is not None:  # the adapter's per-block terms join the block's dict (read by _linear)
        for p_i, extra in zip(per_block, lora_tables):
            p_i.update(extra)

    n_local = x_tok.shape[1] // mesh.sp_size
    x_loc = x_tok[:, mesh.sp_rank * n_local : (mesh.sp_rank + 1) * n_local] if mesh.sp_size > 1 else x_tok
    cur = "full"
    cache, x_in = run.cache, x_loc
    reused = None if cache is None else cache.before_blocks(x_loc, e, e0)  # RunOptions: the cache protocol
    if reused is not None:  # the cache skips the whole stack: its stream replaces the blocks' output
        if not isinstance(reused, torch.Tensor) or reused.shape != x_loc.shape:
            raise ValueError(f"forward: run.cache.before_blocks must return None or a tensor of the stream's shape "
                             f"{tuple(x_loc.shape)}, got {getattr(reused, 'shape', type(reused).__name__)}")  # fmt: skip
        x_loc = reused
    else:
        for i, kind in enumerate(schedule):
            with mesh.tag(f"block{i}:{kind}"):
                x_loc = relayout(x_loc, grid, cfg.sparse_ratio, cur, kind, mesh, batch=B)
                cur = kind
                if block_fn is None:
                    fn, args = dit_block, (per_block[i], bc, tables[kind])
                else:  # a module block uses its own parameters (under FSDP2 the model's dict holds other units' shards)
                    fn, args = functools.partial(block_fn, i), (bc, tables[kind])
                if run.grad_checkpoint and torch.is_grad_enabled():
                    x_loc = checkpoint(fn, x_loc, *args, use_reentrant=False)
                else:
                    x_loc = fn(x_loc, *args)
            if block_hook is not None:
                block_hook(i, kind, x_loc)
    with mesh.tag("head"):
        x_loc = relayout(x_loc, grid, cfg.sparse_ratio, cur, "full", mesh, batch=B)
        if cache is not None and reused is None:
            cache.after_blocks(x_in, x_loc)
        out = _head_tokens(x_loc, e, params, cfg)
        if mesh.sp_size > 1:
            out = all_gather_seq(out, 1, mesh.sp_group)  # the head runs on local tokens only
    return _unpatchify(out, cfg, grid, B)


def _embed_latents(params, cfg, x, image: Optional[ImageCond], wdtype):
    """Patchify (+ the FlashI2V Fourier embedding, identical on every frame: computed once, broadcast over T);
    tokens [B, N, dim] in raster order (t, h, w)."""
    B = x.shape[0]
    pt = cfg.patch_size[0]
    h = F.conv3d(x.to(wdtype), params["patch_embedding.weight"], params["patch_embedding.bias"], stride=cfg.patch_size)
    if cfg.i2v == "flashi2v":
        fourier_feats = image.fourier_feats
        if fourier_feats is None:
            fourier_feats = fourier_features(image.latent, image.fourier_ratio)
        f = _as_frame(fourier_feats, "forward")[:, :, None].to(wdtype)
        if f.shape[0] != B or f.shape[1] != cfg.in_dim or f.shape[3:] != x.shape[3:]:
            raise ValueError(f"forward: Fourier features {tuple(f.shape)} do not match the latents {tuple(x.shape)}")
        if pt != 1:  # a temporal patch needs the frames themselves; with pt = 1 one frame suffices
            f = f.expand(-1, -1, x.shape[2], -1, -1)
        f = F.conv3d(f, params["fourier_embedding.0.weight"], params["fourier_embedding.0.bias"], stride=cfg.patch_size)
        f = F.conv3d(f, params["fourier_embedding.1.weight"], params["fourier_embedding.1.bias"])
        h = h + f
    # token-major and contiguous: a transposed (channel-major) residual stream makes every later elementwise op,
    # LayerNorm and relayout stride through memory
    return h.flatten(2).transpose(1, 2).contiguous()


def _time_embed(params, cfg, t):
    """(e [B, dim], e0 [B, 6, dim]) in fp32: the timestep embedding and the blocks' modulation input."""
    e = F.linear(time_embedding(t, cfg.freq_dim), params["time_embedding.0.weight"].float(), params["time_embedding.0.bias"].float())
    e = F.linear(F.silu(e), params["time_embedding.2.weight"].float(), params["time_embedding.2.bias"].float())
    e0 = F.linear(F.silu(e), params["time_projection.1.weight"].float(), params["time_projection.1.bias"].float())
    return e, e0.unflatten(1, (6, cfg.dim))


def layout_tables(cfg: DiTConfig, grid, kind: str, batch: int, mesh: ParallelState, device) -> LayoutTables:
    """RoPE, key mask and real rows of layout ``kind`` for this rank of ``mesh`` (the whole grid on one
    process)."""
    P = cfg.sparse_ratio
    if kind == "full":
        pos = local_rows_of(skiparse_positions(grid, 1, None, device=device)[0], grid, P, "full", mesh)[None]
        return LayoutTables(kind, rope_cos_sin(pos, cfg.head_dim, theta=cfg.rope_theta), None, None,
                            mesh.sp_group if mesh.sp_size > 1 else None)  # fmt: skip
    pos = local_rows_of(skiparse_positions(grid, P, kind, device=device), grid, P, kind, mesh)
    rope = rope_cos_sin(pos, cfg.head_dim, theta=cfg.rope_theta)
    group = mesh.ulysses_group if mesh.U > 1 else None
    full_mask = skiparse_key_mask(grid, P, kind, batch, device=device)
    if full_mask is None:
        return LayoutTables(kind, rope, None, None, group)
    G = P * P // mesh.S
    keys = full_mask[mesh.s_rank * G * batch : (mesh.s_rank + 1) * G * batch]  # local slots, whole sub-sequences
    L = keys.shape[1] // mesh.U
    return LayoutTables(kind, rope, keys, keys[:, mesh.u_rank * L : (mesh.u_rank + 1) * L], group)


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
