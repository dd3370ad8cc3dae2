"""Straight-through HiF8 fake quantisation used inside the model (spec-hif8.md section 3)."""

from __future__ import annotations

import torch

from ospfn.ops import hif8_quantize

__all__ = ["hif8_fake_quant_ste"]


class _HiF8STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale_max_fwd, scale_max_bwd):
        ctx.scale_max_bwd = scale_max_bwd
        return hif8_quantize(x, scale_max_fwd)

    @staticmethod
    def backward(ctx, g):
        return hif8_quantize(g.contiguous(), ctx.scale_max_bwd), None, None


def hif8_fake_quant_ste(x: torch.Tensor, scale_max_fwd: float = 15.0, scale_max_bwd: float = 224.0) -> torch.Tensor:
    """Forward Q_{scale_max_fwd}(x) (per tensor); backward passes Q_{scale_max_bwd}(grad) straight through.

    The attention-quantisation recipe of OSP-Next: Q15 on q, k, v after RoPE, Q224 on dq, dk, dv.
    """
    return _HiF8STE.apply(x, float(scale_max_fwd), float(scale_max_bwd))
