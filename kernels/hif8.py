"""Triton kernels for the HiF8 codec (installed as ``ospfn.kernels.hif8``).

The in-register codec (``encode_f32``, ``decode_f32``, ...) lives in :mod:`ospfn.kernels.common`, shared with the
HiF8 matmul; the host wrappers at the bottom are the ``triton`` backend of ``ospfn.ops.hif8_*``.  Each launch is
a ``torch.library`` custom op (``torch.ops.ospfn_triton.hif8_{encode,decode,round,quantize}``) with a fake
implementation, so ``torch.compile`` traces it as one opaque node without a graph break.  None of them is
differentiable (the ``ospfn.ops`` wrappers detach their inputs).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ospfn.kernels.common import (
    block_size,
    decode_f32,
    encode_f32,
    f64_to_f32_toward_zero,
    interpreting,
    quantize_f32,
    scale_from_amax,
    to_out_dtype,
)

AMAX_FLOOR = 1e-8  # amax is clamped to this before the scale is formed (docs/hif8.md)


# ----------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _encode_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, encode_f32(x).to(tl.uint8), mask=mask)


@triton.jit
def _decode_kernel(c_ptr, out_ptr, n, BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = tl.load(c_ptr + offs, mask=mask, other=0).to(tl.int32)
    tl.store(out_ptr + offs, to_out_dtype(decode_f32(c), out_ptr, EXACT_BF16), mask=mask)


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, to_out_dtype(decode_f32(encode_f32(x)), out_ptr, EXACT_BF16), mask=mask)


@triton.jit
def _amax_bits_kernel(x_ptr, amax_ptr, n, BLOCK: tl.constexpr):
    """amax_ptr[0] = max over |x| as int32 bit patterns (non-negative floats order like their bits; a NaN
    with its sign cleared orders above +Inf, so NaN propagates)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    tl.atomic_max(amax_ptr, tl.max(a, axis=0))


@triton.jit
def _quantize_tensor_kernel(
    x_ptr, out_ptr, amax_ptr, n, scale_max, BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr, AMAX_FLOOR: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    amax = tl.load(amax_ptr).to(tl.float32, bitcast=True)
    s = scale_from_amax(amax, scale_max, AMAX_FLOOR)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, to_out_dtype(quantize_f32(x, s), out_ptr, EXACT_BF16), mask=mask)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, out_ptr, amax_ptr, cols, scale_max,
    BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr, HAS_AMAX: tl.constexpr, AMAX_FLOOR: tl.constexpr,
):  # fmt: skip
    """One program per row: amax pass (or the given amax_ptr[row] with HAS_AMAX), then quantise pass (the row
    stays in L2 between the two)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * cols
    if HAS_AMAX:
        amax = tl.load(amax_ptr + row)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + base + offs, mask=offs < cols, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        amax = tl.max(acc, axis=0).to(tl.float32, bitcast=True)
    s = scale_from_amax(amax, scale_max, AMAX_FLOOR)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < cols
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + offs, to_out_dtype(quantize_f32(x, s), out_ptr, EXACT_BF16), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# launches (arguments validated by ospfn.ops.hif8)


def _block(n: int) -> int:
    # The interpreter pays per program, not per element: few, large programs there.
    return block_size(n, 1024, interp_cap=1 << 16)


def _prep(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float64:
        x = f64_to_f32_toward_zero(x)  # no double rounding, as the ref backend does
    return x.contiguous()


def _encode(x: torch.Tensor) -> torch.Tensor:
    xc = _prep(x)
    out = torch.empty(xc.shape, dtype=torch.uint8, device=xc.device)
    n = xc.numel()
    if n:
        BLOCK = _block(n)
        _encode_kernel[(triton.cdiv(n, BLOCK),)](xc, out, n, BLOCK=BLOCK)
    return out


def _decode(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cc = codes.contiguous()
    out = torch.empty(cc.shape, dtype=dtype, device=cc.device)
    n = cc.numel()
    if n:
        BLOCK = _block(n)
        _decode_kernel[(triton.cdiv(n, BLOCK),)](cc, out, n, BLOCK=BLOCK, EXACT_BF16=interpreting())
    return out


def _round(x: torch.Tensor) -> torch.Tensor:
    xc = _prep(x)
    out = torch.empty(xc.shape, dtype=x.dtype, device=xc.device)
    n = xc.numel()
    if n:
        BLOCK = _block(n)
        _round_kernel[(triton.cdiv(n, BLOCK),)](xc, out, n, BLOCK=BLOCK, EXACT_BF16=interpreting())
    return out


def _quantize(x: torch.Tensor, scale_max: float, rowwise: bool, amax: Optional[torch.Tensor]) -> torch.Tensor:
    xc = x.contiguous()
    out = torch.empty(xc.shape, dtype=xc.dtype, device=xc.device)
    n = xc.numel()
    if n == 0:
        return out
    if rowwise:
        cols = xc.shape[-1]
        rows = n // cols
        BLOCK = _block(cols) if interpreting() else min(max(16, triton.next_power_of_2(cols)), 4096)
        has_amax = amax is not None
        amax_arg = amax.contiguous() if has_amax else out  # out: an unused placeholder pointer
        _quantize_rows_kernel[(rows,)](
            xc, out, amax_arg, cols, scale_max,
            BLOCK=BLOCK, EXACT_BF16=interpreting(), HAS_AMAX=has_amax, AMAX_FLOOR=AMAX_FLOOR,
        )  # fmt: skip
    else:
        BLOCK = _block(n)
        grid = (triton.cdiv(n, BLOCK),)
        if amax is None:
            amax_bits = torch.zeros(1, dtype=torch.int32, device=xc.device)
            _amax_bits_kernel[grid](xc, amax_bits, n, BLOCK=BLOCK)
        else:
            amax_bits = amax.reshape(1).view(torch.int32)  # the same 4 bytes, read as the kernel expects
        _quantize_tensor_kernel[grid](
            xc, out, amax_bits, n, scale_max, BLOCK=BLOCK, EXACT_BF16=interpreting(), AMAX_FLOOR=AMAX_FLOOR
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# custom ops: torch.ops.ospfn_triton.hif8_*, opaque to torch.compile; the fakes give shapes and dtypes only
# (every output is a new contiguous tensor)

encode_op = torch.library.custom_op("ospfn_triton::hif8_encode", _encode, mutates_args=())
decode_op = torch.library.custom_op("ospfn_triton::hif8_decode", _decode, mutates_args=())
round_op = torch.library.custom_op("ospfn_triton::hif8_round", _round, mutates_args=())
quantize_op = torch.library.custom_op("ospfn_triton::hif8_quantize", _quantize, mutates_args=())


@encode_op.register_fake
def _(x):
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device)


@decode_op.register_fake
def _(codes, dtype):
    return torch.empty(codes.shape, dtype=dtype, device=codes.device)


@round_op.register_fake
def _(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@quantize_op.register_fake
def _(x, scale_max, rowwise, amax):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ----------------------------------------------------------------------------------------------------------
# the triton backend of ospfn.ops.hif8_* (arguments validated there)


def encode(x: torch.Tensor) -> torch.Tensor:
    return encode_op(x)


def decode(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return decode_op(codes, dtype)


def round_(x: torch.Tensor) -> torch.Tensor:
    return round_op(x)


def quantize(x: torch.Tensor, scale_max: float, rowwise: bool, amax: torch.Tensor | None = None) -> torch.Tensor:
    """``amax`` (optional, float32): a given amax, shape () or [rows, 1]-like with one element per row."""
    return quantize_op(x, float(scale_max), bool(rowwise), amax)
