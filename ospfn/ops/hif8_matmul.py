"""HiF8 weights stored in 8 bits and the W8A16 matmul over them (docs/hif8.md, "Real 8-bit weights").

* :class:`HiF8Tensor` / :func:`hif8_pack` / :func:`hif8_unpack` -- uint8 codes plus fp32 scale(s) per tensor
  or per row (output channel).
* :func:`hif8_matmul` -- ``x @ W_q^T + b`` straight from the packed codes (W8A16: the Triton kernel decodes the
  codes in registers and multiplies in the activation dtype with fp32 accumulation; ``ref`` / ``cpp`` decode
  blocks of rows through the 256-entry table and call torch matmul in fp32).

Example::

    >>> import torch
    >>> from ospfn.ops import hif8_pack, hif8_matmul
    >>> w = torch.tensor([[0.3, 0.2, -1.0], [2.0, 0.0, 0.7]])
    >>> p = hif8_pack(w)
    >>> p.codes.dtype, p.nbytes  # 6 one-byte codes + one fp32 scale
    (torch.uint8, 10)
    >>> hif8_matmul(torch.tensor([[1.0, -2.0, 0.5]]), p)
    tensor([[-0.6000,  2.3667]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ospfn.backends import register, select
from ospfn.ops.hif8 import GRANULARITIES, _check_scale_max, _decode_table, _tensor_arg, hif8_amax, hif8_decode, hif8_encode, AMAX_FLOOR

__all__ = ["HiF8Tensor", "hif8_pack", "hif8_unpack", "hif8_matmul"]

_MATMUL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# packed 8-bit weights


@dataclass(frozen=True, eq=False)
class HiF8Tensor:
    """A weight [N, K] stored in HiF8: one uint8 code per element plus fp32 scale(s).

    Fields:

    * ``codes``: uint8 [N, K], ``hif8_encode(W * s)`` (per row: row n, output channel n, uses ``s[n]``);
    * ``scale``: float32, shape ``()`` (granularity ``"tensor"``) or ``(N,)`` (``"row"``):
      ``s = scale_max / max(amax, 1e-8)`` with ``amax = max|W|`` (per tensor or per row), exactly the scale of
      :func:`ospfn.ops.hif8_quantize` (granularity ``"tensor"`` / ``"row"``);
    * ``granularity``: ``"tensor"`` or ``"row"`` (the word :func:`hif8_quantize` and :func:`hif8_amax` use);
    * ``dtype``: the dtype of the weight it was packed from (the default of :meth:`dequantize`);
    * ``scale_max``: 15 unless packed otherwise.

    Dequantisation: ``W_q = decode(codes) / s`` in fp32 (division correctly rounded, per row for "row"),
    then rounded once to the target dtype.  ``W_q`` in the packed-from dtype is bit for bit
    ``hif8_quantize(W, scale_max, granularity=granularity)``.
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
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"HiF8Tensor: granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
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

    ``granularity="tensor"``: one scale ``s = scale_max / max(max|W|, 1e-8)``; ``"row"``: one per row of W
    (output channel).  ``codes = hif8_encode(W * s)`` computed in fp32, so ``hif8_pack(W).dequantize()``
    equals ``hif8_quantize(W, scale_max)`` bit for bit (with the same ``granularity``).  No host sync.

    Example::

        >>> w = torch.tensor([[0.5, -1.0], [3.0, 0.25]])
        >>> p = hif8_pack(w, granularity="row")
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
    if granularity not in GRANULARITIES:
        raise ValueError(f"{op}: granularity must be one of {GRANULARITIES}, got {granularity!r}")
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
    """Forward through the selected backend; backward for x and bias (the packed weight is frozen).

    ``impl`` (the matmul) and ``decode`` (the backend's ``hif8_decode``) are chosen by the caller, outside the
    Function, so that neither direction dispatches through the backend registry: under ``torch.compile`` both
    are traced into the graph without side effects.
    """

    @staticmethod
    def forward(ctx, x2, bias, codes, scale, impl, decode):
        ctx.save_for_backward(codes, scale)
        ctx.decode = decode
        return impl(x2, codes, scale, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        dx = db = None
        if ctx.needs_input_grad[0]:
            codes, scale = ctx.saved_tensors
            s = scale if scale.dim() == 0 else scale[:, None]
            w = ctx.decode(codes, torch.float32).div(s)  # W_q = decode(codes) / s in fp32, as dequantize()
            dx = g.to(torch.float32).mm(w).to(g.dtype)
        if ctx.needs_input_grad[1]:
            db = g.sum(0)
        return dx, db, None, None, None, None


def hif8_matmul(
    x: torch.Tensor,
    packed: HiF8Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``y = x @ W_q^T + b`` with the weight read from its 8-bit codes (docs/hif8.md#real-8-bit-weights).

    ``x`` [..., K] in float32, float16 or bfloat16; ``packed`` from :func:`hif8_pack` with shape [N, K];
    ``bias`` [N] (any float dtype, added in fp32) -> ``y`` [..., N] in x's dtype.  ``W_q = decode(codes) / s``
    is never formed: the codes are decoded (exactly) into the activation dtype, multiplied with fp32
    accumulation, the scale is divided out per tensor / per output channel in the epilogue and the bias added
    there; the result is rounded once to x's dtype.  It equals ``x @ hif8_quantize(W, 15)^T + b`` (with the same granularity) up to fp32 summation order.

    Backends: ``triton`` (CUDA; W8A16 kernel, autotuned), ``ref`` (any device: blocks of rows decoded through
    the 256-entry table into fp32, torch matmul in fp32, so the fp32 weight never exists in full) and ``cpp``
    (CPU: the same, with the blocks decoded by the C++ table op).  Differentiable with respect to x and bias (not the
    packed weight): ``dx = g @ W_q``.

    Example::

        >>> w = torch.tensor([[1.0, 2.0, 3.0], [0.5, -0.5, 0.25]])
        >>> x = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]])
        >>> hif8_matmul(x, hif8_pack(w, granularity="row"), torch.tensor([0.0, 1.0]))
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
    decode = select("hif8_decode", backend, x.device)
    y = _HiF8MatmulFunction.apply(x2, bias, packed.codes, packed.scale, impl, decode)
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
