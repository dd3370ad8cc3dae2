"""HiF8 linear layers (spec-hif8.md sections 3 and 4).

* :func:`hif8_linear` -- the straight-through fake-quant linear OSP-Next trains with:
  ``y = Q15(x) @ Q15(W)^T + b``; backward ``g_q = Q224(g)``, ``dX = g_q @ Q15(W)``, ``dW = g_q^T @ Q15(x)``,
  ``db = sum(g_q)``, where ``Q_M`` is :func:`ospfn.ops.hif8_quantize` with ``scale_max = M`` (per tensor).
  Optionally the amax of x and g is all-reduced (MAX) over a process group, so that sequence-parallel ranks
  quantise with one scale.
* :class:`HiF8Tensor` / :func:`hif8_pack` / :func:`hif8_unpack` -- weights stored for real in 8 bits: uint8
  codes plus fp32 scale(s) per tensor or per output channel.
* :func:`hif8_matmul` -- ``x @ W_q^T + b`` straight from the packed codes (W8A16: the Triton kernel decodes the
  codes in registers and multiplies in the activation dtype with fp32 accumulation; ``ref`` / ``cpp`` decode
  blocks of rows through the 256-entry table and call torch matmul in fp32).

Example::

    >>> import torch
    >>> from ospfn.ops.hif8_gemm import hif8_linear, hif8_pack, hif8_matmul
    >>> x = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    >>> w = torch.tensor([[0.3, 0.2, -1.0], [2.0, 0.0, 0.7]], requires_grad=True)
    >>> y = hif8_linear(x, w)  # s = 15 / 2: x is on the grid; 0.7 * 7.5 = 5.25 rounds to 5.5
    >>> y.detach()
    tensor([[-0.6000,  2.3667]])
    >>> y.sum().backward()
    >>> x.grad  # Q224 of the ones gradient is exact, then ones @ Q15(w)
    tensor([[ 2.3000,  0.2000, -0.2667]])
    >>> p = hif8_pack(w.detach())
    >>> p.codes.dtype, p.nbytes  # 6 one-byte codes + one fp32 scale
    (torch.uint8, 10)
    >>> hif8_matmul(x.detach(), p)
    tensor([[-0.6000,  2.3667]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ospfn.backends import register, select
from ospfn.ops.hif8 import (
    AMAX_FLOOR,
    _check_scale_max,
    _decode_table,
    hif8_amax,
    hif8_decode,
    hif8_encode,
    hif8_quantize,
)

__all__ = ["hif8_linear", "HiF8LinearFunction", "HiF8Tensor", "hif8_pack", "hif8_unpack", "hif8_matmul"]

_LINEAR_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MATMUL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PACK_GRANULARITIES = ("tensor", "channel")


def _tensor_arg(t: object, op: str, arg: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    return t


# ----------------------------------------------------------------------------------------------------------
# straight-through fake-quant linear


def _quantize(t: torch.Tensor, scale_max: float, group, backend: str | None) -> torch.Tensor:
    """Per-tensor Q_M(t); with a process group the amax is the MAX over the group (stays on device)."""
    if group is None:
        return hif8_quantize(t, scale_max, backend=backend)
    import torch.distributed as dist

    amax = hif8_amax(t)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return hif8_quantize(t, scale_max, amax=amax, backend=backend)


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
        xq = _quantize(x, scale_max_fwd, group, backend)
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
        gq = _quantize(g, smb, group, backend)
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
    """HiF8 fake-quant linear with a straight-through backward (spec-hif8.md section 3).

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
    if amax_group is not None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"{op}: amax_group was given but torch.distributed is not initialised")
        if not isinstance(amax_group, dist.ProcessGroup):
            raise TypeError(
                f"{op}: amax_group must be a torch.distributed.ProcessGroup or None, got {type(amax_group).__name__}"
            )
    return HiF8LinearFunction.apply(x, weight, bias, smf, smb, amax_group, backend)


# ----------------------------------------------------------------------------------------------------------
# packed 8-bit weights


@dataclass(frozen=True, eq=False)
class HiF8Tensor:
    """A weight [N, K] stored in HiF8: one uint8 code per element plus fp32 scale(s).

    Fields:

    * ``codes``: uint8 [N, K], ``hif8_encode(W * s)`` (per-channel: row n uses ``s[n]``);
    * ``scale``: float32, shape ``()`` (granularity ``"tensor"``) or ``(N,)`` (``"channel"``):
      ``s = scale_max / max(amax, 1e-8)`` with ``amax = max|W|`` (per tensor or per row), exactly the scale of
      :func:`ospfn.ops.hif8_quantize` (granularity ``"tensor"`` / ``"row"``);
    * ``granularity``: ``"tensor"`` or ``"channel"``;
    * ``dtype``: the dtype of the weight it was packed from (the default of :meth:`dequantize`);
    * ``scale_max``: 15 unless packed otherwise.

    Dequantisation: ``W_q = decode(codes) / s`` in fp32 (division correctly rounded, per row for "channel"),
    then rounded once to the target dtype.  ``W_q`` in the packed-from dtype is bit for bit
    ``hif8_quantize(W, scale_max, granularity="tensor" | "row")``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    granularity: str
    dtype: torch.dtype
    scale_max: float = 15.0

    def __post_init__(self):
        c, s = self.codes, self.scale
        if not isinstance(c, torch.Tensor) or c.dtype != torch.uint8 or c.dim() != 2:
            raise TypeError(f"HiF8Tensor: codes must be a 2-D uint8 tensor [N, K], got {_describe(c)}")
        if self.granularity not in _PACK_GRANULARITIES:
            raise ValueError(f"HiF8Tensor: granularity must be one of {_PACK_GRANULARITIES}, got {self.granularity!r}")
        want = () if self.granularity == "tensor" else (c.shape[0],)
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or tuple(s.shape) != want:
            raise TypeError(f"HiF8Tensor: scale must be a float32 tensor of shape {want}, got {_describe(s)}")
        if s.device != c.device:
            raise ValueError(f"HiF8Tensor: scale and codes must be on one device, got {s.device} and {c.device}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"HiF8Tensor: dtype must be a floating-point torch.dtype, got {self.dtype!r}")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Storage in bytes: N*K code bytes plus 4 per scale."""
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

    def to(self, device: torch.device | str) -> "HiF8Tensor":
        """A copy on ``device`` (codes and scales move together; no re-quantisation)."""
        return HiF8Tensor(self.codes.to(device), self.scale.to(device), self.granularity, self.dtype, self.scale_max)

    def dequantize(self, dtype: torch.dtype | None = None, *, backend: str | None = None) -> torch.Tensor:
        """``decode(codes) / s`` computed in fp32, returned in ``dtype`` (default: the packed-from dtype)."""
        dtype = self.dtype if dtype is None else dtype
        s = self.scale if self.granularity == "tensor" else self.scale[:, None]
        return hif8_decode(self.codes, torch.float32, backend=backend).div_(s).to(dtype)

    def __repr__(self) -> str:
        return (
            f"HiF8Tensor(shape={tuple(self.shape)}, granularity={self.granularity!r}, dtype={self.dtype}, "
            f"device={self.device}, nbytes={self.nbytes})"
        )


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def hif8_pack(
    weight: torch.Tensor,
    *,
    granularity: str = "tensor",
    scale_max: float = 15.0,
    backend: str | None = None,
) -> HiF8Tensor:
    """Store a weight [N, K] as HiF8 codes (1 byte per element) plus fp32 scale(s).

    ``granularity="tensor"``: one scale ``s = scale_max / max(max|W|, 1e-8)``; ``"channel"``: one per output
    channel (row of W).  ``codes = hif8_encode(W * s)`` computed in fp32, so ``hif8_pack(W).dequantize()``
    equals ``hif8_quantize(W, scale_max)`` bit for bit ("channel": ``granularity="row"``).  No host sync.

    Example::

        >>> w = torch.tensor([[0.5, -1.0], [3.0, 0.25]])
        >>> p = hif8_pack(w, granularity="channel")
        >>> p.scale.tolist(), [hex(c) for c in p.codes.flatten().tolist()]
        ([15.0, 5.0], ['0x27', '0xaf', '0x2f', '0xa'])
        >>> p.dequantize().tolist()
        [[0.5, -1.0], [3.0, 0.25]]
    """
    op = "hif8_pack"
    weight = _tensor_arg(weight, op, "weight")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{op}: weight must be a floating-point tensor, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must have shape [N, K] (2 dimensions), got shape {tuple(weight.shape)}")
    if granularity not in _PACK_GRANULARITIES:
        raise ValueError(f"{op}: granularity must be one of {_PACK_GRANULARITIES}, got {granularity!r}")
    sm = _check_scale_max(scale_max, op)
    w = weight.detach()
    amax = hif8_amax(w, "tensor" if granularity == "tensor" else "row")  # () or [N, 1]
    denom = torch.where(amax < AMAX_FLOOR, torch.full_like(amax, AMAX_FLOOR), amax)  # keeps NaN
    s = torch.full_like(denom, sm).div(denom)  # fp32, correctly rounded
    # fp32 product then encode: the same arithmetic as hif8_quantize (float64 weights round to fp32 first)
    codes = hif8_encode(w.to(torch.float32) * s, backend=backend)
    scale = s if granularity == "tensor" else s.reshape(-1)
    return HiF8Tensor(codes, scale, granularity, weight.dtype, sm)


def hif8_unpack(packed: HiF8Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``packed.dequantize(dtype)``: the fake-quantised weight ``decode(codes) / s``."""
    if not isinstance(packed, HiF8Tensor):
        raise TypeError(f"hif8_unpack: packed must be a HiF8Tensor (from hif8_pack), got {type(packed).__name__}")
    return packed.dequantize(dtype)


# ----------------------------------------------------------------------------------------------------------
# W8A16 matmul


class _HiF8MatmulFunction(torch.autograd.Function):
    """Forward through the selected backend; backward for x and bias (the packed weight is frozen)."""

    @staticmethod
    def forward(ctx, x2, bias, packed, impl):
        ctx.packed = packed
        return impl(x2, packed.codes, packed.scale, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        dx = db = None
        if ctx.needs_input_grad[0]:
            w = ctx.packed.dequantize(torch.float32)
            dx = g.to(torch.float32).mm(w).to(g.dtype)
        if ctx.needs_input_grad[1]:
            db = g.sum(0)
        return dx, db, None, None


def hif8_matmul(
    x: torch.Tensor,
    packed: HiF8Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``y = x @ W_q^T + b`` with the weight read from its 8-bit codes (spec-hif8.md section 4).

    ``x`` [..., K] in float32, float16 or bfloat16; ``packed`` from :func:`hif8_pack` with shape [N, K];
    ``bias`` [N] (any float dtype, added in fp32) -> ``y`` [..., N] in x's dtype.  ``W_q = decode(codes) / s``
    is never formed: the codes are decoded (exactly) into the activation dtype, multiplied with fp32
    accumulation, the scale is divided out per tensor / per output channel in the epilogue and the bias added
    there; the result is rounded once to x's dtype.  It equals ``x @ hif8_quantize(W, 15)^T + b`` (channel:
    ``granularity="row"``) up to fp32 summation order.

    Backends: ``triton`` (CUDA; W8A16 kernel, autotuned), ``ref`` (any device: blocks of rows decoded through
    the 256-entry table into fp32, torch matmul in fp32, so the fp32 weight never exists in full) and ``cpp``
    (CPU: the same, with the blocks decoded by the C++ table op).  Differentiable with respect to x and bias (not the
    packed weight): ``dx = g @ W_q``.

    Example::

        >>> w = torch.tensor([[1.0, 2.0, 3.0], [0.5, -0.5, 0.25]])
        >>> x = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]])
        >>> hif8_matmul(x, hif8_pack(w, granularity="channel"), torch.tensor([0.0, 1.0]))
        tensor([[ 6.0000,  1.2500],
                [-1.0000,  1.7500]])
    """
    op = "hif8_matmul"
    x = _tensor_arg(x, op, "x")
    if not isinstance(packed, HiF8Tensor):
        raise TypeError(f"{op}: packed must be a HiF8Tensor (from hif8_pack), got {type(packed).__name__}")
    if x.dtype not in _MATMUL_DTYPES:
        raise TypeError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    N, K = packed.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(
            f"{op}: x must have shape [..., K] with K = {K} (packed weight {tuple(packed.shape)}), got {tuple(x.shape)}"
        )
    if x.device != packed.device:
        raise ValueError(f"{op}: x and the packed weight must be on one device, got {x.device} and {packed.device}")
    if bias is not None:
        bias = _tensor_arg(bias, op, "bias")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"{op}: bias must be a floating-point tensor, got {bias.dtype}")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{op}: bias must have shape ({N},) (N), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"{op}: bias must be on x's device {x.device}, got {bias.device}")
    impl = select(op, backend, x.device)
    x2 = x.reshape(-1, K)  # a view whenever x's layout allows; the kernels take strides
    y = _HiF8MatmulFunction.apply(x2, bias, packed, impl)
    return y.reshape(*x.shape[:-1], N)


_CHUNK_ELEMS = 1 << 19  # decoded weight elements per block of rows (2 MiB of fp32: stays in L2/L3)


def _chunked_matmul(x, codes, scale, bias, decode) -> torch.Tensor:
    """x [M, K] @ (decode(codes) / scale)^T + bias, decoding a block of rows of codes at a time into fp32, so
    the dequantised weight never exists in full (at most ``_CHUNK_ELEMS`` decoded elements at once); fp32
    matmul, the scale divided out of the [M, N] result, one rounding to x's dtype at the end."""
    M, K = x.shape
    N = codes.shape[0]
    xf = x.to(torch.float32)
    rows = max(1, _CHUNK_ELEMS // max(K, 1))
    if rows >= N:
        out = xf.mm(decode(codes).t())
    else:
        out = torch.empty((M, N), dtype=torch.float32, device=x.device)
        for n0 in range(0, N, rows):
            out[:, n0 : n0 + rows] = xf.mm(decode(codes[n0 : n0 + rows]).t())
    out.div_(scale)  # () or [N]: broadcasts over columns; IEEE division
    if bias is not None:
        out.add_(bias.to(torch.float32))
    return out.to(x.dtype)


def _ref_decode_rows(codes: torch.Tensor) -> torch.Tensor:
    # a gather from the 256-entry table along dim 1 is the fastest pure-torch lookup (~4x advanced indexing)
    table = _decode_table(codes.device)
    return torch.gather(table.expand(codes.shape[0], 256), 1, codes.long())


def _ref_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _chunked_matmul(x, codes, scale, bias, _ref_decode_rows)


def _cpp_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # the same blocks, decoded by the C++ table op (parallel, no int64 index tensor)
    return _chunked_matmul(x, codes, scale, bias, lambda c: torch.ops.ospfn.hif8_decode(c, torch.float32))


register("hif8_matmul", "ref", _ref_matmul)
register("hif8_matmul", "cpp", _cpp_matmul)
register("hif8_matmul", "triton", "ospfn.kernels.hif8_matmul:matmul")
