"""The Ascend C kernels (csrc/ascend, docs/npu.md#ascend-c-kernels) against the ``ref`` backend, bit for bit.

Here the kernels run on the CPU shim of the Ascend C API (``ospfn._ascend_sim``): every block in turn, with the
shim checking queue pairing, UB budget, DataCopy alignment, pipe synchronisation and that every output byte
is written exactly once.  The tests marked ``npu`` run the same comparisons on an Ascend NPU through
torch_npu and ``ospfn._npu``; they are skipped elsewhere (nothing here has run on one yet).
"""

import importlib.util
import math

import pytest
import torch

from ospfn import backends
from ospfn.ops import hif8_decode, hif8_encode, hif8_quantize, hif8_round, skiparse_fold, skiparse_switch, skiparse_unfold
from ospfn.ops.hif8 import hif8_amax
from ospfn.ops.skiparse import skiparse_layout

try:
    from ospfn import _ascend_sim as sim
except ImportError as e:  # the suite covers the simulator: fail loudly, never skip
    pytest.fail(f"ospfn._ascend_sim is not built ({e}): pip install --no-build-isolation -e .", pytrace=False)

SMALL_UB, SMALL_CORES = 2048, 3  # tiny tiles, so every size class stays small
DEFAULT_UB = sim.BUILD_INFO["default_ub_bytes"] - sim.BUILD_INFO["ub_reserve"]
DEFAULT_CORES = sim.BUILD_INFO["default_cores"]
ESIZE = {torch.float32: 4, torch.bfloat16: 2}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float64: torch.int64}


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bit patterns (so -0.0 != +0.0), NaN positions equal (a NaN's payload is not part of the contract:
    torch's own float -> bfloat16 casts give 0x7FC0 or 0xFFFF depending on the code path)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if not got.dtype.is_floating_point:
        assert torch.equal(got, want)
        return
    gn, wn = got.isnan(), want.isnan()
    assert torch.equal(gn, wn), f"NaN positions differ at {torch.nonzero(gn != wn)[:5].tolist()}"
    gi, wi = got.view(INT_VIEW[got.dtype])[~gn], want.view(INT_VIEW[want.dtype])[~wn]
    bad = torch.nonzero(gi != wi)
    assert bad.numel() == 0, f"{bad.numel()} elements differ, first: got {got[~gn][bad[:3, 0]].tolist()} want {want[~wn][bad[:3, 0]].tolist()}"


# ----------------------------------------------------------------------------------------------------------
# inputs


def hif8_grid_points() -> torch.Tensor:
    """Every finite HiF8 value, the midpoints between neighbours (ties: away from zero) and their fp32
    neighbours, the overflow threshold 40960 and the underflow threshold 2^-23 with their neighbours."""
    vals = hif8_decode(torch.arange(256, dtype=torch.uint8), backend="ref")
    pos = torch.sort(vals[torch.isfinite(vals) & (vals > 0)]).values.double()
    mids = ((pos[1:] + pos[:-1]) / 2).float()
    pts = torch.cat([pos.float(), mids, torch.tensor([40960.0, 2.0**-23, 2.0**-24, 3.0 * 2.0**-24])])
    near = torch.cat([pts, torch.nextafter(pts, torch.zeros_like(pts)), torch.nextafter(pts, torch.full_like(pts, math.inf))])
    return torch.cat([near, -near])


SPECIALS = [0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 3.4028234663852886e38, -3.4028234663852886e38,
            1e-45, -1e-45, 1.1754942106924411e-38, 2.0**-126, 40959.996, 40960.0, 32768.0, 49152.0, 1.5, -1.5]  # fmt: skip


def sample(n: int, dtype: torch.dtype, seed: int, specials: bool = True) -> torch.Tensor:
    """Random magnitudes over 1e-9 .. 1e6 with signs, HiF8 grid points and specials sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-9, 6, (n,), generator=g).float()
    if n and specials:
        extra = torch.cat([torch.tensor(SPECIALS), hif8_grid_points()])
        idx = torch.randint(0, n, (min(n, 4 * len(extra)),), generator=g)
        x[idx] = extra[torch.randint(0, len(extra), idx.shape, generator=g)]
    return x.to(dtype)


def elem_sizes(op: str, esize: int, ub: int, cores: int) -> list[int]:
    """n for every size class of the elementwise tiling: 0, 1, below one unit / tile, exact multiples of the
    tile and of cores x tile, one more and one less."""
    cost = sim.kernel_cost(op, esize, cores)
    unit = sim.elem_tiling(1, *cost, ub, cores)["unit"]
    tile = sim.elem_tiling(1 << 40, *cost, ub, cores)["tile"]
    ns = {0, 1, 5, unit - 1, unit, unit + 1, tile - 1, tile, tile + 1, 2 * tile, cores * tile - 1, cores * tile,
          cores * tile + 1, 2 * cores * tile + 7, 3 * cores * tile + unit + 3}  # fmt: skip
    return sorted(ns)


def check_stats(res: dict, out_bytes: int, cores: int, exact_ub: bool = True) -> None:
    t = res["tiling"]
    if t["block_num"] == 0:
        assert "stats" not in res
        return
    st = res["stats"]
    assert st["blocks"] == t["block_num"] <= cores
    assert st["written"]["y"] == out_bytes, "every output byte written exactly once (the shim refuses a second write)"
    assert st["ub_bytes_max"] <= t["ub_bytes"]
    if exact_ub:
        assert st["ub_bytes_max"] == t["ub_bytes"], "the kernel's InitBuffer calls match its declared UB cost"


# ----------------------------------------------------------------------------------------------------------
# shimmed kernels (CPU)


def sim_elementwise(op: str, x: torch.Tensor, out_dtype: torch.dtype, ub: int, cores: int):
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=out_dtype)
    esize = ESIZE[x.dtype] if op != "decode" else ESIZE[out_dtype]
    res = sim.run_elementwise(op, x.data_ptr(), y.data_ptr(), x.numel(), esize, ub, cores)
    check_stats(res, y.numel() * y.element_size(), cores)
    if res["tiling"]["block_num"]:
        assert res["stats"]["shared_lines"] == 0, "blocks never share a 32-byte GM line"
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["encode", "round"])
def test_encode_round_every_size_class(op, dtype):
    for n in elem_sizes(op, ESIZE[dtype], SMALL_UB, SMALL_CORES):
        x = sample(n, dtype, seed=n)
        if op == "encode":
            got, want = sim_elementwise("encode", x, torch.uint8, SMALL_UB, SMALL_CORES), hif8_encode(x, backend="ref")
        else:
            got, want = sim_elementwise("round", x, dtype, SMALL_UB, SMALL_CORES), hif8_round(x, backend="ref")
        assert_bits_equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_every_size_class(dtype):
    for n in elem_sizes("decode", ESIZE[dtype], SMALL_UB, SMALL_CORES):
        codes = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        assert_bits_equal(sim_elementwise("decode", codes, dtype, SMALL_UB, SMALL_CORES), hif8_decode(codes, dtype, backend="ref"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codec_on_every_code_and_grid_point(dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    assert_bits_equal(sim_elementwise("decode", codes, dtype, DEFAULT_UB, DEFAULT_CORES), hif8_decode(codes, dtype, backend="ref"))
    x = torch.cat([hif8_grid_points(), torch.tensor(SPECIALS)]).to(dtype)
    assert_bits_equal(sim_elementwise("encode", x, torch.uint8, DEFAULT_UB, DEFAULT_CORES), hif8_encode(x, backend="ref"))
    assert_bits_equal(sim_elementwise("round", x, dtype, DEFAULT_UB, DEFAULT_CORES), hif8_round(x, backend="ref"))
    if dtype == torch.float32:  # every bf16 bit pattern, widened
        allbf = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        assert_bits_equal(sim_elementwise("encode", allbf, torch.uint8, DEFAULT_UB, DEFAULT_CORES), hif8_encode(allbf, backend="ref"))


def test_default_tiling_large_input():
    x = sample(600_001, torch.float32, seed=7)
    assert_bits_equal(sim_elementwise("encode", x, torch.uint8, DEFAULT_UB, DEFAULT_CORES), hif8_encode(x, backend="ref"))


def sim_quantize_tensor(x: torch.Tensor, scale_max: float, amax: torch.Tensor | None, ub: int, cores: int):
    x = x.contiguous()
    y = torch.empty_like(x)
    a = amax.reshape(1).contiguous() if amax is not None else None
    res = sim.run_quantize_tensor(x.data_ptr(), y.data_ptr(), x.numel(), ESIZE[x.dtype], scale_max, a.data_ptr() if a is not None else 0, ub, cores)
    check_stats(res, y.numel() * y.element_size(), cores, exact_ub=False)
    if res["tiling"]["block_num"] and amax is None:
        amax_stats = res["amax_stats"]
        assert amax_stats["written"]["workspace"] == 32 * res["tiling"]["block_num"], "one 32-byte partial line per block"
        assert amax_stats["shared_lines"] == 0
    return y, res


def ref_quantize(x, scale_max, granularity="tensor", amax=None):
    return hif8_quantize(x, scale_max, granularity=granularity, amax=amax, backend="ref")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_tensor_every_size_class(dtype):
    for n in elem_sizes("quantize_tensor", ESIZE[dtype], SMALL_UB * 2, SMALL_CORES):
        if n == 0:
            continue  # the public API returns early; the tiling has 0 blocks (test_ascend_tiling)
        x = sample(n, dtype, seed=n, specials=False)
        for scale_max in (15.0, 224.0):
            got, res = sim_quantize_tensor(x, scale_max, None, SMALL_UB * 2, SMALL_CORES)
            assert_bits_equal(got, ref_quantize(x, scale_max))
            partials = torch.tensor(res["partials"], dtype=torch.int64).to(torch.int32).view(torch.float32)
            assert partials.max() == x.float().abs().max(), "the cross-core reduction of the workspace gives max|x|"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_tensor_specials(dtype):
    base = sample(1000, dtype, seed=3, specials=False)
    cases = {"zeros": torch.zeros(300, dtype=dtype), "nan": base.clone().index_fill_(0, torch.tensor([17]), math.nan),
             "inf": base.clone().index_fill_(0, torch.tensor([999]), -math.inf), "tiny": base * 1e-30,
             "grid": hif8_grid_points().to(dtype)}  # fmt: skip
    for name, x in cases.items():
        for scale_max in (15.0, 224.0):
            got, _ = sim_quantize_tensor(x, scale_max, None, DEFAULT_UB, DEFAULT_CORES)
            assert_bits_equal(got, ref_quantize(x, scale_max))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_tensor_given_amax(dtype):
    x = sample(5000, dtype, seed=4, specials=False)
    real = float(x.float().abs().max())
    for amax in (real, real / 8, 0.0, -3.0, 1e-12, math.nan, math.inf):  # below max|x|: Inf results; negative: the floor
        a = torch.tensor(amax, dtype=torch.float32)
        got, res = sim_quantize_tensor(x, 15.0, a, SMALL_UB * 2, SMALL_CORES)
        assert_bits_equal(got, ref_quantize(x, 15.0, amax=a))
        assert "amax_stats" not in res and len(res["partials"]) == 1, "a given amax skips the amax launch"


def sim_quantize_rows(x: torch.Tensor, scale_max: float, amax: torch.Tensor | None, ub: int, cores: int):
    x = x.contiguous()
    y = torch.empty_like(x)
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    a = amax.contiguous() if amax is not None else None
    res = sim.run_quantize_rows(x.data_ptr(), y.data_ptr(), rows, cols, ESIZE[x.dtype], scale_max, a.data_ptr() if a is not None else 0, ub, cores)
    check_stats(res, y.numel() * y.element_size(), cores)
    return y, res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_every_size_class(dtype):
    cost = sim.kernel_cost("quantize_rows", ESIZE[dtype], SMALL_CORES)
    unit = sim.row_tiling(1, 1, *cost, SMALL_UB, SMALL_CORES)["unit"]
    tile = sim.row_tiling(1, 1 << 40, *cost, SMALL_UB, SMALL_CORES)["tile"]
    g = torch.Generator().manual_seed(5)
    for cols in sorted({1, 7, unit, tile - 1, tile, tile + 1, 3 * tile + 5}):
        for rows in (1, 2, SMALL_CORES, SMALL_CORES + 1, 10):
            x = sample(rows * cols, dtype, seed=rows * 1000 + cols, specials=False).reshape(rows, cols)
            x = x * 10.0 ** torch.randint(-4, 4, (rows, 1), generator=g).to(dtype)  # rows of very different scales
            for scale_max in (15.0, 224.0):
                got, res = sim_quantize_rows(x, scale_max, None, SMALL_UB, SMALL_CORES)
                assert_bits_equal(got, ref_quantize(x, scale_max, "row"))
            amax = hif8_amax(x, "row")
            amax[0] = amax[0] / 4  # one row quantised with a smaller amax: Inf where |x s| >= 40960
            if rows > 1:
                amax[1] = -1.0
            got, _ = sim_quantize_rows(x, 15.0, amax, SMALL_UB, SMALL_CORES)
            assert_bits_equal(got, ref_quantize(x, 15.0, "row", amax=amax))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_specials(dtype):
    x = sample(12 * 40, dtype, seed=6, specials=False).reshape(12, 40)
    x[1, 3] = math.nan
    x[2, 0] = math.inf
    x[3] = 0.0
    x[4] = x[4] * 1e-30
    for ub in (SMALL_UB, DEFAULT_UB):
        got, _ = sim_quantize_rows(x, 15.0, None, ub, SMALL_CORES)
        assert_bits_equal(got, ref_quantize(x, 15.0, "row"))
    x3 = sample(3 * 5 * 48, dtype, seed=8, specials=False).reshape(3, 5, 48)  # rows of a 3-d tensor
    got, _ = sim_quantize_rows(x3, 224.0, None, DEFAULT_UB, DEFAULT_CORES)
    assert_bits_equal(got, ref_quantize(x3, 224.0, "row"))


# ----------------------------------------------------------------------------------------------------------
# Skiparse


def sim_skiparse(op: str, x: torch.Tensor, grid, P: int, kind: str | None, ub: int, cores: int):
    T, H, W = grid
    lay = skiparse_layout(grid, P)
    x = x.contiguous()
    if op == "fold":
        B = x.shape[0]
        out_shape = (P * P * B, lay.seq, x.shape[2])
    elif op == "unfold":
        B = x.shape[0] // (P * P)
        out_shape = (B, lay.n, x.shape[2])
    else:
        B = x.shape[0] // (P * P)
        out_shape = tuple(x.shape)
    y = torch.empty(out_shape, dtype=x.dtype)
    row_bytes = x.shape[2] * x.element_size()
    res = sim.run_skiparse(op, x.data_ptr(), y.data_ptr(), B, T, H, W, P, kind == "group", row_bytes, ub, cores)
    assert res["out_rows"] == out_shape[0] * out_shape[1]
    check_stats(res, y.numel() * y.element_size(), cores)
    return y


GRIDS = [(1, 5, 7), (2, 6, 9), (3, 4, 4), (1, 9, 10), (2, 3, 3), (1, 16, 12)]
SKIPARSE_DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.uint8]


def skiparse_input(B, n, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(B, n, C, generator=g) > 0.5
    if dtype.is_floating_point:
        x = torch.randn(B, n, C, generator=g).to(dtype)
        x.view(-1)[::11] = -0.0  # a signed zero must travel as it is
        return x
    return torch.randint(0, 200, (B, n, C), generator=g).to(dtype)


@pytest.mark.parametrize("kind", ["token", "group"])
@pytest.mark.parametrize("P", [2, 3])
def test_skiparse_fold_unfold_switch_match_ref(P, kind):
    i = 0
    for grid in GRIDS:
        if grid[1] < P or grid[2] < P:
            continue
        T, H, W = grid
        for B, C, dtype in [(1, 8, torch.float32), (2, 3, torch.bfloat16), (2, 5, torch.int64), (1, 7, torch.bool), (2, 40, torch.uint8)]:
            i += 1
            x = skiparse_input(B, T * H * W, C, dtype, seed=i)
            for ub, cores in [(DEFAULT_UB, DEFAULT_CORES), (256, SMALL_CORES)]:  # 256 B: rows split into column tiles
                y = sim_skiparse("fold", x, grid, P, kind, ub, cores)
                assert torch.equal(y, skiparse_fold(x, grid, P, kind, backend="ref"))
                back = sim_skiparse("unfold", y, grid, P, kind, ub, cores)
                assert torch.equal(back, skiparse_unfold(y, grid, P, kind, backend="ref")) and torch.equal(back, x)
                if kind == "token":
                    z = sim_skiparse("switch", y, grid, P, None, ub, cores)
                    assert torch.equal(z, skiparse_switch(y, grid, P, backend="ref"))
                    assert torch.equal(z, skiparse_fold(x, grid, P, "group", backend="ref"))
                    assert torch.equal(sim_skiparse("switch", z, grid, P, None, ub, cores), y), "switch is an involution"


def test_skiparse_padding_is_zero_and_bits_travel_unchanged():
    grid, P = (1, 5, 7), 2  # H, W padded to 8
    x = torch.full((1, 35, 4), -0.0)
    x[0, :, 1] = math.nan
    y = sim_skiparse("fold", x, grid, P, "token", DEFAULT_UB, DEFAULT_CORES)
    want = skiparse_fold(x, grid, P, "token", backend="ref")
    assert torch.equal(y.view(torch.int32), want.view(torch.int32))
    pad = ~torch.isnan(y[..., 1])
    assert torch.equal(y[pad].view(torch.int32), torch.zeros_like(y[pad].view(torch.int32))), "pad slots are +0.0"


def test_skiparse_empty_batch():
    x = torch.empty(0, 35, 4)
    y = sim_skiparse("fold", x, (1, 5, 7), 2, "group", DEFAULT_UB, DEFAULT_CORES)
    assert y.shape == (0, 16, 4)


# ----------------------------------------------------------------------------------------------------------
# the shim itself

SHIM_FAILURES = {
    "alloc_overflow": r"AllocTensor: all 2 buffers of TQue<VECIN, 2> are in use",
    "dequeue_empty": r"DeQue on the empty TQue<VECIN, 2> \(missing EnQue\?\)",
    "free_not_dequeued": r"FreeTensor of a tensor that is allocated, not dequeued",
    "enqueue_twice": r"EnQue of a tensor that is queued, not freshly allocated",
    "use_while_queued": r"SetValue: tensor of TQue<VECIN, 2> used while queued",
    "leak": r"end of kernel.*still dequeued \(missing FreeTensor\?\)",
    "missing_sync_in": r"GetValue: pipe S \(scalar\) reads TQue<VECIN, 2> last written by pipe MTE2",
    "missing_sync_out": r"DataCopy\(UB->GM\): pipe MTE3 \(UB->GM\) reads TQue<VECOUT, 2> last written by pipe S",
    "wait_without_set": r"WaitFlag without a matching SetFlag",
    "set_without_wait": r"SetFlag S \(scalar\) -> V \(vector\) without its WaitFlag",
    "ub_overflow": r"UB budget exceeded",
    "unaligned_copy": r"20 bytes is not a positive multiple of 32",
    "gm_out_of_bounds": r"past the end of the GlobalTensor",
    "double_write": r"GM bytes written twice in one launch \(blocks 0 and 1\)",
}


def test_shim_selftest_kernel_runs_clean():
    st = sim.shim_selftest(sim.SELFTEST_MODES["ok"])
    assert st["written"] == {"x": 0, "y": 2 * 64 * 4} and st["blocks"] == 2


@pytest.mark.parametrize("mode", sorted(SHIM_FAILURES))
def test_shim_assertions_fire(mode):
    assert set(SHIM_FAILURES) == set(sim.SELFTEST_MODES) - {"ok"}
    with pytest.raises(RuntimeError, match=SHIM_FAILURES[mode]):
        sim.shim_selftest(sim.SELFTEST_MODES[mode])
    sim.shim_selftest(sim.SELFTEST_MODES["ok"])  # the shim recovers for the next launch


def test_simulator_refuses_bad_arguments():
    x = torch.zeros(64)
    y = torch.empty(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="not 32-byte aligned"):
        sim.run_elementwise("encode", x.data_ptr() + 4, y.data_ptr(), 60, 4, DEFAULT_UB, 4)
    with pytest.raises(ValueError, match="element size must be 4"):
        sim.run_elementwise("encode", x.data_ptr(), y.data_ptr(), 16, 8, DEFAULT_UB, 4)
    with pytest.raises(ValueError, match="cannot hold one 32-byte unit"):
        sim.run_elementwise("encode", x.data_ptr(), y.data_ptr(), 64, 4, 300, 4)


# ----------------------------------------------------------------------------------------------------------
# the seams with torch and the build


def test_npu_op_names_and_schemas():
    from ospfn import _C  # noqa: F401  (loading it declares the torch.ops.ospfn schemas)

    for name in sim.NPU_HIF8_OPS:  # the NPU library only adds kernels to ops ospfn._C declares
        assert hasattr(torch.ops.ospfn, name), name
    names = []
    for text in sim.NPU_SKIPARSE_SCHEMAS:  # declared by the NPU library itself: must parse, must not clash with _C
        schema = torch._C.parse_schema(text)
        names.append(schema.name)
        assert not hasattr(torch.ops.ospfn, schema.name), f"ospfn._C now declares {schema.name}: drop it from csrc/ascend/schema.h"
    assert names == ["skiparse_fold", "skiparse_unfold", "skiparse_switch"]


def test_backend_info_reports_the_npu_build():
    status = sim.BUILD_INFO["ospfn_npu"]
    assert status.startswith(("built", "skipped ("))
    reason = backends.info("npu").reason
    if importlib.util.find_spec("ospfn._npu") is None:
        assert status.startswith("skipped (") and f"ospfn_npu {status}" in reason
    else:
        assert "ospfn._npu" in reason


# ----------------------------------------------------------------------------------------------------------
# on an Ascend NPU (skipped without one)


def _npu_ready() -> bool:
    return backends.info("npu").available and importlib.util.find_spec("ospfn._npu") is not None


needs_npu = pytest.mark.skipif(not _npu_ready(), reason="needs an Ascend NPU with torch_npu and ospfn._npu built")


@pytest.mark.npu
@needs_npu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_npu_hif8_ops_match_ref(dtype):  # pragma: no cover - needs an Ascend NPU
    from ospfn import _npu  # noqa: F401

    for n in (0, 1, 31, 32, 1000, 1 << 20, (1 << 20) + 17):
        x = sample(n, dtype, seed=n)
        xn = x.to("npu")
        assert_bits_equal(torch.ops.ospfn.hif8_encode(xn).cpu(), hif8_encode(x, backend="ref"))
        assert_bits_equal(torch.ops.ospfn.hif8_round(xn).cpu(), hif8_round(x, backend="ref"))
        codes = hif8_encode(x, backend="ref")
        assert_bits_equal(torch.ops.ospfn.hif8_decode(codes.to("npu"), dtype).cpu(), hif8_decode(codes, dtype, backend="ref"))
        if n:
            xf = sample(n, dtype, seed=n, specials=False)
            for scale_max in (15.0, 224.0):
                assert_bits_equal(torch.ops.ospfn.hif8_quantize(xf.to("npu"), scale_max, False).cpu(), ref_quantize(xf, scale_max))
            xr = xf[: n // 8 * 8].reshape(-1, 8) if n >= 8 else xf.reshape(1, -1)
            assert_bits_equal(torch.ops.ospfn.hif8_quantize(xr.to("npu"), 15.0, True).cpu(), ref_quantize(xr, 15.0, "row"))


@pytest.mark.npu
@needs_npu
def test_npu_skiparse_ops_match_ref():  # pragma: no cover - needs an Ascend NPU
    from ospfn import _npu  # noqa: F401

    for grid, P in [((2, 6, 9), 2), ((1, 9, 10), 3)]:
        T, H, W = grid
        x = skiparse_input(2, T * H * W, 24, torch.bfloat16, seed=1)
        for kind in ("token", "group"):
            y = torch.ops.ospfn.skiparse_fold(x.to("npu"), T, H, W, P, kind == "group").cpu()
            assert torch.equal(y, skiparse_fold(x, grid, P, kind, backend="ref"))
            back = torch.ops.ospfn.skiparse_unfold(y.to("npu"), T, H, W, P, kind == "group").cpu()
            assert torch.equal(back, x)
        y = skiparse_fold(x, grid, P, "token", backend="ref")
        z = torch.ops.ospfn.skiparse_switch(y.to("npu"), T, H, W, P).cpu()
        assert torch.equal(z, skiparse_switch(y, grid, P, backend="ref"))
