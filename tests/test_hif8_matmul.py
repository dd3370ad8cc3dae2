"""Packed 8-bit HiF8 weights (hif8_pack / HiF8Tensor) and the W8A16 matmul.

References are computed here from the spec formulas: Q from the independent oracle (hif8_oracle.py) and plain
torch matmuls; nothing is compared against the code under test itself.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_device
from hif8_oracle import TABLE, assert_bits_equal, q, rand

from ospfn.ops.hif8_matmul import HiF8Tensor, hif8_matmul, hif8_pack, hif8_unpack

K, N = 24, 12

# ------------------------------------------------------------------------------------------------------------
# packed weights


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_layout_and_dequantize(granularity, dtype):
    w = rand((37, 70), 100, 0.05, dtype)
    w[3] *= 40  # one loud output channel
    p = hif8_pack(w, granularity=granularity)
    assert isinstance(p, HiF8Tensor)
    assert p.codes.dtype == torch.uint8 and p.codes.shape == (37, 70) and p.shape == (37, 70)
    assert p.scale.dtype == torch.float32 and p.scale.shape == (() if granularity == "tensor" else (37,))
    assert p.nbytes == 37 * 70 + 4 * (1 if granularity == "tensor" else 37)
    rowwise = granularity == "row"
    amax = w.float().abs().amax(-1) if rowwise else w.float().abs().amax()
    assert torch.equal(p.scale, torch.tensor(15.0) / amax)  # tensor / tensor: IEEE division
    # codes are the oracle's codes of W * s; dequantised, the oracle's fake quant, bit for bit
    want = q(w, 15.0, rowwise)
    assert_bits_equal(p.dequantize(), want)
    assert_bits_equal(hif8_unpack(p, torch.float32), q(w.float(), 15.0, rowwise))  # fp32 W_q, before rounding
    assert p.dequantize().dtype == dtype
    s = p.scale[:, None] if rowwise else p.scale
    table = torch.tensor(TABLE, dtype=torch.float32)
    assert_bits_equal((table[p.codes.long()] / s).to(dtype), want)
    assert "granularity" in repr(p)


def test_pack_to_device_and_frozen():
    p = hif8_pack(rand((8, 16), 101))
    m = p.to("meta")
    assert m.device.type == "meta" and m.shape == p.shape and m.granularity == p.granularity
    c = p.to("cpu")
    assert torch.equal(c.codes, p.codes) and torch.equal(c.scale, p.scale)
    with pytest.raises(Exception):
        p.codes = p.codes  # frozen


def test_pack_bad_inputs():
    with pytest.raises(ValueError, match=r"hif8_pack: granularity must be one of \('tensor', 'row'\), got 'channel'"):
        hif8_pack(torch.randn(4, 4), granularity="channel")
    with pytest.raises(ValueError, match=r"hif8_pack: weight must have shape \[N, K\]"):
        hif8_pack(torch.randn(4, 4, 4))
    with pytest.raises(TypeError, match=r"hif8_pack: weight must be a floating-point tensor"):
        hif8_pack(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"HiF8Tensor: scale must be a float32 tensor of shape \(4,\)"):
        HiF8Tensor(torch.zeros(4, 4, dtype=torch.uint8), torch.ones(()), "row", torch.float32)
    with pytest.raises(TypeError, match=r"HiF8Tensor: codes must be a 2-D uint8 tensor"):
        HiF8Tensor(torch.zeros(4, 4), torch.ones(()), "tensor", torch.float32)


# ------------------------------------------------------------------------------------------------------------
# W8A16 matmul

MATMUL_BACKENDS = ["ref", "cpp", "triton"]
MM_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def fake_quant_reference(x, w, b, granularity):
    """x @ hif8_quantize(W, 15)^T + b in float64 from the oracle's fake quant (fp32) of W."""
    wq = q(w.float(), 15.0, granularity == "row").double()
    return x.double() @ wq.T + (b.double() if b is not None else 0)


def _assert_matmul_close(got, want, dtype):
    rtol, atol = MM_TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * float(want.abs().max()))


@pytest.mark.parametrize("mm_backend", MATMUL_BACKENDS)
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("xshape", [(5, 70), (1, 70), (2, 3, 70)], ids=["M5", "M1", "3d"])
def test_matmul_equals_fake_quant(mm_backend, granularity, dtype, xshape):
    dev = backend_device(mm_backend)
    w = rand((37, 70), 110, 0.1)
    w[5] *= 30
    b = rand((37,), 111)
    x = rand(xshape, 112, 2.0, dtype)
    p = hif8_pack(w, granularity=granularity).to(dev)
    y = hif8_matmul(x.to(dev), p, b.to(dev), backend=mm_backend).cpu()
    assert y.dtype == dtype and y.shape == xshape[:-1] + (37,)
    want = fake_quant_reference(x, w, b, granularity)
    _assert_matmul_close(y, want, dtype)
    if dtype == torch.float32:  # and it is not the unquantised product
        assert not torch.allclose(y.double(), x.double() @ w.double().T + b.double(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("mm_backend", ["ref", "cpp"])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_cpu_paths_in_blocks_of_rows(monkeypatch, mm_backend, granularity):
    """Blocks of 5 rows (37 = 7 * 5 + 2) give the same result as the fake-quant reference."""
    import sys

    mod = sys.modules["ospfn.ops.hif8_matmul"]  # the module (ospfn.ops.hif8_matmul, the attribute, is the op)

    monkeypatch.setattr(mod, "_CHUNK_ELEMS", 5 * 70)
    w, x, b = rand((37, 70), 115, 0.1), rand((9, 70), 116), rand((37,), 117)
    w[::3] *= 8
    p = hif8_pack(w, granularity=granularity)
    got = hif8_matmul(x, p, b, backend=mm_backend)
    _assert_matmul_close(got, fake_quant_reference(x, w, b, granularity), torch.float32)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize(
    "config",
    [
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, LUT=True),
        dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, LUT=False),
        dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, LUT=True),
        dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, LUT=True),
        dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, LUT=False),
    ],
    ids=["dot-lut-small", "dot-arith", "dot-lut-big", "gemv-lut", "gemv-arith"],
)
def test_triton_tiling_matches_ref(granularity, config):
    """Several M/N/K tiles (remainders in every dimension), both decoders, dot and GEMV paths, strided x."""
    from ospfn.kernels.hif8_matmul import matmul

    dev = backend_device("triton")
    w = rand((70, 130), 120, 0.1)
    w[::7] *= 20
    x = rand((130, 33), 121, 1.0).T  # [33, 130], non-contiguous
    if config["BLOCK_M"] == 1:
        x = x[:3]  # the GEMV path runs one program per row: keep the interpreter fast
    b = rand((70,), 122)
    p = hif8_pack(w, granularity=granularity)
    for dtype in (torch.float32, torch.float16):
        xd = x.to(dtype)
        got = matmul(xd.to(dev), p.codes.to(dev), p.scale.to(dev), b.to(dev), config=config).cpu()
        _assert_matmul_close(got, fake_quant_reference(xd, w, b, granularity), dtype)
        ref = hif8_matmul(xd, p, b, backend="ref")
        _assert_matmul_close(got, ref.double(), dtype)


def test_autotuned_launch_path_under_the_interpreter(monkeypatch):
    """The CUDA launch path (config pruning by M bucket, grid from the chosen meta-parameters, autotune cache)
    driven on CPU: the interpreter replaces the GPU and wall time replaces triton's CUDA-event timer."""
    import ospfn.backends
    import ospfn.kernels.hif8_matmul as km

    if not ospfn.backends.interpreting():
        pytest.skip("on a GPU the real autotuner runs in test_matmul_cuda_autotuned_bf16")

    def wall_time(kernel_call, quantiles):
        t = time.perf_counter()
        kernel_call()
        return [time.perf_counter() - t] * 3

    monkeypatch.setattr(km._w8a16_tuned, "_do_bench", wall_time)
    monkeypatch.setattr(km, "interpreting", lambda: False)
    w, b = rand((37, 70), 125, 0.1), rand((37,), 126)
    p = hif8_pack(w, granularity="row")
    for M in (1, 3):
        x = rand((M, 70), 127)
        got = km.matmul(x, p.codes, p.scale, b)
        _assert_matmul_close(got, fake_quant_reference(x, w, b, "row"), torch.float32)
        cfg = km.best_config(M, 37, 70)
        assert cfg is not None and cfg["BLOCK_M"] in ((1, 16) if M == 1 else (16,))  # the M bucket's tiles


@pytest.mark.parametrize("mm_backend", MATMUL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matmul_decodes_every_finite_code_exactly(mm_backend, dtype):
    """codes [16, 16] = all 256 codes (Inf/NaN replaced by 0), scale 1, x = identity: y = decode(codes)^T exactly."""
    dev = backend_device(mm_backend)
    codes = torch.arange(256, dtype=torch.int32)
    codes = torch.where((codes == 0x80) | ((codes & 0x7F) == 0x6F), 0, codes).to(torch.uint8).view(16, 16)
    want = torch.tensor(TABLE, dtype=torch.float64)[codes.long()].T
    p = HiF8Tensor(codes, torch.ones(()), "tensor", torch.float32).to(dev)
    y = hif8_matmul(torch.eye(16, dtype=dtype).to(dev), p, backend=mm_backend).cpu()
    assert torch.equal(y.double(), want)
    if mm_backend == "triton":
        from ospfn.kernels.hif8_matmul import matmul

        for lut in (True, False):
            for bm in (1, 16):
                cfg = dict(BLOCK_M=bm, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, LUT=lut)
                y = matmul(torch.eye(16, dtype=dtype).to(dev), p.codes, p.scale, None, config=cfg).cpu()
                assert torch.equal(y.double(), want), cfg


def test_matmul_backward_x_and_bias():
    w, x, b, g = rand((12, 20), 130, 0.3), rand((4, 20), 131), rand((12,), 132), rand((4, 12), 133)
    p = hif8_pack(w, granularity="row")
    xl, bl = x.clone().requires_grad_(), b.clone().requires_grad_()
    hif8_matmul(xl, p, bl, backend="ref").backward(g)
    torch.testing.assert_close(xl.grad, g @ q(w, 15.0, True))
    torch.testing.assert_close(bl.grad, g.sum(0))


def test_matmul_empty_and_no_bias():
    p = hif8_pack(rand((5, 8), 140))
    assert hif8_matmul(torch.empty(0, 8), p).shape == (0, 5)
    y = hif8_matmul(torch.ones(2, 8), p)
    torch.testing.assert_close(y, torch.ones(2, 8) @ q(rand((5, 8), 140), 15.0).T)


def test_matmul_bad_inputs():
    p = hif8_pack(torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"hif8_matmul: x must have shape \[..., K\] with K = 8 .*got \(3, 7\)"):
        hif8_matmul(torch.randn(3, 7), p)
    with pytest.raises(TypeError, match=r"hif8_matmul: x must be float32, float16 or bfloat16, got torch.int32"):
        hif8_matmul(torch.ones(3, 8, dtype=torch.int32), p)
    with pytest.raises(TypeError, match=r"hif8_matmul: x must be float32, float16 or bfloat16, got torch.float64"):
        hif8_matmul(torch.ones(3, 8, dtype=torch.float64), p)
    with pytest.raises(TypeError, match=r"hif8_matmul: packed must be a HiF8Tensor"):
        hif8_matmul(torch.randn(3, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"hif8_matmul: bias must have shape \(5,\)"):
        hif8_matmul(torch.randn(3, 8), p, torch.randn(8))
    with pytest.raises(ValueError, match=r"x and the packed weight must be on one device"):
        hif8_matmul(torch.randn(3, 8, device="meta"), p)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 16, 256])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_matmul_cuda_autotuned_bf16(M, granularity):
    """The autotuned kernel on the GPU, bf16 tensor cores, against the fake-quant reference."""
    w = rand((512, 768), 150, 0.05)
    x = rand((M, 768), 151, 1.0, torch.bfloat16)
    b = rand((512,), 152)
    p = hif8_pack(w.cuda(), granularity=granularity)
    y = hif8_matmul(x.cuda(), p, b.cuda().bfloat16(), backend="triton").cpu()
    want = fake_quant_reference(x, w, b.bfloat16(), granularity)
    # FlashAttention rule: at most 2x the error of torch's own bf16 matmul on the same operands
    wq = q(w, 15.0, granularity == "row")
    torch_err = ((F.linear(x.cuda(), wq.cuda().bfloat16(), b.cuda().bfloat16()).cpu().double() - want).abs().max())
    assert float((y.double() - want).abs().max()) <= 2 * float(torch_err) + 1e-6
