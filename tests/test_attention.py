"""The attention dispatcher: every backend against a float64 reference written here."""

import pytest
import torch

import ospfn
from ospfn.ops import attention


def reference(q, k, v, mask, scale):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # an all-masked entry -> zeros
    return torch.einsum("bhqk,bkhd->bqhd", p, v.double())


def make(B=3, Sq=11, Sk=13, H=2, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, H, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, Sk, H, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Sk, H, D, generator=g).to(dtype).requires_grad_()
    mask = torch.rand(B, Sk, generator=g) > 0.3
    mask[0] = True
    mask[-1] = False  # an entry with no real key at all
    return q, k, v, mask


@pytest.mark.parametrize("backend", ["ref", "torch"])
@pytest.mark.parametrize("use_mask", [True, False])
def test_forward_and_grads(backend, use_mask):
    q, k, v, mask = make()
    mask = mask if use_mask else None
    out = attention(q, k, v, key_mask=mask, scale=0.3, backend=backend)
    want = reference(q, k, v, mask, 0.3)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), go)
    exp = torch.autograd.grad(want, (q, k, v), go.double())
    for a, b in zip(got, exp):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)
    if use_mask:
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))
        assert all(torch.equal(g[-1], torch.zeros_like(g[-1])) for g in got)
        assert bool((got[1][~mask] == 0).all()) and bool((got[2][~mask] == 0).all())  # masked keys: no dk, dv


def test_bf16_error_is_that_of_pytorch():
    """bf16 through the dispatcher errs no more than 2x PyTorch's own bf16 math (FlashAttention's rule)."""
    q, k, v, mask = make(seed=1)
    want = reference(q, k, v, mask, 0.25)
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    out = attention(qb, kb, vb, key_mask=mask, scale=0.25)
    assert out.dtype == torch.bfloat16
    s = (torch.einsum("bqhd,bkhd->bhqk", qb, kb) * 0.25).masked_fill(~mask[:, None, None, :], float("-inf"))
    base = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1).nan_to_num(0.0), vb)
    assert (out.double() - want).abs().max() <= 2 * (base.double() - want).abs().max()


def test_auto_uses_pytorch_fused_kernel_on_cpu():
    assert ospfn.backends.resolve("attention", None, "cpu") == "torch"


def test_bad_inputs():
    q, k, v, mask = make()
    with pytest.raises(ValueError, match=r"attention: key_mask must have shape \[3, 13\] \(batch, Sk\), got \(3, 11\)"):
        attention(q, k, v, key_mask=mask[:, :11])
    with pytest.raises(TypeError, match=r"key_mask must be a bool tensor"):
        attention(q, k, v, key_mask=mask.float())
    with pytest.raises(ValueError, match=r"k must have shape \[3, Sk, 2, 16\]"):
        attention(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match=r"v must have the shape of k"):
        attention(q, k, v[:, :5])
    with pytest.raises(TypeError, match=r"q, k, v must share a dtype"):
        attention(q, k.half(), v)
    with pytest.raises(TypeError, match=r"q must be float32, float16, bfloat16 or float64"):
        attention(q.long(), k, v)
    with pytest.raises(ValueError, match=r"q must have shape \[batch, seq, heads, head_dim\]"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0"):
        attention(q, k, v, scale=-1.0)
