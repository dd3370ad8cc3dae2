"""The Triton flash-attention kernel (``ospfn.kernels.attention``) against a plain softmax-attention formula.

On CPU the kernels run in the Triton interpreter (fp32 / fp16 only: its bf16 dot is unreliable), with 16 x 16
blocks, so the odd sizes below cover several blocks and a partial last block.  On a GPU the ``cuda`` tests add
bf16 and larger shapes with the FlashAttention rule: the kernel's max error against an fp64 reference is at
most 2x that of PyTorch computing the same formula in bf16 (3x for gradients).
"""

import math

import pytest
import torch
from conftest import backend_device, require

require("triton")
from ospfn.kernels.attention import attention  # noqa: E402

DEV = backend_device("triton")
# (atol, rtol) of the kernel against the fp64 formula, per input dtype
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3)}


def reference(q, k, v, key_mask=None, scale=None, dtype=torch.float64):
    """softmax(q k^T * scale, masked keys = -inf) v, computed in ``dtype``; rows without keys give 0."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if key_mask is None:
        p = torch.softmax(s.float() if dtype != torch.float64 else s, dim=-1).to(dtype)
    else:
        m = key_mask[:, None, None, :].to(s.device)
        s = s.masked_fill(~m, float("-inf")).masked_fill(~m.any(-1, keepdim=True), 0.0)
        p = (torch.softmax(s.float() if dtype != torch.float64 else s, dim=-1) * m).to(dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def make(B, Sq, Sk, H, D, dtype, seed=0, mag=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g) * mag
    k = torch.randn(B, Sk, H, D, generator=g) * mag
    v = torch.randn(B, Sk, H, D, generator=g)
    do = torch.randn(B, Sq, H, D, generator=g)
    return [t.to(dtype).to(DEV) for t in (q, k, v, do)]


def random_mask(B, Sk, seed=0, p=0.35):
    g = torch.Generator().manual_seed(seed + 100)
    m = torch.rand(B, Sk, generator=g) > p
    m[:, 0] = True  # every entry keeps a key unless a test says otherwise
    return m.to(DEV)


def run(q, k, v, do, key_mask=None, scale=None):
    """(out, dq, dk, dv) of the kernel."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, key_mask=key_mask, scale=scale)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def run_ref(q, k, v, do, key_mask=None, scale=None, dtype=torch.float64):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = reference(q, k, v, key_mask, scale, dtype)
    out.backward(do.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad


def assert_close(got, want, dtype, what, tol=None):
    atol, rtol = tol or TOL[dtype]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype, f"{what} {name}: dtype {g.dtype}"
        assert torch.isfinite(g).all(), f"{what} {name}: non-finite values"
        torch.testing.assert_close(g.double().cpu(), w.double().cpu(), atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{what} {name}: {m}")


CASES = [
    # B, Sq, Sk, H, D, masked
    (1, 37, 29, 1, 16, False),
    (2, 37, 29, 2, 16, True),
    (2, 20, 45, 3, 40, True),  # cross-attention, Sk > Sq, padded head dim
    (1, 33, 33, 2, 64, True),
    (2, 17, 19, 1, 128, True),
    (1, 70, 90, 2, 64, True),  # 5 x 6 blocks of 16 under the interpreter
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Sq,Sk,H,D,masked", CASES)
def test_matches_reference(dtype, B, Sq, Sk, H, D, masked):
    q, k, v, do = make(B, Sq, Sk, H, D, dtype, seed=D + Sq)
    mask = random_mask(B, Sk, seed=Sk) if masked else None
    assert_close(run(q, k, v, do, mask), run_ref(q, k, v, do, mask), dtype, f"{dtype} {(B, Sq, Sk, H, D)}")


def test_explicit_scale():
    q, k, v, do = make(2, 21, 18, 2, 16, torch.float32, seed=5, mag=0.5)
    mask = random_mask(2, 18, seed=5)
    for scale in (0.05, 1.0, 2.5):
        assert_close(run(q, k, v, do, mask, scale), run_ref(q, k, v, do, mask, scale), torch.float32, f"scale={scale}")


def test_fully_masked_batch_entry_gives_zeros_not_nan():
    # large scores too: exp2 of masked / missing entries would overflow if they were not zeroed explicitly
    q, k, v, do = make(3, 19, 23, 2, 40, torch.float32, seed=7, mag=4.0)
    mask = random_mask(3, 23, seed=7)
    mask[1] = False
    out, dq, dk, dv = run(q, k, v, do, mask)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name} has NaN/inf"
        assert torch.equal(t[1], torch.zeros_like(t[1])), f"{name} of the fully masked entry is not zero"
    want = run_ref(q, k, v, do, mask)
    # scores have a std of 16 here: fp32 rounding of the scores is ~16x larger than in the other tests
    assert_close((out, dq, dk, dv), want, torch.float32, "other entries", tol=(2e-4, 2e-4))
    # every batch entry masked, fp16
    q, k, v, do = make(2, 17, 16, 1, 16, torch.float16, seed=8)
    out, dq, dk, dv = run(q, k, v, do, torch.zeros(2, 16, dtype=torch.bool, device=DEV))
    for t in (out, dq, dk, dv):
        assert torch.equal(t, torch.zeros_like(t))


def test_masked_keys_have_no_influence_and_zero_grads():
    B, Sq, Sk, H, D = 2, 18, 35, 2, 16
    q, k, v, do = make(B, Sq, Sk, H, D, torch.float32, seed=11)
    mask = random_mask(B, Sk, seed=11, p=0.5)
    mask[1, 16:32] = False  # a whole 16-key block of padding (its dK/dV program skips the query loop)
    out, dq, dk, dv = run(q, k, v, do, mask)
    dead = ~mask
    assert torch.equal(dk[dead], torch.zeros_like(dk[dead]))
    assert torch.equal(dv[dead], torch.zeros_like(dv[dead]))
    assert dk[mask].abs().sum() > 0 and dv[mask].abs().sum() > 0

    g = torch.Generator().manual_seed(12)
    k2, v2 = k.clone(), v.clone()
    k2[dead] = (torch.randn(k2[dead].shape, generator=g) * 30).to(DEV)
    v2[dead] = (torch.randn(v2[dead].shape, generator=g) * 30).to(DEV)
    out2, dq2, dk2, dv2 = run(q, k2, v2, do, mask)
    assert torch.equal(out2, out)
    assert torch.equal(dq2, dq)
    assert torch.equal(dk2[mask], dk[mask]) and torch.equal(dv2[mask], dv[mask])
    # and the mask matters: without it the output changes
    assert not torch.allclose(run(q, k2, v2, do)[0], out, atol=1e-3)


def test_non_contiguous_inputs():
    B, S, H, D = 2, 26, 2, 40
    g = torch.Generator().manual_seed(13)
    qkv = torch.randn(B, S, 3, H, D, generator=g).to(DEV)  # packed projection output
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    do = torch.randn(B, H, S, D, generator=g).to(DEV).transpose(1, 2)  # [B, S, H, D] view of a BHSD tensor
    big = torch.rand(B, 2 * S, generator=g).to(DEV) > 0.3
    big[:, 0] = True
    mask = big[:, ::2]  # strided mask
    assert not mask.is_contiguous()
    assert_close(run(q, k, v, do, mask), run_ref(q, k, v, do, mask), torch.float32, "packed qkv")

    # head dim not unit-stride (copied once) and heads-first layouts
    kt = torch.randn(B, H, S, 2 * D, generator=g).to(DEV).transpose(1, 2)[..., ::2]
    vt = torch.randn(B, H, S, D, generator=g).to(DEV).transpose(1, 2)
    assert kt.stride(-1) == 2
    assert_close(run(q, kt, vt, do, mask), run_ref(q, kt, vt, do, mask), torch.float32, "strided k, v")


def test_gradient_of_sum_and_partial_requires_grad():
    # out.sum() hands the backward an expanded (stride 0) gradient
    q, k, v, _ = make(1, 20, 17, 2, 16, torch.float32, seed=14)
    mask = random_mask(1, 17, seed=14)
    qg = q.clone().requires_grad_()
    attention(qg, k, v, key_mask=mask).sum().backward()
    qr = q.double().requires_grad_()
    reference(qr, k, v, mask).sum().backward()
    torch.testing.assert_close(qg.grad.double(), qr.grad, atol=2e-5, rtol=2e-5)

    kg, vg = k.clone().requires_grad_(), v.clone().requires_grad_()
    out = attention(q, kg, vg, key_mask=mask)
    out.backward(torch.ones_like(out))
    kr, vr = k.double().requires_grad_(), v.double().requires_grad_()
    reference(q, kr, vr, mask).backward(torch.ones(out.shape, dtype=torch.float64, device=DEV))
    torch.testing.assert_close(kg.grad.double(), kr.grad, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(vg.grad.double(), vr.grad, atol=2e-5, rtol=2e-5)


def test_single_query_and_key():
    q, k, v, do = make(2, 1, 1, 3, 16, torch.float32, seed=15)
    got = run(q, k, v, do)
    assert torch.allclose(got[0], v)  # one key: its value, whatever the score
    assert_close(got, run_ref(q, k, v, do), torch.float32, "S = 1")


def test_no_keys_at_all():
    q, k, v, do = make(2, 9, 0, 2, 16, torch.float32, seed=16)
    out, dq, dk, dv = run(q, k, v, do, torch.zeros(2, 0, dtype=torch.bool, device=DEV))
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(dq, torch.zeros_like(dq))
    assert dk.shape == k.shape and dv.shape == v.shape


def test_bad_arguments():
    """The kernel checks nothing itself: bad arguments are refused by ospfn.ops.attention before they reach it."""
    from ospfn.ops import attention as op

    def call(q, k, v, **kw):
        return op(q, k, v, backend="triton", **kw)

    q = torch.randn(1, 4, 1, 16, device=DEV)
    with pytest.raises(ValueError, match="k must have shape"):
        call(q, torch.randn(1, 4, 2, 16, device=DEV), torch.randn(1, 4, 2, 16, device=DEV))
    with pytest.raises(TypeError, match="share a dtype"):
        call(q, q.half(), q)
    with pytest.raises(TypeError, match="key_mask"):
        call(q, q, q, key_mask=torch.ones(1, 4, device=DEV))
    with pytest.raises(ValueError, match="key_mask"):
        call(q, q, q, key_mask=torch.ones(1, 5, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="heads, head_dim"):
        call(q[0], q[0], q[0])


def test_head_dim_limit():
    """D > MAX_HEAD_DIM: the backend registry's constraint on the triton implementation refuses it."""
    from ospfn.kernels.attention import MAX_HEAD_DIM
    from ospfn.ops import attention as op

    big = torch.randn(1, 4, 1, MAX_HEAD_DIM + 32, device=DEV)
    with pytest.raises(ValueError, match="head dim"):
        op(big, big, big, backend="triton")


# ----------------------------------------------------------------------------------------------------------
# GPU only: bf16 numerics (FlashAttention rule), realistic sizes, determinism


def max_errors(got, want):
    return [float((g.double() - w.double()).abs().max()) for g, w in zip(got, want)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Sq,Sk,H,D,masked", [
    (2, 1000, 1000, 4, 128, True),
    (1, 777, 513, 3, 64, False),
    (2, 300, 257, 2, 40, True),
    (1, 4096, 4096, 2, 128, True),
])
def test_cuda_flash_attention_rule(dtype, B, Sq, Sk, H, D, masked):
    q, k, v, do = make(B, Sq, Sk, H, D, dtype, seed=Sq)
    mask = random_mask(B, Sk, seed=Sq) if masked else None
    if masked:
        mask[:, -Sk // 7:] = False  # trailing padding, as Skiparse produces
    got = run(q, k, v, do, mask)
    ref = run_ref(q, k, v, do, mask, dtype=torch.float64)
    pt = run_ref(q, k, v, do, mask, dtype=dtype)  # PyTorch computing the same formula in low precision
    e_got, e_pt = max_errors(got, ref), max_errors(pt, ref)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        factor = 2 if i == 0 else 3
        assert e_got[i] <= factor * e_pt[i] + 1e-5, (
            f"{name}: kernel error {e_got[i]:.3e} vs torch {dtype} {e_pt[i]:.3e}")
    if masked:
        assert torch.equal(got[2][~mask], torch.zeros_like(got[2][~mask]))
        assert torch.equal(got[3][~mask], torch.zeros_like(got[3][~mask]))


@pytest.mark.cuda
def test_cuda_fp32_and_fully_masked():
    q, k, v, do = make(3, 300, 200, 2, 96, torch.float32, seed=3)
    mask = random_mask(3, 200, seed=3)
    mask[2] = False
    got = run(q, k, v, do, mask)
    assert_close(got, run_ref(q, k, v, do, mask), torch.float32, "cuda fp32")
    for t in got:
        assert torch.equal(t[2], torch.zeros_like(t[2]))


@pytest.mark.cuda
def test_cuda_backward_is_deterministic():
    q, k, v, do = make(1, 2048, 2048, 4, 128, torch.bfloat16, seed=4)
    mask = random_mask(1, 2048, seed=4)
    a, b = run(q, k, v, do, mask), run(q, k, v, do, mask)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
