"""HiF8 straight-through fake quant (hif8_fake_quant, hif8_linear) and hif8_quantize(amax=...).

References are computed here from the spec formulas: Q from the independent oracle (hif8_oracle.py) and plain
torch matmuls; nothing is compared against the code under test itself.
"""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_device
from hif8_oracle import assert_bits_equal, oracle_quantize, oracle_quantize_amax, q, rand

from ospfn.ops.hif8 import hif8_amax, hif8_quantize
from ospfn.ops.hif8_linear import hif8_linear
from ospfn.ops.hif8_matmul import hif8_matmul, hif8_pack

K, N = 24, 12



# ------------------------------------------------------------------------------------------------------------
# hif8_linear: forward and every gradient against the formulas


def reference_linear(x, w, b, g):
    """spec section 3, computed here: forward and straight-through gradients (fp32 reference arithmetic)."""
    xq, wq, gq = q(x, 15.0), q(w, 15.0), q(g, 224.0)
    xq, wq, gq = xq.double(), wq.double(), gq.double()
    y = xq @ wq.T + (b.double() if b is not None else 0)
    g2, x2 = gq.reshape(-1, gq.shape[-1]), xq.reshape(-1, xq.shape[-1])
    return y, gq @ wq, g2.T @ x2, g2.sum(0)


@pytest.mark.parametrize("xshape", [(7, K), (2, 5, K)], ids=["2d", "3d"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_linear_matches_formula_fp32(backend, xshape, has_bias):
    dev = backend_device(backend)
    x = rand(xshape, 0, 3.0)
    x[..., 0] *= 20  # outlier column: the scale is set by few elements
    w = rand((N, K), 1, 0.2)
    b = rand((N,), 2) if has_bias else None
    g = rand(xshape[:-1] + (N,), 3, 1e-3)
    y_ref, dx_ref, dw_ref, db_ref = reference_linear(x, w, b, g)

    xl = x.to(dev).requires_grad_()
    wl = w.to(dev).requires_grad_()
    bl = b.to(dev).requires_grad_() if has_bias else None
    y = hif8_linear(xl, wl, bl, backend=backend)
    y.backward(g.to(dev))
    assert y.dtype == torch.float32 and y.shape == xshape[:-1] + (N,)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.detach().cpu().double(), y_ref, **tol)
    torch.testing.assert_close(xl.grad.cpu().double(), dx_ref, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(wl.grad.cpu().double(), dw_ref, rtol=1e-5, atol=1e-8)
    if has_bias:
        torch.testing.assert_close(bl.grad.cpu().double(), db_ref, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("xshape", [(7, K), (2, 5, K)], ids=["2d", "3d"])
def test_linear_bf16(xshape):
    """bf16 operands: quantised exactly as the oracle does in bf16; matmuls within bf16 tolerance."""
    x = rand(xshape, 10, 2.0, torch.bfloat16)
    w = rand((N, K), 11, 0.3, torch.bfloat16)
    b = rand((N,), 12, 1.0, torch.bfloat16)
    g = rand(xshape[:-1] + (N,), 13, 1.0, torch.bfloat16)
    y_ref, dx_ref, dw_ref, db_ref = reference_linear(x, w, b, g)
    xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
    y = hif8_linear(xl, wl, bl)
    y.backward(g)
    assert y.dtype == xl.grad.dtype == wl.grad.dtype == bl.grad.dtype == torch.bfloat16
    for got, want in [(y.detach(), y_ref), (xl.grad, dx_ref), (wl.grad, dw_ref), (bl.grad, db_ref)]:
        torch.testing.assert_close(got.double(), want, rtol=1.6e-2, atol=1.6e-2 * float(want.abs().max()))


def test_straight_through():
    """Gradients = those of a plain linear on the quantised operands fed the quantised gradient, and not those
    of the unquantised linear."""
    x, w, b, g = rand((9, K), 20, 4.0), rand((N, K), 21, 0.1), rand((N,), 22), rand((9, N), 23, 0.01)
    xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
    hif8_linear(xl, wl, bl).backward(g)

    xq, wq = q(x, 15.0).requires_grad_(), q(w, 15.0).requires_grad_()
    b1 = b.clone().requires_grad_()
    F.linear(xq, wq, b1).backward(q(g, 224.0))
    for got, want in [(xl.grad, xq.grad), (wl.grad, wq.grad), (bl.grad, b1.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)

    x2, w2, b2 = (t.clone().requires_grad_() for t in (x, w, b))
    F.linear(x2, w2, b2).backward(g)
    for got, plain in [(xl.grad, x2.grad), (wl.grad, w2.grad), (bl.grad, b2.grad)]:
        assert not torch.allclose(got, plain, rtol=1e-4, atol=0), "gradient ignores the quantisation"


def test_forward_is_not_plain_linear():
    x, w = rand((6, K), 30, 1.0), rand((N, K), 31, 1.0)
    y = hif8_linear(x, w)
    assert not torch.allclose(y, F.linear(x, w), rtol=1e-3, atol=0)


def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_saves_only_quantised_x_and_the_weight_itself():
    x, w = rand((5, K), 40, 2.0), rand((N, K), 41, 0.5)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    _, saved = _saved_tensors(lambda: hif8_linear(xl, wl, rand((N,), 42).requires_grad_()))
    assert len(saved) == 2
    assert_bits_equal(saved[0], q(x, 15.0))  # Q15(x), not x
    assert saved[1].data_ptr() == wl.data_ptr()  # W by reference: Q15(W) is recomputed in backward

    # frozen weight (e.g. LoRA base): dW is not needed, so Q15(x) is not kept
    _, saved = _saved_tensors(lambda: hif8_linear(x.clone().requires_grad_(), w))
    assert len(saved) == 1 and saved[0].data_ptr() == w.data_ptr()
    # x without grad (first layer): only Q15(x) for dW
    _, saved = _saved_tensors(lambda: hif8_linear(x, w.clone().requires_grad_()))
    assert len(saved) == 1 and saved[0].shape == x.shape


def test_frozen_weight_and_no_grad():
    x, w = rand((5, K), 50, 2.0), rand((N, K), 51, 0.5)
    xl = x.clone().requires_grad_()
    y = hif8_linear(xl, w)
    g = rand((5, N), 52)
    y.backward(g)
    torch.testing.assert_close(xl.grad, q(g, 224.0) @ q(w, 15.0))
    with torch.no_grad():
        assert hif8_linear(xl, w).grad_fn is None


def test_linear_scale_max_arguments():
    x, w, g = rand((5, K), 60, 2.0), rand((N, K), 61, 0.5), rand((5, N), 62)
    xl = x.clone().requires_grad_()
    y = hif8_linear(xl, w, scale_max_fwd=224.0, scale_max_bwd=15.0)
    y.backward(g)
    torch.testing.assert_close(y, q(x, 224.0) @ q(w, 224.0).T)
    torch.testing.assert_close(xl.grad, q(g, 15.0) @ q(w, 224.0))


def test_linear_ignores_autocast():
    x, w, b, g = rand((5, K), 63, 2.0), rand((N, K), 64, 0.5), rand((N,), 65), rand((5, N), 66)
    xl = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = hif8_linear(xl, w, b)
    assert y.dtype == torch.float32
    y.backward(g)
    y_ref, dx_ref, _, _ = reference_linear(x, w, b, g)
    torch.testing.assert_close(y.detach().double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xl.grad.double(), dx_ref, rtol=1e-5, atol=1e-8)


def test_linear_bad_inputs():
    x, w = torch.randn(3, K), torch.randn(N, K)
    with pytest.raises(ValueError, match=r"hif8_linear: weight.shape\[1\] must equal x.shape\[-1\] \(K\)"):
        hif8_linear(x, torch.randn(N, K + 1))
    with pytest.raises(ValueError, match=r"hif8_linear: weight must have shape \[N, K\]"):
        hif8_linear(x, torch.randn(K))
    with pytest.raises(TypeError, match=r"hif8_linear: weight dtype must equal x dtype torch.float32, got torch.bf"):
        hif8_linear(x, w.bfloat16())
    with pytest.raises(TypeError, match=r"hif8_linear: x must be float32, float64, float16 or bfloat16, got torch.int"):
        hif8_linear(torch.ones(3, K, dtype=torch.long), w)
    with pytest.raises(ValueError, match=r"hif8_linear: bias must have shape \(12,\)"):
        hif8_linear(x, w, torch.randn(N + 1))
    with pytest.raises(ValueError, match=r"hif8_linear: scale_max must be finite and > 0, got -1"):
        hif8_linear(x, w, scale_max_bwd=-1.0)
    with pytest.raises(ValueError, match=r"amax_group was given but torch.distributed is not initialised"):
        hif8_linear(x, w, amax_group=object())


@pytest.mark.cuda
def test_no_host_sync_on_cuda():
    x = rand((4, 64, 256), 70, 3.0).cuda().requires_grad_()
    w = rand((128, 256), 71, 0.1).cuda().requires_grad_()
    b = rand((128,), 72).cuda().requires_grad_()
    g = rand((4, 64, 128), 73).cuda()

    def step():
        y = hif8_linear(x, w, b)
        y.backward(g)
        p = hif8_pack(w.detach(), granularity="row")
        hif8_matmul(x.detach(), p, b.detach())
        hif8_matmul(x.detach()[0, :1], p, b.detach())
        hif8_quantize(x.detach(), amax=hif8_amax(x.detach()))

    step()  # warm-up: compilation, autotuning and the decode tables may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------------------------
# amax_group: sequence-parallel ranks quantise like one process (2 ranks on gloo)

ROWS = 6  # rows per rank


def _dist_inputs():
    x = rand((2 * ROWS, K), 80, 1.0)
    x[ROWS:] *= 8.0  # rank 1's half has 8x the amax of rank 0's half
    g = rand((2 * ROWS, N), 81, 1.0)
    g[:ROWS] *= 16.0  # and for the gradient rank 0 holds the larger half
    return x, rand((N, K), 82, 0.2), rand((N,), 83), g


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        x_full, w, b, g_full = _dist_inputs()
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        res = {}
        for name, group in (("group", dist.group.WORLD), ("local", None)):
            xl, wl, bl = x_full[rows].clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
            y, saved = _saved_tensors(lambda: hif8_linear(xl, wl, bl, amax_group=group))
            y.backward(g_full[rows])
            res[name] = {"y": y.detach(), "xq": saved[0], "dx": xl.grad, "dw": wl.grad, "db": bl.grad}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_amax_group_two_ranks(tmp_path: Path):
    import torch.multiprocessing as mp

    world = 2
    ctx = mp.start_processes(
        _dist_worker,
        args=(world, str(tmp_path / "init"), str(tmp_path)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail("the 2-rank gloo run did not finish within 120 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()

    x_full, w, b, g_full = _dist_inputs()
    xq, wq, gq = q(x_full, 15.0), q(w, 15.0), q(g_full, 224.0)  # one process, all rows
    dw_sum = torch.zeros(N, K)
    for rank in range(world):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        res = torch.load(tmp_path / f"rank{rank}.pt")
        got = res["group"]
        assert_bits_equal(got["xq"], xq[rows])
        torch.testing.assert_close(got["y"], xq[rows] @ wq.T + b)
        torch.testing.assert_close(got["dx"], gq[rows] @ wq)
        torch.testing.assert_close(got["dw"], gq[rows].T @ xq[rows])
        torch.testing.assert_close(got["db"], gq[rows].sum(0))
        dw_sum += got["dw"]
        # without the group each rank scales by its own amax: the smaller half is quantised differently
        loc = res["local"]
        assert_bits_equal(loc["xq"], q(x_full[rows], 15.0))
        if rank == 0:  # x amax is on rank 1
            assert not torch.equal(loc["xq"], xq[rows])
            assert not torch.allclose(loc["y"], got["y"], rtol=1e-4, atol=0)
        else:  # g amax is on rank 0
            assert not torch.allclose(loc["dw"], got["dw"], rtol=1e-4, atol=0)
    torch.testing.assert_close(dw_sum, gq.T @ xq)  # the all-reduced dW is the single-process dW


# ------------------------------------------------------------------------------------------------------------
# hif8_quantize(amax=...) and hif8_amax


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_quantize_with_given_amax(backend, dtype, granularity):
    dev = backend_device(backend)
    x = rand((6, 50), 90, 3.0, dtype)
    x[2] *= 30
    true_amax = x.float().abs().amax(-1, keepdim=True) if granularity == "row" else x.float().abs().amax()
    factors = [1.0, 3.0, 0.7, 1 / 4096, 1e-20, -1.0]  # larger, smaller, Inf overflow, below the floor, negative
    for f in factors:
        amax = true_amax * f
        got = hif8_quantize(x.to(dev), 15.0, granularity=granularity, amax=amax.to(dev), backend=backend).cpu()
        assert_bits_equal(got, oracle_quantize_amax(x, 15.0, amax))
    tiny = (true_amax.max() / 4096).reshape(()).to(dev)
    assert torch.isinf(hif8_quantize(x.to(dev), amax=tiny, backend=backend)).any()  # |x s| >= 40960 -> Inf
    # the computed amax passed back in gives the default result
    amax = hif8_amax(x.to(dev), granularity)
    got = hif8_quantize(x.to(dev), 224.0, granularity=granularity, amax=amax, backend=backend)
    assert_bits_equal(got.cpu(), oracle_quantize(x, 224.0, granularity == "row"))


def test_quantize_given_amax_nan_only_poisons_nan_elements(backend):
    dev = backend_device(backend)
    x = rand((4, 8), 91)
    x[1, 2] = math.nan
    got = hif8_quantize(x.to(dev), amax=torch.tensor(5.0).to(dev), backend=backend).cpu()
    assert torch.isnan(got[1, 2]) and torch.isnan(got).sum() == 1
    got = hif8_quantize(x.to(dev), amax=torch.tensor(math.nan).to(dev), backend=backend).cpu()
    assert torch.isnan(got).all()


def test_hif8_amax():
    x = rand((3, 4, 33), 92, 2.0)
    assert hif8_amax(x).dtype == torch.float32 and hif8_amax(x).shape == ()
    assert torch.equal(hif8_amax(x), x.abs().max())
    assert torch.equal(hif8_amax(x, "row"), x.abs().amax(-1, keepdim=True))
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        xd = x.to(dt)
        assert torch.equal(hif8_amax(xd), xd.float().abs().max())
        assert hif8_amax(xd, "row").dtype == torch.float32
    x[1, 2, 3] = math.nan
    assert torch.isnan(hif8_amax(x)) and torch.isnan(hif8_amax(x, "row")).sum() == 1
    assert hif8_amax(torch.empty(0, 3)) == 0 and hif8_amax(torch.empty(2, 0), "row").shape == (2, 1)
    with pytest.raises(ValueError, match=r"hif8_amax: granularity must be one of"):
        hif8_amax(x, "channel")


def test_quantize_amax_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"hif8_quantize: amax must have dtype torch.float32, got torch.float64"):
        hif8_quantize(x, amax=torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"hif8_quantize: amax must be a torch.Tensor"):
        hif8_quantize(x, amax=1.0)
    with pytest.raises(ValueError, match=r"amax for granularity='tensor' must have shape \(\) \(a 0-d tensor\), got"):
        hif8_quantize(x, amax=torch.ones(1))
    with pytest.raises(ValueError, match=r"amax for granularity='row' must have shape \(4, 1\)"):
        hif8_quantize(x, granularity="row", amax=torch.ones(4))
    with pytest.raises(ValueError, match=r"hif8_quantize: amax must be on x's device cpu, got meta"):
        hif8_quantize(x, amax=torch.ones((), device="meta"))
