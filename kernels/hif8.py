"""Triton kernels for the HiF8 codec (installed as ``ospfn.kernels.hif8``).

The ``@triton.jit`` helpers :func:`encode_f32` and :func:`decode_f32` are the in-register codec that other
kernels (HiF8 matmul, fused quantisation) reuse; the host wrappers at the bottom are the ``triton`` backend of
``ospfn.ops.hif8_*``.  Integer arithmetic only (no log2, no LUT gather): the same algorithm as
``csrc/hif8/hif8.h`` and the ``ref`` backend, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ospfn.backends import interpreting


@triton.jit
def _magnitude_code(E, M):
    """7-bit code of 2^E * (1 + M / 2^m) for int32 tensors E in [-22, 15]."""
    ae = tl.abs(E)
    es = (E < 0).to(tl.int32)
    code = tl.where(
        ae >= 8,
        0x60 | (es << 4) | ((ae - 8) << 1) | M,
        tl.where(
            ae >= 4,
            0x40 | (es << 4) | ((ae - 4) << 2) | M,
            tl.where(ae >= 2, 0x20 | (es << 4) | ((ae - 2) << 3) | M, tl.where(ae == 1, 0x10 | (es << 3) | M, 0x08 | M)),
        ),
    )
    return tl.where(E <= -16, E + 23, code)


@triton.jit
def encode_f32(x):
    """fp32 tensor -> int32 tensor of HiF8 codes (0..255); round to nearest, ties away from zero."""
    b = x.to(tl.int32, bitcast=True)
    a = b & 0x7FFFFFFF
    E = (a >> 23) - 127
    ae = tl.abs(E)
    m = tl.where(ae <= 3, 3, tl.where(ae <= 7, 2, tl.where(ae <= 15, 1, 0)))
    sig = (a & 0x7FFFFF) | 0x800000
    shift = 23 - m
    q = (sig >> shift) + ((sig >> (shift - 1)) & 1)
    carry = q >> (m + 1)
    M = tl.where(carry == 1, 0, q - (1 << m))
    mag = _magnitude_code(E + carry, M)
    mag = tl.where(E == -23, 1, mag)
    mag = tl.where(a < 0x34000000, 0, mag)
    mag = tl.where(a >= 0x47200000, 0x6F, mag)
    code = mag | (((b < 0) & (mag != 0)).to(tl.int32) << 7)
    return tl.where(a > 0x7F800000, 0x80, code)


@triton.jit
def decode_f32(c):
    """int32 tensor of codes (0..255) -> exact fp32 values (canonical NaN for 0x80)."""
    a = c & 0x7F
    neg = (c & 0x80) != 0
    es = (a >> 4) & 1
    sgn = tl.where(es == 1, -1, 1)
    E = tl.where(
        a >= 0x60,
        sgn * (8 + ((a >> 1) & 7)),
        tl.where(
            a >= 0x40,
            sgn * (4 + ((a >> 2) & 3)),
            tl.where(
                a >= 0x20,
                sgn * (2 + ((a >> 3) & 1)),
                tl.where(a >= 0x10, tl.where((a & 0x08) != 0, -1, 1), tl.where(a >= 0x08, 0, a - 23)),
            ),
        ),
    )
    m = tl.where(a >= 0x60, 1, tl.where(a >= 0x40, 2, tl.where(a >= 0x08, 3, 0)))
    M = tl.where(a < 0x08, 0, a & ((1 << m) - 1))
    bits = ((E + 127) << 23) | (M << (23 - m))
    bits = tl.where(a == 0x6F, 0x7F800000, bits)
    bits = tl.where(a == 0, 0, bits)
    val = bits.to(tl.float32, bitcast=True)
    val = tl.where(neg, -val, val)
    return tl.where(c == 0x80, float("nan"), val)


@triton.jit
def quantize_f32(x, s):
    """Q(x * s) / s in fp32 with correctly rounded division (matches ref/cpp bit for bit)."""
    q = decode_f32(encode_f32(x * s))
    return tl.math.div_rn(q, s)


@triton.jit
def scale_from_amax(amax, scale_max):
    denom = tl.where(amax < 1e-8, 1e-8, amax)  # keeps NaN
    return tl.math.div_rn(scale_max, denom)


@triton.jit
def to_out_dtype(val, out_ptr, EXACT_BF16: tl.constexpr):
    """Cast fp32 values to the output pointer's element type with round-to-nearest-even.

    EXACT_BF16 does the fp32 -> bf16 rounding with integer arithmetic; the wrappers set it under the Triton
    interpreter, whose own bf16 cast truncates.  On a GPU the native cvt.rn does the same rounding.
    """
    if EXACT_BF16 and out_ptr.dtype.element_ty == tl.bfloat16:
        b = val.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        b = tl.where(val != val, 0x7FC00000, b)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return val.to(out_ptr.dtype.element_ty)


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
def _quantize_tensor_kernel(x_ptr, out_ptr, amax_ptr, n, scale_max, BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    amax = tl.load(amax_ptr).to(tl.float32, bitcast=True)
    s = scale_from_amax(amax, scale_max)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, to_out_dtype(quantize_f32(x, s), out_ptr, EXACT_BF16), mask=mask)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, out_ptr, amax_ptr, cols, scale_max, BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr, HAS_AMAX: tl.constexpr
):
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
    s = scale_from_amax(amax, scale_max)
    for start in range(0, cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < cols
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + offs, to_out_dtype(quantize_f32(x, s), out_ptr, EXACT_BF16), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# host wrappers (the triton backend of ospfn.ops.hif8_*)


def _block(n: int) -> int:
    # The interpreter pays per program, not per element: use few, large programs there.
    if interpreting():
        return max(16, min(1 << 16, triton.next_power_of_2(max(n, 1))))
    return 1024


def _prep(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float64:
        # round toward zero into fp32 (no double rounding), as the ref backend does
        from ospfn.ops.hif8 import _f64_to_f32_toward_zero

        x = _f64_to_f32_toward_zero(x)
    return x.contiguous()


def encode(x: torch.Tensor) -> torch.Tensor:
    xc = _prep(x)
    out = torch.empty(xc.shape, dtype=torch.uint8, device=xc.device)
    n = xc.numel()
    if n:
        BLOCK = _block(n)
        _encode_kernel[(triton.cdiv(n, BLOCK),)](xc, out, n, BLOCK=BLOCK)
    return out


def decode(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cc = codes.contiguous()
    out = torch.empty(cc.shape, dtype=dtype, device=cc.device)
    n = cc.numel()
    if n:
        BLOCK = _block(n)
        _decode_kernel[(triton.cdiv(n, BLOCK),)](cc, out, n, BLOCK=BLOCK, EXACT_BF16=interpreting())
    return out


def round_(x: torch.Tensor) -> torch.Tensor:
    xc = _prep(x)
    out = torch.empty(xc.shape, dtype=x.dtype, device=xc.device)
    n = xc.numel()
    if n:
        BLOCK = _block(n)
        _round_kernel[(triton.cdiv(n, BLOCK),)](xc, out, n, BLOCK=BLOCK, EXACT_BF16=interpreting())
    return out


def quantize(x: torch.Tensor, scale_max: float, rowwise: bool, amax: torch.Tensor | None = None) -> torch.Tensor:
    """``amax`` (optional, float32): a given amax, shape () or [rows, 1]-like with one element per row."""
    xc = x.contiguous()
    out = torch.empty_like(xc)
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
            xc, out, amax_arg, cols, scale_max, BLOCK=BLOCK, EXACT_BF16=interpreting(), HAS_AMAX=has_amax
        )
    else:
        BLOCK = _block(n)
        grid = (triton.cdiv(n, BLOCK),)
        if amax is None:
            amax_bits = torch.zeros(1, dtype=torch.int32, device=xc.device)
            _amax_bits_kernel[grid](xc, amax_bits, n, BLOCK=BLOCK)
        else:
            amax_bits = amax.reshape(1).view(torch.int32)  # the same 4 bytes, read as the kernel expects
        _quantize_tensor_kernel[grid](xc, out, amax_bits, n, scale_max, BLOCK=BLOCK, EXACT_BF16=interpreting())
    return out
