"""Straight-through HiF8 fake quantisation used inside the model (spec-hif8.md section 3)."""

from __future__ import annotations

import torch

from ospfn.ops import hif8_amax, hif8_quantize

__all__ = ["hif8_fake_quant_ste"]


def _q(x: torch.Tensor, scale_max: float, group) -> torch.Tensor:
    if group is None:
        return hif8_quantize(x, scale_max)
    import torch.distributed as dist

    amax = hif8_amax(x)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)  # every SP rank quantises with the same scale
    return hif8_quantize(x, scale_max, amax=amax)


class _HiF8STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale_max_fwd, scale_max_bwd, group):
        ctx.scale_max_bwd, ctx.group = scale_max_bwd, group
        return _q(x, scale_max_fwd, group)

    @staticmethod
    def backward(ctx, g):
        return _q(g.contiguous(), ctx.scale_max_bwd, ctx.group), None, None, None


def hif8_fake_quant_ste(x: torch.Tensor, scale_max_fwd: float = 15.0, scale_max_bwd: float = 224.0, *, amax_group=None) -> torch.Tensor:
    """Forward Q_{scale_max_fwd}(x) (per tensor); backward passes Q_{scale_max_bwd}(grad) straight through.

    The attention-quantisation recipe of OSP-Next: Q15 on q, k, v after RoPE, Q224 on dq, dk, dv.
    ``amax_group``: all-reduce (max) the amax over this process group (sequence-parallel ranks).
    """
    return _HiF8STE.apply(x, float(scale_max_fwd), float(scale_max_bwd), amax_group)
