"""An independent HiF8 oracle for the tests, written from docs/hif8.md#bit-layout and nothing else.

Decoding reads the bit strings of the spec table one code at a time in plain Python; encoding is
"nearest value by search over the sorted list of all values, ties away from zero" -- no bit tricks, no
shared code with ospfn.
"""

from __future__ import annotations

import math

import torch


def spec_decode(code: int) -> float:
    """Value of one HiF8 code, straight from the table of docs/hif8.md#bit-layout."""
    bits = format(code, "08b")
    sign = -1.0 if bits[0] == "1" else 1.0
    a = bits[1:]  # b6..b0
    if a == "0000000":
        return math.nan if sign < 0 else 0.0
    if a == "1101111":  # the slot of 1.5 * 2^15
        return sign * math.inf
    if a.startswith("11"):  # 11 es e2 e1 e0 m0
        es, e, man, m = a[2], a[3:6], a[6:], 1
        E = 8 + int(e, 2)
        E = -E if es == "1" else E
    elif a.startswith("10"):  # 10 es e1 e0 m1 m0
        es, e, man, m = a[2], a[3:5], a[5:], 2
        E = 4 + int(e, 2)
        E = -E if es == "1" else E
    elif a.startswith("01"):  # 01 es e0 m2 m1 m0
        es, e, man, m = a[2], a[3:4], a[4:], 3
        E = 2 + int(e, 2)
        E = -E if es == "1" else E
    elif a.startswith("001"):  # 001 es m2 m1 m0
        es, man, m = a[3], a[4:], 3
        E = -1 if es == "1" else 1
    elif a.startswith("0001"):  # 0001 m2 m1 m0
        man, m, E = a[4:], 3, 0
    else:  # 0000 m2 m1 m0: denormal 2^(M - 23)
        return sign * 2.0 ** (int(a[4:], 2) - 23)
    return sign * 2.0**E * (1 + int(man, 2) / 2**m)


TABLE = [spec_decode(c) for c in range(256)]
FINITE_CODES = [c for c in range(256) if math.isfinite(TABLE[c])]
CODE_OF = {}  # value -> code (0.0 -> 0x00)
for _c in FINITE_CODES:
    CODE_OF.setdefault(TABLE[_c], _c)
POSITIVE = sorted(v for v in TABLE if math.isfinite(v) and v > 0)
MAGNITUDES = torch.tensor([0.0] + POSITIVE, dtype=torch.float64)  # sorted, 127 entries
_MAG_CODES = torch.tensor([0x00] + [CODE_OF[v] for v in POSITIVE], dtype=torch.int64)
OVERFLOW = 40960.0  # midpoint between 32768 and the Inf slot


def oracle_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest HiF8 code of every element of a float tensor (evaluated exactly in float64)."""
    xd = x.detach().to(torch.float64).flatten()
    ax = xd.abs()
    idx = torch.searchsorted(MAGNITUDES, ax.clamp(max=POSITIVE[-1]), right=True) - 1
    idx = idx.clamp(0, len(MAGNITUDES) - 1)
    hi_idx = (idx + 1).clamp(max=len(MAGNITUDES) - 1)
    lo, hi = MAGNITUDES[idx], MAGNITUDES[hi_idx]
    mid = (lo + hi) / 2  # exact in float64
    pick = torch.where((ax >= mid) & (hi_idx > idx), hi_idx, idx)
    code = _MAG_CODES[pick]
    code = torch.where((xd < 0) & (code != 0), code | 0x80, code)
    code = torch.where(ax >= OVERFLOW, torch.where(xd < 0, 0xEF, 0x6F), code)
    code = torch.where(torch.isnan(xd), 0x80, code)
    return code.to(torch.uint8).view(x.shape)


def oracle_value(x: torch.Tensor) -> torch.Tensor:
    """Nearest HiF8 value as float64."""
    table = torch.tensor(TABLE, dtype=torch.float64)
    return table[oracle_encode(x).long()]


def oracle_quantize(x: torch.Tensor, scale_max: float, rowwise: bool) -> torch.Tensor:
    """docs/hif8.md#scaled-fake-quantisation evaluated step by step in fp32 (the rounding Q from the oracle above)."""
    xf = x.detach().to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True) if rowwise else xf.abs().amax()
    amax = torch.where(amax < torch.tensor(1e-8, dtype=torch.float32), torch.tensor(1e-8, dtype=torch.float32), amax)
    s = torch.tensor(scale_max, dtype=torch.float32) / amax  # tensor / tensor: IEEE division
    q = oracle_value(xf * s).to(torch.float32)
    return (q / s).to(x.dtype)


# helpers shared by the HiF8 linear / matmul tests


def rand(shape, seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def q(t, scale_max, rowwise=False):
    return oracle_quantize(t, scale_max, rowwise)


def oracle_quantize_amax(x: torch.Tensor, scale_max: float, amax: torch.Tensor) -> torch.Tensor:
    """docs/hif8.md#scaled-fake-quantisation with a given amax (fp32): s = M / max(amax, 1e-8); Q(x s) / s."""
    xf = x.to(torch.float32)
    floor = torch.tensor(1e-8, dtype=torch.float32)
    s = torch.tensor(scale_max, dtype=torch.float32) / torch.where(amax < floor, floor, amax)
    return (oracle_value(xf * s).to(torch.float32) / s).to(x.dtype)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    bad = (got != want) & ~nan
    assert not bad.any(), f"{int(bad.sum())} mismatches, e.g. got {got[bad][:5].tolist()} want {want[bad][:5].tolist()}"
