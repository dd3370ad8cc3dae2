"""HiF8 codec (docs/hif8.md): every backend against the independent oracle in hif8_oracle.py."""

import math

import pytest
import torch
from conftest import backend_device
from hif8_oracle import CODE_OF, FINITE_CODES, POSITIVE, TABLE, oracle_encode

from ospfn.ops import hif8_decode, hif8_encode, hif8_round

F32_ULP_DOWN = lambda v: float(torch.nextafter(torch.tensor(v, dtype=torch.float32), torch.tensor(0.0)))  # noqa: E731


def enc(x: torch.Tensor, backend: str) -> torch.Tensor:
    return hif8_encode(x.to(backend_device(backend)), backend=backend).cpu()


def dec(c: torch.Tensor, backend: str, dtype=torch.float32) -> torch.Tensor:
    return hif8_decode(c.to(backend_device(backend)), dtype, backend=backend).cpu()


def rnd(x: torch.Tensor, backend: str) -> torch.Tensor:
    return hif8_round(x.to(backend_device(backend)), backend=backend).cpu()


def assert_codes_equal(got: torch.Tensor, want: torch.Tensor, inputs: torch.Tensor) -> None:
    assert got.dtype == torch.uint8 and got.shape == want.shape
    bad = (got != want).nonzero().flatten()
    if len(bad):
        i = bad[:8]
        pytest.fail(
            f"{len(bad)} wrong codes, e.g. x={inputs.flatten()[i].tolist()} got={[hex(v) for v in got.flatten()[i].tolist()]} "
            f"want={[hex(v) for v in want.flatten()[i].tolist()]}"
        )


# ------------------------------------------------------------------------------------------------ the table


def test_oracle_census():
    """The oracle itself reproduces the census and checkpoints of docs/hif8.md#value-table-summary."""
    finite = [v for v in TABLE if math.isfinite(v)]
    assert len(finite) == 253
    assert sum(v > 0 for v in finite) == 126 and sum(v < 0 for v in finite) == 126 and finite.count(0.0) == 1
    assert sum(math.isinf(v) for v in TABLE) == 2 and sum(math.isnan(v) for v in TABLE) == 1
    assert max(finite) == 2**15 and min(v for v in finite if v > 0) == 2**-22
    assert len({math.floor(math.log2(v)) for v in finite if v > 0}) == 38


CHECKPOINTS = {
    1.0: 0x08, 2.0: 0x10, 0.5: 0x18, 15.0: 0x2F, 16.0: 0x40, 224.0: 0x4F, 256.0: 0x60, 32768.0: 0x6E,
    2.0**-15: 0x7E, 1.5 * 2.0**-15: 0x7F, 2.0**-22: 0x01, -1.0: 0x88,
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_decode_all_256_codes(backend, dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    got = dec(codes, backend, dtype)
    assert got.dtype == dtype
    want = torch.tensor(TABLE, dtype=torch.float64)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    assert torch.equal(got[ok].to(torch.float64), want[ok]), "decoded values are not exact"
    vals = got.to(torch.float64)
    assert int(torch.isfinite(vals).sum()) == 253 and int(torch.isinf(vals).sum()) == 2
    assert int((vals > 0).logical_and(torch.isfinite(vals)).sum()) == 126
    assert int((vals < 0).logical_and(torch.isfinite(vals)).sum()) == 126
    assert vals[0x6F] == math.inf and vals[0xEF] == -math.inf and math.isnan(vals[0x80])
    for value, code in CHECKPOINTS.items():
        assert vals[code] == value, f"code {code:#x} decodes to {vals[code]}, spec says {value}"


def test_checkpoints_encode(backend):
    x = torch.tensor(list(CHECKPOINTS), dtype=torch.float32)
    assert enc(x, backend).tolist() == list(CHECKPOINTS.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_encode_decode_roundtrip(backend, dtype):
    codes = torch.tensor(FINITE_CODES, dtype=torch.uint8)
    values = torch.tensor([TABLE[c] for c in FINITE_CODES], dtype=torch.float64).to(dtype)
    want = torch.tensor([CODE_OF[TABLE[c]] for c in FINITE_CODES], dtype=torch.uint8)
    assert_codes_equal(enc(values, backend), want, values)
    # decode(encode(decode(c))) == decode(c)
    assert torch.equal(dec(enc(dec(codes, backend), backend), backend), dec(codes, backend))


def test_negation_flips_bit7(backend):
    x = torch.tensor(POSITIVE, dtype=torch.float32)
    pos, neg = enc(x, backend), enc(-x, backend)
    assert torch.equal(neg, pos | 0x80)


# ------------------------------------------------------------------------------------------------ rounding


def _neighbour_pairs():
    lo = torch.tensor(POSITIVE[:-1], dtype=torch.float64)
    hi = torch.tensor(POSITIVE[1:], dtype=torch.float64)
    return lo, hi


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_midpoints_round_away_from_zero(backend, sign):
    """For every adjacent pair: the midpoint goes away from zero, one fp32 ulp inside goes to the nearer."""
    lo, hi = _neighbour_pairs()
    mid = ((lo + hi) / 2).to(torch.float32)
    assert torch.equal(mid.to(torch.float64), (lo + hi) / 2), "midpoints are fp32 numbers"
    lo_code = torch.tensor([CODE_OF[sign * v] for v in lo.tolist()], dtype=torch.uint8)
    hi_code = torch.tensor([CODE_OF[sign * v] for v in hi.tolist()], dtype=torch.uint8)
    below = torch.nextafter(mid, torch.zeros_like(mid))
    above = torch.nextafter(mid, torch.full_like(mid, math.inf))
    assert_codes_equal(enc(sign * mid, backend), hi_code, sign * mid)
    assert_codes_equal(enc(sign * below, backend), lo_code, sign * below)
    assert_codes_equal(enc(sign * above, backend), hi_code, sign * above)
    # one ulp inside each value stays on it
    assert_codes_equal(enc(sign * torch.nextafter(hi.float(), mid), backend), hi_code, hi)
    assert_codes_equal(enc(sign * torch.nextafter(lo.float(), mid), backend), lo_code, lo)


def test_float64_midpoints_no_double_rounding(backend):
    """A double just below a midpoint rounds to the nearer (lower) value even though it is closer to the
    midpoint than fp32 can resolve: a backend that first rounds to fp32 to nearest would go up."""
    lo, hi = _neighbour_pairs()
    mid = (lo + hi) / 2
    just_below = mid - mid * 2.0**-40
    just_above = mid + mid * 2.0**-40
    lo_code = torch.tensor([CODE_OF[v] for v in lo.tolist()], dtype=torch.uint8)
    hi_code = torch.tensor([CODE_OF[v] for v in hi.tolist()], dtype=torch.uint8)
    assert_codes_equal(enc(just_below, backend), lo_code, just_below)
    assert_codes_equal(enc(just_above, backend), hi_code, just_above)
    assert_codes_equal(enc(-just_below, backend), lo_code | 0x80, -just_below)
    assert torch.equal(rnd(just_below, backend), lo)


def test_edges(backend):
    t23 = 2.0**-23
    cases = {
        t23: 0x01,
        F32_ULP_DOWN(t23): 0x00,
        -t23: 0x81,
        -F32_ULP_DOWN(t23): 0x00,  # tiny negatives go to the unsigned zero
        40960.0: 0x6F,
        F32_ULP_DOWN(40960.0): 0x6E,
        -40960.0: 0xEF,
        -F32_ULP_DOWN(40960.0): 0xEE,
        32768.0: 0x6E,
        3.4e38: 0x6F,
        math.inf: 0x6F,
        -math.inf: 0xEF,
        math.nan: 0x80,
        -math.nan: 0x80,
        0.0: 0x00,
        1e-45: 0x00,  # fp32 subnormal
        -1e-45: 0x00,
        2.0**-16 * 1.5: 0x7E,  # denormal band is powers of two only: 1.5 * 2^-16 ties away to 2^-15
    }
    # -0.0 == 0.0 as a dict key, so it is appended here: HiF8 has one zero, 0x80 is NaN
    x = torch.tensor([*cases, -0.0], dtype=torch.float32)
    want = torch.tensor([*cases.values(), 0x00], dtype=torch.uint8)
    assert_codes_equal(enc(x, backend), want, x)
    assert_codes_equal(enc(x.double(), backend), want, x)


def test_every_rounding_class(backend):
    """Exhaustive over the decision structure: for every one of the 4096 values of the top 12 bits of |x|
    (exponent + 4 mantissa bits, which decide ties-away rounding), the low 19 bits at their extremes and
    around the half point, both signs."""
    hi = torch.arange(4096, dtype=torch.int64) << 19
    low = torch.tensor([0, 1, 0x3FFFF, 0x40000, 0x40001, 0x7FFFF], dtype=torch.int64)
    bits = (hi[:, None] | low[None, :]).flatten()
    bits = bits[(bits & 0x7FFFFFFF) <= 0x7F800000]  # NaN payloads are checked elsewhere
    bits = torch.cat([bits, bits | (1 << 31)])
    x = bits.to(torch.int32).view(torch.float32)
    assert_codes_equal(enc(x, backend), oracle_encode(x), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_input(backend, dtype):
    """All 65536 bit patterns of bf16 and fp16 (NaNs, Infs and subnormals included)."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    assert_codes_equal(enc(x, backend), oracle_encode(x), x)
    r = rnd(x, backend)
    assert r.dtype == dtype
    want = torch.tensor(TABLE, dtype=torch.float64)[oracle_encode(x).long()].to(dtype)
    assert torch.equal(torch.isnan(r), torch.isnan(want))
    assert torch.equal(r[~torch.isnan(r)], want[~torch.isnan(want)])


def random_f32(n: int, seed: int) -> torch.Tensor:
    """Random fp32 covering every binade, fp32 subnormals, +-Inf, NaNs and exact HiF8 values."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32).clone()
    k = n // 8
    x[:k] = torch.randn(k, generator=g) * 2.0 ** torch.randint(-30, 20, (k,), generator=g).float()
    x[k : 2 * k] = torch.tensor(TABLE, dtype=torch.float32)[torch.randint(0, 256, (k,), generator=g)]
    x[2 * k : 2 * k + 64] = torch.tensor([math.inf, -math.inf, math.nan, 1e-40, -1e-40, 0.0, -0.0, 1e-45] * 8)
    return x[torch.randperm(n, generator=g)]


def test_random_inputs_vs_oracle(backend):
    x = random_f32(10**6, seed=1)
    assert_codes_equal(enc(x, backend), oracle_encode(x), x)


def test_monotone_on_sorted_inputs(backend):
    g = torch.Generator().manual_seed(2)
    mag = 2.0 ** (torch.rand(10**6, generator=g, dtype=torch.float64) * 50 - 30)  # 2^-30 .. 2^20
    sign = torch.where(torch.rand(10**6, generator=g) < 0.5, -1.0, 1.0).double()
    x = (mag * sign).float().sort().values
    v = dec(enc(x, backend), backend).double()
    assert bool((v[1:] >= v[:-1]).all()), "decode(encode(x)) is not monotone"
    assert v[0] == -math.inf and v[-1] == math.inf  # the range overflows at both ends


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_round_keeps_dtype_and_equals_decode_encode(backend, dtype):
    x = random_f32(4096, seed=3).to(dtype)
    r = rnd(x, backend)
    assert r.dtype == dtype and r.shape == x.shape
    want = torch.tensor(TABLE, dtype=torch.float64)[oracle_encode(x).long()].to(dtype)
    assert torch.equal(torch.isnan(r), torch.isnan(want))
    assert torch.equal(r[~torch.isnan(r)], want[~torch.isnan(want)])


def test_float8_inputs_widen_exactly(backend):
    x = torch.randn(512).to(torch.float8_e4m3fn)
    assert_codes_equal(enc(x, backend), oracle_encode(x.float()), x.float())


def test_shapes_and_noncontiguous(backend):
    x = random_f32(6 * 7 * 5, seed=4).view(6, 7, 5).transpose(0, 2)  # non-contiguous
    c = enc(x, backend)
    assert c.shape == x.shape
    assert torch.equal(c, oracle_encode(x))
    assert enc(torch.empty(0, 3), backend).shape == (0, 3)
    assert enc(torch.tensor(2.0), backend).shape == ()


def test_backends_agree_bit_for_bit(fast_backend):
    """10^6 random inputs including subnormals, +-Inf and NaN: codes and rounded values equal ref's."""
    x = random_f32(10**6, seed=5)
    ref = hif8_encode(x, backend="ref")
    assert torch.equal(enc(x, fast_backend), ref)
    r_ref = hif8_round(x, backend="ref")
    r = rnd(x, fast_backend)
    nan = torch.isnan(r_ref)
    assert torch.equal(torch.isnan(r), nan)
    assert torch.equal(r[~nan].view(torch.int32), r_ref[~nan].view(torch.int32))


def test_cpp_table_free_path_matches():
    """The scalar header path used by the Ascend kernels (no lookup table) equals the table path."""
    from conftest import require

    require("cpp")
    x = random_f32(10**5, seed=6)
    assert torch.equal(torch.ops.ospfn._hif8_encode_arith(x), oracle_encode(x))
    h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert torch.equal(torch.ops.ospfn._hif8_encode_arith(h), oracle_encode(h))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_encode_rejects_non_float(dtype):
    with pytest.raises(TypeError, match=r"hif8_encode: x must be a floating-point tensor"):
        hif8_encode(torch.zeros(3, dtype=dtype))
    with pytest.raises(TypeError, match=r"hif8_round: x must be a floating-point tensor"):
        hif8_round(torch.zeros(3, dtype=dtype))


def test_encode_rejects_non_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        hif8_encode([1.0, 2.0])


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float32])
def test_decode_rejects_non_uint8(dtype):
    with pytest.raises(TypeError, match=r"hif8_decode: codes must have dtype torch.uint8"):
        hif8_decode(torch.zeros(3, dtype=dtype))


def test_decode_rejects_bad_dtype():
    with pytest.raises(TypeError, match=r"hif8_decode: dtype must be one of"):
        hif8_decode(torch.zeros(3, dtype=torch.uint8), torch.int32)
