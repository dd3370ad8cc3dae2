"""HiFloat8 (HiF8) codec and scaled fake quantisation (docs/hif8.md).

Public ops (each takes ``backend=None|"ref"|"cpp"|"triton"``, see :mod:`ospfn.backends`):

* :func:`hif8_encode` -- float tensor -> uint8 codes (round to nearest, ties away from zero, overflow to Inf)
* :func:`hif8_decode` -- codes -> exact values in the requested float dtype
* :func:`hif8_round` -- nearest HiF8 value, same dtype as the input
* :func:`hif8_quantize` -- scaled fake quant ``Q(x * s) / s`` with ``s = scale_max / max(amax, 1e-8)``
* :func:`hif8_amax` -- the fp32 amax that :func:`hif8_quantize` would use (per tensor or per row), on device,
  e.g. to all-reduce it over a process group and pass it back as ``hif8_quantize(..., amax=...)``

None of these is differentiable: they return tensors without autograd history (the straight-through
HiF8 linear is a separate op).

Example::

    >>> import torch, ospfn
    >>> codes = ospfn.ops.hif8_encode(torch.tensor([1.0, 15.0, -0.5, 40960.0]))
    >>> [hex(c) for c in codes.tolist()]
    ['0x8', '0x2f', '0x98', '0x6f']
    >>> ospfn.ops.hif8_decode(codes).tolist()
    [1.0, 15.0, -0.5, inf]
    >>> ospfn.ops.hif8_round(torch.tensor([3.3]))  # 3 mantissa bits near 1..16
    tensor([3.2500])
"""

from __future__ import annotations

import functools
import math

import torch

from ospfn.backends import register, select

__all__ = ["hif8_encode", "hif8_decode", "hif8_round", "hif8_quantize", "hif8_amax", "HIF8_MAX", "HIF8_NAN_CODE"]

HIF8_MAX = 32768.0  # largest finite value, 2^15
HIF8_NAN_CODE = 0x80
AMAX_FLOOR = 1e-8  # amax is clamped to this (as fp32) before the scale is formed

# dtypes the compiled backends take natively; other float dtypes (float8 variants) widen exactly to fp32
_NATIVE = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
GRANULARITIES = ("tensor", "row")  # per tensor, or per last-dim row (= output channel of a weight)


# ----------------------------------------------------------------------------------------------------------
# argument checks shared by every backend


def _tensor_arg(t: object, op: str, arg: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    return t


# fp32 rounding limits of a Python float: at or below 2^-150 it rounds to 0, at or above 2^128 - 2^103 to inf
_F32_ROUNDS_TO_ZERO = 2.0**-150
_F32_ROUNDS_TO_INF = 2.0**128 - 2.0**103


def _check_float(x: object, op: str, arg: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{op}: {arg} must be a floating-point tensor (float32, float16, bfloat16, float64, float8), got {x.dtype}"
        )
    x = x.detach()  # these ops are not differentiable; never record autograd history
    return x if x.dtype in _NATIVE else x.float()


def _check_scale_max(scale_max: object, op: str) -> float:
    if isinstance(scale_max, bool) or not isinstance(scale_max, (int, float)):
        raise TypeError(f"{op}: scale_max must be a Python number (finite, > 0), got {type(scale_max).__name__}")
    v = float(scale_max)
    # comparisons only (NaN fails them): math.isfinite breaks the graph when torch.compile(dynamic=True) traces
    # v as a SymFloat
    if not 0.0 < v < math.inf:
        raise ValueError(f"{op}: scale_max must be finite and > 0, got {scale_max!r}")
    if v <= _F32_ROUNDS_TO_ZERO or v >= _F32_ROUNDS_TO_INF:  # pure Python: no tensor, traceable
        raise ValueError(f"{op}: scale_max must be representable in float32 (1.2e-38 .. 3.4e38), got {scale_max!r}")
    return v


# ----------------------------------------------------------------------------------------------------------
# public API


def hif8_encode(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Encode a float tensor to HiF8 codes (``torch.uint8``, same shape).

    Round to nearest with ties away from zero; ``|x| >= 40960`` gives the Inf codes (0x6F / 0xEF); NaN gives
    0x80; ``-0.0`` and ``|x| < 2^-23`` give 0x00.  float64 inputs are rounded correctly (no double rounding).
    """
    x = _check_float(x, "hif8_encode")
    return select("hif8_encode", backend, x.device)(x)


def hif8_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32, *, backend: str | None = None) -> torch.Tensor:
    """Decode HiF8 codes (``torch.uint8``) to ``dtype``.  Every HiF8 value is exact in fp32, bf16 and fp16."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"hif8_decode: codes must be a torch.Tensor of dtype uint8, got {type(codes).__name__}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"hif8_decode: codes must have dtype torch.uint8 (HiF8 codes), got {codes.dtype}")
    if not isinstance(dtype, torch.dtype) or dtype not in _NATIVE:
        raise TypeError(f"hif8_decode: dtype must be one of float32, float64, float16, bfloat16, got {dtype!r}")
    return select("hif8_decode", backend, codes.device)(codes.detach(), dtype)


def hif8_round(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The nearest HiF8 value of every element (unscaled), in ``x``'s dtype: ``decode(encode(x))``."""
    dtype = x.dtype if isinstance(x, torch.Tensor) else None
    xn = _check_float(x, "hif8_round")
    out = select("hif8_round", backend, xn.device)(xn)
    return out if out.dtype == dtype else out.to(dtype)


def hif8_quantize(
    x: torch.Tensor,
    scale_max: float = 15.0,
    *,
    granularity: str = "tensor",
    amax: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled fake quantisation to HiF8, returned in ``x``'s dtype.

    In fp32: ``amax = max|x|`` (per tensor, or per last-dim row with ``granularity="row"``), ``s = scale_max /
    max(amax, 1e-8)``, result ``Q(x * s) / s`` where Q is :func:`hif8_round`.  amax and s stay on the device
    (no host synchronisation).  ``scale_max`` is 15 for activations/weights and 224 for gradients in OSP-Next.
    A NaN or Inf anywhere in a tensor (or row) makes that tensor's (row's) result NaN.

    ``amax`` (optional) replaces the computed amax: a float32 tensor on ``x``'s device of shape ``()`` for
    ``granularity="tensor"`` or ``x.shape[:-1] + (1,)`` for ``"row"`` -- typically :func:`hif8_amax` of ``x``
    all-reduced with MAX over a process group, so every rank quantises with the same scale.  It goes through
    the same ``max(amax, 1e-8)`` floor (a negative amax acts as 1e-8).  With a given amax only NaN elements
    give NaN, and elements with ``|x * s| >= 40960`` (possible when amax < max|x|) give +-Inf.

    Example::

        >>> x = torch.tensor([[0.1, -3.0], [7.5, 0.2]])
        >>> hif8_quantize(x).tolist()  # amax 7.5 -> s = 2
        [[0.1015625, -3.0], [7.5, 0.203125]]
        >>> hif8_quantize(x, amax=torch.tensor(30.0)).tolist()  # s = 0.5: the grid of a 4x larger tensor
        [[0.09375, -3.0], [7.5, 0.1875]]
    """
    dtype = x.dtype if isinstance(x, torch.Tensor) else None
    xn = _check_float(x, "hif8_quantize")
    sm = _check_scale_max(scale_max, "hif8_quantize")
    if granularity not in GRANULARITIES:
        raise ValueError(f"hif8_quantize: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "row" and xn.dim() == 0:
        raise ValueError("hif8_quantize: granularity='row' needs x with at least one dimension, got a 0-d tensor")
    if amax is not None:
        amax = _check_amax(amax, xn, granularity, "hif8_quantize")
    if xn.numel() == 0:
        return torch.empty_like(x)
    fn = select("hif8_quantize", backend, xn.device)
    out = fn(xn, sm, granularity == "row") if amax is None else fn(xn, sm, granularity == "row", amax)
    return out if out.dtype == dtype else out.to(dtype)


def _check_amax(amax: object, x: torch.Tensor, granularity: str, op: str) -> torch.Tensor:
    if not isinstance(amax, torch.Tensor):
        raise TypeError(f"{op}: amax must be a torch.Tensor of dtype float32 (or None), got {type(amax).__name__}")
    if amax.dtype != torch.float32:
        raise TypeError(f"{op}: amax must have dtype torch.float32, got {amax.dtype}")
    if amax.device != x.device:
        raise ValueError(f"{op}: amax must be on x's device {x.device}, got {amax.device}")
    want = () if granularity == "tensor" else tuple(x.shape[:-1]) + (1,)
    if tuple(amax.shape) != want:
        raise ValueError(
            f"{op}: amax for granularity={granularity!r} must have shape {want} "
            f"({'a 0-d tensor' if granularity == 'tensor' else 'x.shape[:-1] + (1,)'}), got {tuple(amax.shape)}"
        )
    return amax.detach()


def hif8_amax(x: torch.Tensor, granularity: str = "tensor") -> torch.Tensor:
    """The amax :func:`hif8_quantize` uses: ``max|x|`` as float32, on ``x``'s device, without a host sync.

    Shape ``()`` for ``granularity="tensor"``, ``x.shape[:-1] + (1,)`` for ``"row"``; NaN anywhere gives NaN
    (like the amax inside :func:`hif8_quantize`); an empty tensor (row) gives 0.  One fused reduction, no
    temporary copy of ``x``.  Not clamped: ``hif8_quantize`` applies the ``1e-8`` floor itself.

    Example::

        >>> x = torch.tensor([[1.0, -4.0], [0.5, 2.0]])
        >>> hif8_amax(x)
        tensor(4.)
        >>> hif8_amax(x, "row").flatten().tolist()
        [4.0, 2.0]
        >>> hif8_quantize(x, amax=hif8_amax(x)).equal(hif8_quantize(x))
        True
    """
    xn = _check_float(x, "hif8_amax")
    if granularity not in GRANULARITIES:
        raise ValueError(f"hif8_amax: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    # max commutes with the monotone cast to fp32, so float64 is reduced first and cast after (vector_norm
    # refuses a narrowing dtype=); narrower dtypes are widened inside the reduction kernel.
    kw = {} if xn.dtype == torch.float64 else {"dtype": torch.float32}
    if granularity == "row":
        if xn.dim() == 0:
            raise ValueError("hif8_amax: granularity='row' needs x with at least one dimension, got a 0-d tensor")
        if xn.shape[-1] == 0:
            return torch.zeros(xn.shape[:-1] + (1,), dtype=torch.float32, device=xn.device)
        return torch.linalg.vector_norm(xn, math.inf, dim=-1, keepdim=True, **kw).to(torch.float32)
    if xn.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=xn.device)
    return torch.linalg.vector_norm(xn, math.inf, **kw).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# ref backend: pure PyTorch integer arithmetic on the fp32 bit pattern (docs/hif8.md#rounding)


def _f64_to_f32_toward_zero(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounding toward zero.

    Every HiF8 value and every midpoint between neighbours is an fp32 number, and truncation never crosses
    an fp32 number, so encoding the truncated value rounds exactly as encoding the double would.
    """
    y = x.to(torch.float32)
    away = y.to(torch.float64).abs() > x.abs()
    return torch.where(away, torch.nextafter(y, torch.zeros_like(y)), y)


def _magnitude_code(E: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """7-bit code of 2^E * (1 + M / 2^m) (int32 tensors); E in [-22, 15]."""
    ae = E.abs()
    es = (E < 0).to(torch.int32)
    code = torch.where(ae >= 8, 0x60 | (es << 4) | ((ae - 8) << 1) | M,
           torch.where(ae >= 4, 0x40 | (es << 4) | ((ae - 4) << 2) | M,
           torch.where(ae >= 2, 0x20 | (es << 4) | ((ae - 2) << 3) | M,
           torch.where(ae == 1, 0x10 | (es << 3) | M, 0x08 | M))))  # fmt: skip
    return torch.where(E <= -16, E + 23, code)  # denormal band: value 2^(code - 23)


def _ref_encode(x: torch.Tensor) -> torch.Tensor:
    x32 = _f64_to_f32_toward_zero(x) if x.dtype == torch.float64 else x.to(torch.float32)
    b = x32.contiguous().view(torch.int32)
    a = b & 0x7FFFFFFF  # |x| bit pattern
    E = (a >> 23) - 127  # floor(log2|x|) for normal fp32 inputs
    ae = E.abs()
    m = torch.where(ae <= 3, 3, torch.where(ae <= 7, 2, torch.where(ae <= 15, 1, 0))).to(torch.int32)
    sig = (a & 0x7FFFFF) | 0x800000  # 1.f as a 24-bit integer
    shift = 23 - m
    q = (sig >> shift) + ((sig >> (shift - 1)) & 1)  # keep m bits, round half away from zero
    one = torch.ones_like(m)
    carry = q >> (m + 1)  # 1 when the mantissa rounded up into the next binade (value 2^(E+1))
    M = torch.where(carry == 1, 0, q - (one << m))
    mag = _magnitude_code(E + carry, M)
    mag = torch.where(E == -23, 1, mag)  # [2^-23, 2^-22) -> 2^-22
    mag = torch.where(a < 0x34000000, 0, mag)  # |x| < 2^-23 -> zero (fp32 subnormals included)
    mag = torch.where(a >= 0x47200000, 0x6F, mag)  # |x| >= 40960 -> Inf
    code = mag | (((b < 0) & (mag != 0)).to(torch.int32) << 7)
    code = torch.where(a > 0x7F800000, 0x80, code)  # NaN
    return code.to(torch.uint8).view(x.shape)


@functools.lru_cache(maxsize=None)
def _decode_table(device: torch.device) -> torch.Tensor:
    """The 256 decoded values as fp32, built from the bit layout (docs/hif8.md#bit-layout)."""
    c = torch.arange(256, dtype=torch.int32)
    a = c & 0x7F
    es = (a >> 4) & 1
    sgn = torch.where(es == 1, -1, 1)
    E = torch.where(a >= 0x60, sgn * (8 + ((a >> 1) & 7)),
        torch.where(a >= 0x40, sgn * (4 + ((a >> 2) & 3)),
        torch.where(a >= 0x20, sgn * (2 + ((a >> 3) & 1)),
        torch.where(a >= 0x10, torch.where((a & 0x08) != 0, -1, 1),
        torch.where(a >= 0x08, 0, a - 23)))))  # fmt: skip
    m = torch.where(a >= 0x60, 1, torch.where(a >= 0x40, 2, torch.where(a >= 0x08, 3, 0)))
    M = a & ((1 << m) - 1)
    M = torch.where(a < 0x08, 0, M)
    bits = ((c & 0x80) << 24) | ((E + 127) << 23) | (M << (23 - m))
    bits = torch.where(a == 0, 0, bits)  # +0
    bits = torch.where(c == 0x80, 0x7FC00000, bits)  # NaN
    bits = torch.where(a == 0x6F, ((c & 0x80) << 24) | 0x7F800000, bits)  # +-Inf
    return bits.to(torch.int32).view(torch.float32).to(device)


def _ref_decode(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _decode_table(codes.device)[codes.long()].to(dtype)


def _ref_round(x: torch.Tensor) -> torch.Tensor:
    return _ref_decode(_ref_encode(x), x.dtype)


def _ref_quantize(x: torch.Tensor, scale_max: float, rowwise: bool, amax: torch.Tensor | None = None) -> torch.Tensor:
    xf = x.to(torch.float32)
    if amax is None:
        amax = xf.abs().amax(dim=-1, keepdim=True) if rowwise else xf.abs().amax()
    # the literal, not AMAX_FLOOR: dynamo (torch 2.13, dynamic=True) mis-lifts a module float read inside an
    # autograd.Function when two of them share a graph
    denom = torch.where(amax < 1e-8, torch.full_like(amax, 1e-8), amax)  # keeps NaN
    s = torch.full_like(denom, scale_max).div(denom)  # correctly rounded fp32 division
    q = _ref_decode(_ref_encode(xf * s), torch.float32)
    return q.div(s).to(x.dtype)


register("hif8_encode", "ref", _ref_encode)
register("hif8_decode", "ref", _ref_decode)
register("hif8_round", "ref", _ref_round)
register("hif8_quantize", "ref", _ref_quantize)


# ----------------------------------------------------------------------------------------------------------
# cpp backend: torch.ops.ospfn.* from csrc/ops/hif8_ops.cpp


def _cpp_encode(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.ospfn.hif8_encode(x)


def _cpp_decode(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.ospfn.hif8_decode(codes, dtype)


def _cpp_round(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.ospfn.hif8_round(x)


def _cpp_quantize(x: torch.Tensor, scale_max: float, rowwise: bool, amax: torch.Tensor | None = None) -> torch.Tensor:
    if amax is None:
        return torch.ops.ospfn.hif8_quantize(x, scale_max, rowwise)
    return torch.ops.ospfn.hif8_quantize(x, scale_max, rowwise, amax)


register("hif8_encode", "cpp", _cpp_encode)
register("hif8_decode", "cpp", _cpp_decode)
register("hif8_round", "cpp", _cpp_round)
register("hif8_quantize", "cpp", _cpp_quantize)

# triton backend: kernels/hif8.py, imported on first use
register("hif8_encode", "triton", "ospfn.kernels.hif8:encode")
register("hif8_decode", "triton", "ospfn.kernels.hif8:decode")
register("hif8_round", "triton", "ospfn.kernels.hif8:round_")
register("hif8_quantize", "triton", "ospfn.kernels.hif8:quantize")
