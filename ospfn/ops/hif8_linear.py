"""HiF8 straight-through fake quantisation (docs/hif8.md, "Training with HiF8").

* :func:`hif8_fake_quant` -- ``Q_M(x)`` forward, ``Q_M'(grad)`` straight through backward, per tensor: the
  attention-quantisation recipe of OSP-Next (Q15 on q, k, v after RoPE; Q224 on dq, dk, dv).
* :func:`hif8_linear` -- the straight-through fake-quant linear OSP-Next trains with:
  ``y = Q15(x) @ Q15(W)^T + b``; backward ``g_q = Q224(g)``, ``dX = g_q @ Q15(W)``, ``dW = g_q^T @ Q15(x)``,
  ``db = sum(g_q)``, where ``Q_M`` is :func:`ospfn.ops.hif8_quantize` with ``scale_max = M`` (per tensor).

Both take ``amax_group``: the amax of the activation (and of its gradient) is then the MAX over that process
group, through :func:`ospfn.parallel.all_reduce_max` (so ``comm_stats`` counts the traffic as ``"amax"``),
and sequence-parallel ranks quantise exactly as one process holding every token would.

Example::

    >>> import torch
    >>> from ospfn.ops import hif8_linear
    >>> x = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    >>> w = torch.tensor([[0.3, 0.2, -1.0], [2.0, 0.0, 0.7]], requires_grad=True)
    >>> y = hif8_linear(x, w)  # s = 15 / 2: x is on the grid; 0.7 * 7.5 = 5.25 rounds to 5.5
    >>> y.detach()
    tensor([[-0.6000,  2.3667]])
    >>> y.sum().backward()
    >>> x.grad  # Q224 of the ones gradient is exact, then ones @ Q15(w)
    tensor([[ 2.3000,  0.2000, -0.2667]])
"""

from __future__ import annotations

import torch

from ospfn.backends import select
from ospfn.ops.hif8 import _check_scale_max, _tensor_arg, hif8_amax, hif8_quantize

__all__ = ["hif8_fake_quant", "hif8_linear", "HiF8LinearFunction", "quantize_group_amax"]

_LINEAR_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# the one per-tensor quantiser with a (possibly group-wide) amax


def quantize_group_amax(t: torch.Tensor, scale_max: float, group=None, backend: str | None = None) -> torch.Tensor:
    """Per-tensor ``Q_M(t)``; with a process group the amax is the MAX over the group (stays on device, the
    all-reduce is an accounted ``"amax"`` collective of :mod:`ospfn.parallel`)."""
    if group is None:
        return hif8_quantize(t, scale_max, backend=backend)
    from ospfn.parallel.comm import all_reduce_max

    amax = all_reduce_max(hif8_amax(t), group, kind="amax")
    return hif8_quantize(t, scale_max, amax=amax, backend=backend)


def _resolve_outside_autograd(x: torch.Tensor, backend: str | None) -> None:
    """Look up the quantiser's backend once before entering the autograd Function.

    The registry caches its first lookup for an (op, backend, device) -- a Python side effect.  Made inside the
    Function's forward or backward while torch.compile traces them, it makes dynamo fail on the saved
    tensors; made here, in the traced caller, it is an ordinary side effect and the lookups inside find it.
    """
    select("hif8_quantize", backend, x.device)


def _check_group(group, op: str):
    if group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{op}: amax_group was given but torch.distributed is not initialised")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op}: amax_group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    return group


class _HiF8STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale_max_fwd, scale_max_bwd, group, backend):
        ctx.cfg = (scale_max_bwd, group, backend)
        return quantize_group_amax(x, scale_max_fwd, group, backend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        smb, group, backend = ctx.cfg
        return quantize_group_amax(g.contiguous(), smb, group, backend), None, None, None, None


def hif8_fake_quant(
    x: torch.Tensor,
    scale_max_fwd: float = 15.0,
    scale_max_bwd: float = 224.0,
    *,
    amax_group=None,
    backend: str | None = None,
) -> torch.Tensor:
    """Forward ``Q_{scale_max_fwd}(x)`` (per tensor); backward passes ``Q_{scale_max_bwd}(grad)`` straight
    through (no mask, no clipping).  ``amax_group``: all-reduce (max) the amax over this process group.

    >>> x = torch.tensor([0.3, -1.0], requires_grad=True)
    >>> hif8_fake_quant(x).detach()  # s = 15: 4.5 -> 4.5, -15 -> -15
    tensor([ 0.3000, -1.0000])
    """
    op = "hif8_fake_quant"
    x = _tensor_arg(x, op, "x")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    smf, smb = _check_scale_max(scale_max_fwd, op), _check_scale_max(scale_max_bwd, op)
    group = _check_group(amax_group, op)
    _resolve_outside_autograd(x, backend)
    return _HiF8STE.apply(x, smf, smb, group, backend)


# ----------------------------------------------------------------------------------------------------------
# straight-through fake-quant linear


class HiF8LinearFunction(torch.autograd.Function):
    """The autograd Function behind :func:`hif8_linear` (arguments already validated).

    Saved for backward: ``Q15(x)`` (only if W needs a gradient; it takes the place of the ``x`` that
    ``nn.Linear`` saves, same bytes) and the weight ``W`` itself (only if x needs a gradient).  ``Q15(W)`` is
    recomputed in backward -- one elementwise pass over W, bit-identical to the forward one since the amax of
    W is a max and does not depend on reduction order -- instead of being kept alive from forward to backward:
    a saved ``Q15(W)`` would be a new weight-sized tensor per layer (for a 14B DiT, the whole model again in
    activation memory), and under FSDP it would pin the unsharded weight that FSDP frees after forward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale_max_fwd, scale_max_bwd, group, backend):
        xq = quantize_group_amax(x, scale_max_fwd, group, backend)
        wq = hif8_quantize(weight, scale_max_fwd, backend=backend)
        with torch.autocast(x.device.type, enabled=False):  # the result dtype is x's dtype, always
            y = torch.nn.functional.linear(xq, wq, bias)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(xq if need_w else None, weight if need_x else None)
        ctx.cfg = (scale_max_fwd, scale_max_bwd, group, backend)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        xq, weight = ctx.saved_tensors
        smf, smb, group, backend = ctx.cfg
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gq = quantize_group_amax(g, smb, group, backend)
        dx = dw = db = None
        if need_x:
            dx = torch.matmul(gq, hif8_quantize(weight, smf, backend=backend))
        if need_w or need_b:
            g2 = gq.reshape(-1, gq.shape[-1])
            if need_w:
                dw = g2.t().mm(xq.reshape(-1, xq.shape[-1]))
            if need_b:
                db = g2.sum(0)
        return dx, dw, db, None, None, None, None


def hif8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale_max_fwd: float = 15.0,
    scale_max_bwd: float = 224.0,
    amax_group=None,
    backend: str | None = None,
) -> torch.Tensor:
    """HiF8 fake-quant linear with a straight-through backward (docs/hif8.md#training-with-hif8).

    Forward ``y = Q(x) @ Q(W)^T + b`` with ``Q = hif8_quantize(., scale_max_fwd)`` (per-tensor dynamic scale);
    backward ``g_q = hif8_quantize(g, scale_max_bwd)``, ``dX = g_q @ Q(W)``, ``dW = g_q^T @ Q(x)`` (leading dims
    of x flattened), ``db = g_q`` summed over all leading dims.  The quantisers are treated as identity for
    the gradient (straight-through): no mask, no clipping.

    Shapes: ``x`` [..., K], ``weight`` [N, K], ``bias`` [N] -> ``y`` [..., N].  x, weight and bias must share
    one dtype (float32, float64, float16 or bfloat16) and device; the matmuls run in that dtype, exactly like
    ``torch.nn.functional.linear`` (bf16 inputs: bf16 matmul with fp32 accumulation; the quantised operands
    are computed in fp32 and rounded once to the dtype).  No host synchronisation: amax and scales stay on
    the device.  Not autocast-aware: under ``torch.autocast`` it still runs (and returns) in x's dtype, so
    that forward and straight-through backward see the same quantised operands; cast to bf16 beforehand.

    ``amax_group``: a ``torch.distributed`` process group (e.g. the sequence-parallel group).  When given, the
    amax of x (forward) and of g (backward) is all-reduced with MAX over the group before the scale is formed,
    so ranks that each hold a slice of the tokens quantise exactly as one process holding all tokens would.
    The weight's amax is not reduced (it is replicated).  Every rank of the group must call the op, in the
    same order, forward and backward.  ``backend`` selects the :func:`hif8_quantize` backend.

    Example::

        >>> x = torch.randn(2, 5, 8, requires_grad=True)
        >>> w = torch.randn(4, 8, requires_grad=True)
        >>> y = hif8_linear(x, w)
        >>> y.shape
        torch.Size([2, 5, 4])
        >>> y.backward(torch.ones_like(y)); x.grad.shape, w.grad.shape
        (torch.Size([2, 5, 8]), torch.Size([4, 8]))
    """
    op = "hif8_linear"
    x = _tensor_arg(x, op, "x")
    weight = _tensor_arg(weight, op, "weight")
    if x.dtype not in _LINEAR_DTYPES:
        raise TypeError(f"{op}: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape [..., K] (at least 1 dimension), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must have shape [N, K] (2 dimensions), got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{op}: weight.shape[1] must equal x.shape[-1] (K), got weight {tuple(weight.shape)} and x {tuple(x.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight dtype must equal x dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight must be on x's device {x.device}, got {weight.device}")
    if bias is not None:
        bias = _tensor_arg(bias, op, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},) (N), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: bias dtype must equal x dtype {x.dtype}, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"{op}: bias must be on x's device {x.device}, got {bias.device}")
    smf = _check_scale_max(scale_max_fwd, op)
    smb = _check_scale_max(scale_max_bwd, op)
    amax_group = _check_group(amax_group, op)
    _resolve_outside_autograd(x, backend)
    return HiF8LinearFunction.apply(x, weight, bias, smf, smb, amax_group, backend)
