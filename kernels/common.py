"""Shared pieces of the Triton layer (``ospfn.kernels.common``).

``ospfn.kernels`` is the Triton layer only: it depends on triton, torch and :func:`ospfn.backends.interpreting`,
never on ``ospfn.ops`` (which loads the kernels lazily, by name, through the backend registry).  Arguments
reach the kernels already validated by ``ospfn.ops``; constants the kernels need are defined in the kernel
modules themselves.

Here:

* ``@triton.jit`` helpers used by more than one kernel module: the in-register HiF8 codec
  (:func:`encode_f32`, :func:`decode_f32`, :func:`quantize_f32`, :func:`scale_from_amax`) and
  :func:`to_out_dtype`, the round-to-nearest-even cast to an output pointer's element type;
* host helpers: :func:`interpreting`, :func:`block_size` (launch blocks: fixed on a GPU, one big block under
  the interpreter), :func:`f64_to_f32_toward_zero`.

The codec is integer arithmetic only (no log2, no LUT gather): the same algorithm as ``csrc/hif8/hif8.h`` and
the ``ref`` backend of ``ospfn.ops.hif8``, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ospfn.backends import interpreting

__all__ = [
    "interpreting",
    "block_size",
    "f64_to_f32_toward_zero",
    "encode_f32",
    "decode_f32",
    "quantize_f32",
    "scale_from_amax",
    "to_out_dtype",
]

# ----------------------------------------------------------------------------------------------------------
# host helpers


def block_size(n: int, cuda_block: int, interp_cap: int | None = None) -> int:
    """BLOCK for a loop or grid over ``n`` items: ``cuda_block`` on a GPU; under the interpreter, which pays per
    program and per loop iteration rather than per element, one block covering all ``n`` (a power of two >= 16,
    at most ``interp_cap`` if given)."""
    if not interpreting():
        return cuda_block
    b = max(16, triton.next_power_of_2(max(n, 1)))
    return b if interp_cap is None else min(b, interp_cap)


def f64_to_f32_toward_zero(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounded toward zero.

    Every HiF8 value and every midpoint between neighbours is an fp32 number, and truncation never crosses an
    fp32 number, so encoding the truncated value rounds exactly as encoding the double would.
    """
    y = x.to(torch.float32)
    away = y.to(torch.float64).abs() > x.abs()
    return torch.where(away, torch.nextafter(y, torch.zeros_like(y)), y)


# ----------------------------------------------------------------------------------------------------------
# HiF8 codec in registers (docs/hif8.md)


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
def scale_from_amax(amax, scale_max, AMAX_FLOOR: tl.constexpr):
    """``scale_max / max(amax, AMAX_FLOOR)`` in fp32, correctly rounded; a NaN amax stays NaN."""
    denom = tl.where(amax < AMAX_FLOOR, AMAX_FLOOR, amax)
    return tl.math.div_rn(scale_max, denom)


# ----------------------------------------------------------------------------------------------------------
# output casts


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
