"""An independent reference DiT forward for the tests, written from docs/dit.md#forward-pass.

Every block runs in the ORIGINAL raster token order; a Skiparse block is dense attention with an explicit
[N, N] boolean mask (token / group partitions by index arithmetic), RoPE is complex multiplication at the
raster positions.  Nothing here calls ospfn.model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def schedule(num_layers: int, model_type: str, num_full: int) -> list[str]:
    if model_type == "full":
        return ["full"] * num_layers
    out = []
    for i in range(num_layers):
        if i < num_full // 2 or i >= num_layers - num_full // 2:
            out.append("full")
        else:
            out.append("token" if i % 2 == 0 else "group")
    return out


def partition_mask(grid, P, layout) -> torch.Tensor:
    T, H, W = grid
    idx = torch.arange(T * H * W)
    h = (idx // W) % H
    w = idx % W
    if layout == "full":
        return torch.ones(len(idx), len(idx), dtype=torch.bool)
    if layout == "token":
        sid = (h % P) * P + w % P
    else:
        sid = ((h // P) % P) * P + (w // P) % P
    return sid[:, None] == sid[None, :]


def rope_complex(x, grid, theta=10000.0):
    """x [B, N, H, D] rotated by the raster (t, h, w) in the Wan2.1 complex formulation (float64)."""
    B, N, nh, D = x.shape
    T, Hh, Ww = grid
    c = D // 2

    def table(dim, n):
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        ang = torch.outer(torch.arange(n, dtype=torch.float64), inv)
        return torch.polar(torch.ones_like(ang), ang)

    ft = table(D - 4 * (D // 6), T)
    fh = table(2 * (D // 6), Hh)
    fw = table(2 * (D // 6), Ww)
    f = torch.cat(
        [ft.view(T, 1, 1, -1).expand(T, Hh, Ww, -1), fh.view(1, Hh, 1, -1).expand(T, Hh, Ww, -1), fw.view(1, 1, Ww, -1).expand(T, Hh, Ww, -1)],
        dim=-1,
    ).reshape(N, 1, c)
    xc = torch.view_as_complex(x.double().reshape(B, N, nh, c, 2).contiguous())
    return torch.view_as_real(xc * f).flatten(3).to(x.dtype)


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def attend(q, k, v, mask=None):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)


def reference_forward(p, *, dim, heads, num_layers, patch, eps, model_type, ratio, num_full, x, t, ctx,
                      block_linear=None, fourier=None, qkv_quant=None):  # fmt: skip
    """fp32 DiT forward.  ``block_linear(x, w, b)`` replaces the Linears inside blocks (HiF8 tests);
    ``qkv_quant(t)`` is applied to self-attention q, k, v after RoPE; ``fourier`` = precomputed Fourier
    features [B, C, 1, H, W] for FlashI2V parameters."""
    lin = F.linear
    blin = block_linear or F.linear
    B = x.shape[0]
    h = F.conv3d(x, p["patch_embedding.weight"], p["patch_embedding.bias"], stride=patch)
    if fourier is not None:
        f = F.conv3d(fourier.expand(-1, -1, x.shape[2], -1, -1), p["fourier_embedding.0.weight"], p["fourier_embedding.0.bias"], stride=patch)
        h = h + F.conv3d(f, p["fourier_embedding.1.weight"], p["fourier_embedding.1.bias"])
    _, _, T, H, W = h.shape
    grid = (T, H, W)
    xs = h.flatten(2).transpose(1, 2)
    half = p["time_embedding.0.weight"].shape[1] // 2
    omega = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    arg = t.double()[:, None] * omega
    emb = torch.cat([arg.cos(), arg.sin()], 1).float()
    e = lin(F.silu(lin(emb, p["time_embedding.0.weight"], p["time_embedding.0.bias"])), p["time_embedding.2.weight"], p["time_embedding.2.bias"])
    e0 = lin(F.silu(e), p["time_projection.1.weight"], p["time_projection.1.bias"]).view(B, 6, dim)
    c = lin(F.gelu(lin(ctx, p["text_embedding.0.weight"], p["text_embedding.0.bias"]), approximate="tanh"), p["text_embedding.2.weight"], p["text_embedding.2.bias"])
    d = dim // heads
    for i, layout in enumerate(schedule(num_layers, model_type, num_full)):
        b = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = (p[b + "modulation"] + e0).unbind(1)
        n = F.layer_norm(xs, (dim,), eps=eps) * (1 + sc1[:, None]) + sh1[:, None]
        q = rms(blin(n, p[b + "self_attn.q.weight"], p[b + "self_attn.q.bias"]), p[b + "self_attn.norm_q.weight"], eps)
        k = rms(blin(n, p[b + "self_attn.k.weight"], p[b + "self_attn.k.bias"]), p[b + "self_attn.norm_k.weight"], eps)
        v = blin(n, p[b + "self_attn.v.weight"], p[b + "self_attn.v.bias"])
        q, k, v = (z.view(B, -1, heads, d) for z in (q, k, v))
        q, k = rope_complex(q, grid), rope_complex(k, grid)
        if qkv_quant is not None:
            q, k, v = qkv_quant(q), qkv_quant(k), qkv_quant(v)
        a = attend(q, k, v, partition_mask(grid, ratio, layout)).reshape(B, -1, dim)
        xs = xs + blin(a, p[b + "self_attn.o.weight"], p[b + "self_attn.o.bias"]) * g1[:, None]
        n = F.layer_norm(xs, (dim,), p[b + "norm3.weight"], p[b + "norm3.bias"], eps)
        q = rms(blin(n, p[b + "cross_attn.q.weight"], p[b + "cross_attn.q.bias"]), p[b + "cross_attn.norm_q.weight"], eps)
        k = rms(blin(c, p[b + "cross_attn.k.weight"], p[b + "cross_attn.k.bias"]), p[b + "cross_attn.norm_k.weight"], eps)
        v = blin(c, p[b + "cross_attn.v.weight"], p[b + "cross_attn.v.bias"])
        a = attend(q.view(B, -1, heads, d), k.view(B, -1, heads, d), v.view(B, -1, heads, d)).reshape(B, -1, dim)
        xs = xs + blin(a, p[b + "cross_attn.o.weight"], p[b + "cross_attn.o.bias"])
        n = F.layer_norm(xs, (dim,), eps=eps) * (1 + sc2[:, None]) + sh2[:, None]
        f = blin(F.gelu(blin(n, p[b + "ffn.0.weight"], p[b + "ffn.0.bias"]), approximate="tanh"), p[b + "ffn.2.weight"], p[b + "ffn.2.bias"])
        xs = xs + f * g2[:, None]
    shift, scale = (p["head.modulation"] + e[:, None]).unbind(1)
    n = F.layer_norm(xs, (dim,), eps=eps) * (1 + scale[:, None]) + shift[:, None]
    out = lin(n, p["head.head.weight"], p["head.head.bias"])
    pt, ph, pw = patch
    C_out = out.shape[-1] // (pt * ph * pw)
    out = out.view(B, T, H, W, pt, ph, pw, C_out)
    return torch.einsum("bthwijkc->bctihjwk", out).reshape(B, C_out, T * pt, H * ph, W * pw)
