"""Scaled HiF8 fake quantisation (docs/hif8.md#scaled-fake-quantisation) against the step-by-step oracle."""

import math

import pytest
import torch
from conftest import backend_device
from hif8_oracle import TABLE, assert_bits_equal, oracle_quantize

from ospfn.ops import hif8_quantize

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def quant(x, backend, **kw):
    return hif8_quantize(x.to(backend_device(backend)), backend=backend, **kw).cpu()


assert_same = assert_bits_equal  # bit-exact, NaN positions equal


def activations(shape, seed, dtype=torch.float32):
    """Rows with very different scales (1e-3 .. 1e2) and outliers, like real activations (finite in fp16)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = x * 10.0 ** torch.randint(-3, 3, shape[:-1] + (1,), generator=g).float()
    x.view(-1)[:: max(1, x.numel() // 7)] *= 50
    x = x.to(dtype)
    assert torch.isfinite(x).all()
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_matches_formula(backend, dtype, granularity):
    x = activations((33, 257), seed=0, dtype=dtype)
    for scale_max in (15.0, 224.0):
        got = quant(x, backend, scale_max=scale_max, granularity=granularity)
        assert_same(got, oracle_quantize(x, scale_max, rowwise=granularity == "row"))


def test_tensor_scale_maps_amax_to_scale_max(backend):
    x = activations((16, 64), seed=1)
    y = quant(x, backend, scale_max=15.0)
    amax = x.abs().max()
    # the largest element lands on 15 exactly in the scaled domain, so it comes back (almost) unchanged
    i = x.abs().argmax()
    assert abs(float(y.view(-1)[i]) - float(x.view(-1)[i])) <= 1e-6 * float(amax)
    # relative error of HiF8 with 3 mantissa bits near the top is at most 2^-4
    big = x.abs() > amax / 8
    assert float(((y - x).abs() / x.abs())[big].max()) <= 2.0**-4 + 1e-6


def test_row_granularity_is_per_row(backend):
    x = activations((12, 40), seed=2)
    y = quant(x, backend, granularity="row")
    for r in range(x.shape[0]):
        row = quant(x[r : r + 1], backend, granularity="tensor")
        assert torch.equal(y[r : r + 1], row), f"row {r} differs from quantising it alone"
    # and it is not the tensor-wise result when the rows have different scales
    assert not torch.equal(y, quant(x, backend, granularity="tensor"))


def test_row_granularity_on_3d(backend):
    x = activations((3, 5, 48), seed=3)
    assert_same(quant(x, backend, granularity="row"), oracle_quantize(x, 15.0, rowwise=True))


def test_all_zero_has_no_nan(backend):
    for shape in [(64,), (4, 16)]:
        for g in ("tensor", "row"):
            y = quant(torch.zeros(shape), backend, granularity=g)
            assert torch.equal(y, torch.zeros(shape))


@pytest.mark.parametrize("magnitude", [1e30, 1e-20, 1e-10, 3e4])
def test_huge_and_tiny_amax(backend, magnitude):
    x = activations((8, 32), seed=4) / 50 * magnitude
    y = quant(x, backend)
    assert torch.isfinite(y).all()
    assert_same(y, oracle_quantize(x, 15.0, rowwise=False))
    if magnitude >= 1e-8:  # scale is not clamped: relative precision is amax-independent
        big = x.abs() > x.abs().max() / 8
        assert float(((y - x).abs() / x.abs())[big].max()) <= 2.0**-4 + 1e-6


def test_non_finite_input_gives_nan(backend):
    x = activations((4, 8), seed=5)
    x[1, 3] = math.nan
    y = quant(x, backend)
    assert torch.isnan(y).all()
    yr = quant(x, backend, granularity="row")
    assert torch.isnan(yr[1]).all() and torch.isfinite(yr[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_dtype_and_shape_preserved(backend, dtype):
    x = activations((3, 7, 9), seed=6, dtype=dtype).transpose(0, 1)  # non-contiguous
    y = quant(x, backend)
    assert y.dtype == dtype and y.shape == x.shape
    assert_same(y, oracle_quantize(x, 15.0, rowwise=False))


def test_values_lie_on_the_scaled_grid(backend):
    """Every output times s is a HiF8 value (to fp32 rounding of the division and multiplication)."""
    x = activations((8, 64), seed=7)
    y = quant(x, backend)
    s = 15.0 / float(x.abs().max())
    grid = torch.tensor([v for v in TABLE if math.isfinite(v)], dtype=torch.float64)
    ys = y.double() * s
    dist = (ys[..., None] - grid).abs().min(-1).values
    assert float((dist / ys.abs().clamp_min(1e-30)).max()) < 1e-6


def test_not_an_autograd_op(backend):
    x = activations((4, 8), seed=8).requires_grad_()
    y = hif8_quantize(x.to(backend_device(backend)), backend=backend)
    assert not y.requires_grad and y.grad_fn is None


def test_empty(backend):
    for g in ("tensor", "row"):
        y = quant(torch.empty(0, 5), backend, granularity=g)
        assert y.shape == (0, 5)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, -math.inf, math.nan, 1e-60, 1e60])
def test_bad_scale_max(bad):
    with pytest.raises(ValueError, match=r"hif8_quantize: scale_max must be"):
        hif8_quantize(torch.ones(3), bad)


def test_bad_scale_max_type():
    with pytest.raises(TypeError, match=r"scale_max must be a Python number"):
        hif8_quantize(torch.ones(3), torch.tensor(15.0))


def test_bad_granularity():
    with pytest.raises(ValueError, match=r"granularity must be one of \('tensor', 'row'\), got 'channel'"):
        hif8_quantize(torch.ones(3), granularity="channel")
    with pytest.raises(ValueError, match=r"granularity='row' needs x with at least one dimension"):
        hif8_quantize(torch.tensor(1.0), granularity="row")


def test_bad_dtype():
    with pytest.raises(TypeError, match=r"hif8_quantize: x must be a floating-point tensor"):
        hif8_quantize(torch.ones(3, dtype=torch.int32))


@pytest.mark.cuda
def test_no_host_sync_on_cuda():
    x = activations((256, 512), seed=9).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for g in ("tensor", "row"):
            hif8_quantize(x, granularity=g, backend="triton")
            hif8_quantize(x, granularity=g, backend="ref")
    finally:
        torch.cuda.set_sync_debug_mode("default")
