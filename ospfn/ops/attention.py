"""Scaled dot-product attention with a key-padding mask, (B, S, H, D) layout.

``attention(q, k, v, key_mask=None, scale=None)`` computes softmax(q k^T * scale) v per head with the
softmax in fp32.  ``key_mask`` [B, Sk] (True = real key) removes padded keys: a masked key never influences
the output or the gradients, whatever its K and V rows hold (NaN and Inf included; every backend treats them
as zeros, and their dK and dV are zero).  A batch entry whose keys are all masked returns zeros (and zero
gradients) instead of NaN: Skiparse sub-sequences made only of padding would otherwise poison the weight
gradients through 0 * NaN.

Any strides are accepted (non-contiguous, expanded with stride 0); empty sizes (B, Sq, Sk or H = 0) give an
empty (or, for Sk = 0, all-zero) result.  The head dim must be >= 1.

Backends: ``ref`` (explicit fp32 math, O(S^2) memory: the test oracle), ``torch``
(``scaled_dot_product_attention``: FlashAttention / cuDNN / memory-efficient kernels on CUDA, the flash CPU
kernel on CPU), ``triton`` (ospfn's own flash-attention forward + backward, ``kernels/attention.py``).
Auto picks ``torch`` on CPU and CUDA (PyTorch's fused kernels are the fastest correct path there).

Example::

    >>> import torch
    >>> from ospfn.ops import attention
    >>> q, k, v = (torch.randn(2, 10, 4, 16) for _ in range(3))
    >>> mask = torch.ones(2, 10, dtype=torch.bool); mask[1, 7:] = False   # last 3 keys of entry 1 are padding
    >>> attention(q, k, v, key_mask=mask).shape
    torch.Size([2, 10, 4, 16])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ospfn.backends import Constraint, dispatch, register, set_auto_order

__all__ = ["attention"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over keys with ``key_mask`` True; q [B, Sq, H, D], k/v [B, Sk, H, D].

    Returns [B, Sq, H, D] in q's dtype.  ``scale`` defaults to 1/sqrt(D).  Differentiable in q, k, v.
    """
    fn = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{fn}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must have shape [batch, seq, heads, head_dim], got {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{fn}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Sq, H, D = q.shape
    if D < 1:
        raise ValueError(f"{fn}: the head dim (last dim of q, k, v) must be >= 1, got {D} (q {tuple(q.shape)})")
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"{fn}: k must have shape [{B}, Sk, {H}, {D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{fn}: v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError(f"{fn}: key_mask must be a bool tensor [batch, Sk] (True = real key) or None, got "
                            f"{key_mask.dtype if isinstance(key_mask, torch.Tensor) else type(key_mask).__name__}")  # fmt: skip
        if tuple(key_mask.shape) != (B, k.shape[1]):
            raise ValueError(f"{fn}: key_mask must have shape [{B}, {k.shape[1]}] (batch, Sk), got {tuple(key_mask.shape)}")
        if key_mask.device != q.device:
            raise ValueError(f"{fn}: key_mask must be on {q.device}, got {key_mask.device}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: scale must be a finite number > 0 or None, got {type(scale).__name__}")
    elif not 0 < scale < math.inf:  # NaN fails too
        raise ValueError(f"{fn}: scale must be a finite number > 0 or None, got {scale!r}")
    return dispatch("attention", backend, q, k, v, key_mask, float(scale))


def _ref_attention(q, k, v, key_mask, scale):
    qf, kf, vf = (t.to(torch.float32) if t.dtype != torch.float64 else t for t in (q, k, v))
    if key_mask is not None:  # masked rows may hold anything (NaN, Inf): they must not reach the products
        drop = ~key_mask[:, :, None, None]
        kf, vf = kf.masked_fill(drop, 0), vf.masked_fill(drop, 0)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        has_key = key_mask.any(dim=1)
        s = torch.where(has_key[:, None, None, None], s, torch.zeros_like(s))  # no NaN for empty entries
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vf)
    if key_mask is not None:
        out = out * has_key[:, None, None, None].to(out.dtype)
    return out.to(q.dtype)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    # PyTorch's fused kernels take another path (other rounding) for a strided head dim: copy such an input once,
    # so a sliced tensor gives exactly what its contiguous copy gives
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _sdpa_attention(q, k, v, key_mask, scale):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    mask = None
    has_key = None
    if key_mask is not None:
        # a masked score is -inf, but NaN / Inf in a masked K or V row would still give NaN (NaN + -inf, 0 * NaN)
        drop = ~key_mask[:, :, None, None]
        k, v = k.masked_fill(drop, 0), v.masked_fill(drop, 0)
        has_key = key_mask.any(dim=1)
        safe = key_mask | ~has_key[:, None]  # an all-masked entry attends everywhere, then is zeroed
        mask = safe[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    out = out.transpose(1, 2)
    if has_key is not None:
        out = out * has_key[:, None, None, None].to(out.dtype)
    return out


register("attention", "ref", _ref_attention)
register("attention", "torch", _sdpa_attention)
_TRITON_HEAD_DIM = 128  # kernels/attention.py MAX_HEAD_DIM: one tile of the head dim in registers
register(
    "attention",
    "triton",
    "ospfn.kernels.attention:attention",
    constraints=(
        Constraint("float16, bfloat16 or float32 q/k/v", lambda q, *_: None if q.dtype in _FLOATS[:3] else f"dtype {q.dtype}"),
        Constraint(f"head dim <= {_TRITON_HEAD_DIM}", lambda q, *_: None if q.shape[-1] <= _TRITON_HEAD_DIM else f"head dim {q.shape[-1]}"),
    ),
)
set_auto_order("attention", {"cpu": ("torch", "ref"), "cuda": ("torch", "triton", "ref"), "npu": ("npu", "torch", "ref")})
