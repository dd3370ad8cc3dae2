"""Skiparse-2D fold / unfold / switch / masks / positions (docs/skiparse.md).

The oracle is brute-force index arithmetic over the padded grid written here from the spec's digit
definitions, not a call into the code under test.
"""

import itertools

import pytest
import torch

from ospfn.ops import (
    attention,
    skiparse_fold,
    skiparse_key_mask,
    skiparse_layout,
    skiparse_positions,
    skiparse_switch,
    skiparse_unfold,
)

# (T, H, W): T = 1, H and W not multiples of P^2, squares, tiny
GRIDS = [(1, 5, 7), (2, 6, 9), (3, 4, 4), (1, 9, 10), (2, 3, 3)]
RATIOS = [1, 2, 3]


def cases():
    for grid, P in itertools.product(GRIDS, RATIOS):
        if grid[1] >= P and grid[2] >= P:
            yield grid, P


def ceil_to(n, m):
    return -(-n // m) * m


def oracle_folded_index(grid, P, kind, B):
    """dict (b, t, h, w) -> (folded batch row, folded position), for every slot of the padded grid.

    token: sub-sequence (h mod P, w mod P), tokens ordered by (t, h div P, w div P);
    group: sub-sequence ((h div P) mod P, (w div P) mod P), tokens ordered by (t, h div P^2, h mod P,
    w div P^2, w mod P).  Folded batch row = slot * B + b.
    """
    T, H, W = grid
    Hp, Wp = ceil_to(H, P * P), ceil_to(W, P * P)
    out = {}
    for b, t, h, w in itertools.product(range(B), range(T), range(Hp), range(Wp)):
        if kind == "token":
            slot = (h % P) * P + (w % P)
            s = (t * (Hp // P) + h // P) * (Wp // P) + w // P
        else:
            slot = ((h // P) % P) * P + (w // P) % P
            s = (((t * (Hp // (P * P)) + h // (P * P)) * P + h % P) * (Wp // (P * P)) + w // (P * P)) * P + w % P
        out[(b, t, h, w)] = (slot * B + b, s)
    return out


def oracle_fold(x, grid, P, kind):
    B, N, C = x.shape
    T, H, W = grid
    Hp, Wp = ceil_to(H, P * P), ceil_to(W, P * P)
    y = torch.zeros(P * P * B, T * Hp * Wp // (P * P), C, dtype=x.dtype)
    for (b, t, h, w), (fb, s) in oracle_folded_index(grid, P, kind, B).items():
        if h < H and w < W:
            y[fb, s] = x[b, (t * H + h) * W + w]
    return y


def tokens(B, grid, C, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, grid[0] * grid[1] * grid[2], C, generator=g).to(dtype)


@pytest.mark.parametrize("kind", ["token", "group"])
@pytest.mark.parametrize("grid,P", list(cases()))
def test_fold_matches_digit_oracle(grid, P, kind):
    x = tokens(2, grid, 3)
    assert torch.equal(skiparse_fold(x, grid, P, kind, backend="ref"), oracle_fold(x, grid, P, kind))


@pytest.mark.parametrize("kind", ["token", "group"])
@pytest.mark.parametrize("grid,P", list(cases()))
def test_round_trips(grid, P, kind):
    x = tokens(3, grid, 4, seed=1)
    y = skiparse_fold(x, grid, P, kind)
    assert torch.equal(skiparse_unfold(y, grid, P, kind), x)
    assert torch.equal(skiparse_switch(skiparse_switch(y, grid, P), grid, P), y)
    other = "group" if kind == "token" else "token"
    assert torch.equal(skiparse_switch(y, grid, P), skiparse_fold(x, grid, P, other))


@pytest.mark.parametrize("grid,P", [c for c in cases() if c[1] > 1])
def test_partition_is_defined_by_digits(grid, P):
    """Every folded row holds exactly the tokens sharing the defining digit pair (and all of them)."""
    T, H, W = grid
    pos = skiparse_positions(grid, P, None)[0]  # [N, 3]
    x = torch.arange(T * H * W, dtype=torch.float32)[None, :, None]
    for kind in ("token", "group"):
        y = skiparse_fold(x + 1, grid, P, kind)[:, :, 0]  # 0 marks padding
        for slot in range(P * P):
            ids = y[slot][y[slot] > 0].long() - 1
            h, w = pos[ids, 1], pos[ids, 2]
            if kind == "token":
                want = ((pos[:, 1] % P) * P + pos[:, 2] % P) == slot
                assert bool((((h % P) * P + w % P) == slot).all())
            else:
                want = (((pos[:, 1] // P) % P) * P + (pos[:, 2] // P) % P) == slot
                assert bool(((((h // P) % P) * P + (w // P) % P) == slot).all())
            assert sorted(ids.tolist()) == want.nonzero().flatten().tolist()


def test_ratio_one_is_identity():
    x = tokens(2, (2, 5, 7), 3)
    for kind in ("token", "group"):
        assert torch.equal(skiparse_fold(x, (2, 5, 7), 1, kind), x)
    assert skiparse_key_mask((2, 5, 7), 1, "token", 2) is None


@pytest.mark.parametrize("kind", ["token", "group"])
@pytest.mark.parametrize("grid,P", list(cases()))
def test_key_mask(grid, P, kind):
    T, H, W = grid
    B = 2
    m = skiparse_key_mask(grid, P, kind, B)
    if H % (P * P) == 0 and W % (P * P) == 0:
        assert m is None
        return
    lay = skiparse_layout(grid, P)
    assert m.dtype == torch.bool and m.shape == (P * P * B, lay.seq)
    want = torch.zeros_like(m)
    for (b, t, h, w), (fb, s) in oracle_folded_index(grid, P, kind, B).items():
        want[fb, s] = h < H and w < W
    assert torch.equal(m, want)


@pytest.mark.parametrize("kind", ["token", "group"])
@pytest.mark.parametrize("grid,P", list(cases()))
def test_positions(grid, P, kind):
    T, H, W = grid
    pos = skiparse_positions(grid, P, kind)
    lay = skiparse_layout(grid, P)
    assert pos.shape == (P * P, lay.seq, 3)
    want = torch.full_like(pos, -1)
    for (b, t, h, w), (fb, s) in oracle_folded_index(grid, P, kind, 1).items():
        if h < H and w < W:
            want[fb, s] = torch.tensor([t, h, w])
    assert torch.equal(pos, want)


# ------------------------------------------------------------------------------------------- triton kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grid,P", [((1, 5, 7), 2), ((2, 6, 9), 2), ((2, 9, 10), 3), ((3, 4, 4), 2)])
def test_triton_permutations_bit_exact(grid, P, dtype):
    from conftest import backend_device, require

    require("triton")
    dev = backend_device("triton")
    x = tokens(2, grid, 5, seed=2, dtype=dtype)
    for kind in ("token", "group"):
        y_ref = skiparse_fold(x, grid, P, kind, backend="ref")
        y = skiparse_fold(x.to(dev), grid, P, kind, backend="triton").cpu()
        assert torch.equal(y, y_ref), kind
        assert torch.equal(skiparse_switch(y_ref.to(dev), grid, P, backend="triton").cpu(), skiparse_switch(y_ref, grid, P, backend="ref"))
        assert torch.equal(skiparse_unfold(y_ref.to(dev), grid, P, kind, backend="triton").cpu(), x)


def test_triton_noncontiguous_and_grads():
    from conftest import backend_device, require

    require("triton")
    dev = backend_device("triton")
    grid, P = (2, 5, 6), 2
    base = tokens(2, grid, 8, seed=3)
    x_ref = base[:, :, ::2].clone().requires_grad_()  # same values, contiguous
    x_tri = base.to(dev)[:, :, ::2].detach().requires_grad_()  # channel stride 2
    g = torch.randn(4 * 2, skiparse_layout(grid, P).seq, 4)
    for kind in ("token", "group"):
        yr = skiparse_switch(skiparse_fold(x_ref, grid, P, kind, backend="ref"), grid, P, backend="ref")
        yt = skiparse_switch(skiparse_fold(x_tri, grid, P, kind, backend="triton"), grid, P, backend="triton")
        assert torch.equal(yt.detach().cpu(), yr.detach())
        (gr,) = torch.autograd.grad(yr, x_ref, g)
        (gt,) = torch.autograd.grad(yt, x_tri, g.to(dev))
        assert torch.equal(gt.cpu(), gr)
        zr = skiparse_unfold(yr, grid, P, "group" if kind == "token" else "token", backend="ref")
        assert torch.equal(zr.detach(), x_ref.detach())


def test_fold_backward_drops_pad_gradients():
    grid, P = (1, 5, 7), 2
    x = tokens(1, grid, 2).requires_grad_()
    y = skiparse_fold(x, grid, P, "token")
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.ones_like(x))  # every real token appears exactly once


# ------------------------------------------------------------------------------- sparse attention semantics


def subsequence_id(grid, P, kind):
    """[N] sub-sequence of each raster token by digit arithmetic."""
    T, H, W = grid
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    h, w = h.flatten(), w.flatten()
    if kind == "token":
        return (h % P) * P + w % P
    return ((h // P) % P) * P + (w // P) % P


def dense_masked_attention(q, k, v, allowed):
    """Straightforward fp64 attention with an explicit [N, N] boolean mask in raster order."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double())


def sparse_attention(q, k, v, grid, P, kind, backend):
    B, N, H, D = q.shape
    fold = lambda t: skiparse_fold(t.reshape(B, N, H * D), grid, P, kind).reshape(-1, skiparse_layout(grid, P).seq, H, D)  # noqa: E731
    mask = skiparse_key_mask(grid, P, kind, B)
    o = attention(fold(q), fold(k), fold(v), key_mask=mask, backend=backend)
    return skiparse_unfold(o.reshape(o.shape[0], o.shape[1], H * D), grid, P, kind).reshape(B, N, H, D)


@pytest.mark.parametrize("attn_backend", ["ref", "torch", "triton"])
@pytest.mark.parametrize("kind", ["token", "group"])
@pytest.mark.parametrize("grid,P", [((1, 5, 7), 2), ((2, 6, 5), 2), ((1, 9, 10), 3)])
def test_sparse_attention_equals_masked_dense(grid, P, kind, attn_backend):
    from conftest import require

    require(attn_backend)
    B, H, D = 2, 2, 8
    N = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, N, H, D, generator=g, dtype=torch.float32).requires_grad_() for _ in range(3))
    sid = subsequence_id(grid, P, kind)
    allowed = sid[:, None] == sid[None, :]
    want = dense_masked_attention(q, k, v, allowed)
    got = sparse_attention(q, k, v, grid, P, kind, attn_backend)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    go = torch.randn(B, N, H, D, generator=g)
    gw = torch.autograd.grad(want, (q, k, v), go.double())
    gg = torch.autograd.grad(got, (q, k, v), go)
    for a, b, name in zip(gg, gw, "qkv"):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("kind", ["token", "group"])
def test_pad_tokens_never_influence_real_outputs(kind):
    grid, P, B, H, D = (1, 5, 7), 2, 1, 2, 4
    lay = skiparse_layout(grid, P)
    g = torch.Generator().manual_seed(8)
    qkv = [skiparse_fold(torch.randn(B, lay.n, H * D, generator=g), grid, P, kind).reshape(4 * B, lay.seq, H, D) for _ in range(3)]
    mask = skiparse_key_mask(grid, P, kind, B)
    out = attention(*qkv, key_mask=mask)
    poisoned = [t.clone() for t in qkv]
    for t in poisoned:
        t[~mask] = 1e4 * torch.randn(t[~mask].shape, generator=g)
    out2 = attention(*poisoned, key_mask=mask)
    real = lambda o: skiparse_unfold(o.reshape(4 * B, lay.seq, H * D), grid, P, kind)  # noqa: E731
    assert torch.equal(real(out), real(out2))


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_inputs():
    x = tokens(1, (2, 5, 7), 3)
    with pytest.raises(ValueError, match=r"skiparse_fold: x has 70 tokens but grid \(2, 5, 6\) has T\*H\*W = 60"):
        skiparse_fold(x, (2, 5, 6), 2, "token")
    with pytest.raises(ValueError, match=r"skiparse_fold: ratio must be an int >= 1, got 0"):
        skiparse_fold(x, (2, 5, 7), 0, "token")
    with pytest.raises(ValueError, match=r"ratio must be an int >= 1, got 2.0"):
        skiparse_fold(x, (2, 5, 7), 2.0, "token")
    with pytest.raises(ValueError, match=r"skiparse_fold: kind must be one of \('token', 'group'\), got 'full'"):
        skiparse_fold(x, (2, 5, 7), 2, "full")
    with pytest.raises(ValueError, match=r"grid H and W must be >= ratio \(3\).*H=5, W=2"):
        skiparse_fold(tokens(1, (1, 5, 2), 3), (1, 5, 2), 3, "token")
    with pytest.raises(ValueError, match=r"grid must be a \(T, H, W\) triple"):
        skiparse_fold(x, (70,), 2, "token")
    with pytest.raises(ValueError, match=r"grid W must be a positive int, got -7"):
        skiparse_fold(x, (2, 5, -7), 2, "token")
    with pytest.raises(ValueError, match=r"x must have shape \[batch, tokens, channels\]"):
        skiparse_fold(x[0], (2, 5, 7), 2, "token")
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        skiparse_fold(x.numpy(), (2, 5, 7), 2, "token")
    y = skiparse_fold(x, (2, 5, 7), 2, "token")
    with pytest.raises(ValueError, match=r"skiparse_unfold: y must have shape \[ratio\^2 \* B, 32, C\]"):
        skiparse_unfold(y[:, :-1], (2, 5, 7), 2, "token")
    with pytest.raises(ValueError, match=r"skiparse_switch: y must have shape"):
        skiparse_switch(y[:3], (2, 5, 7), 2)
    with pytest.raises(ValueError, match=r"batch must be a positive int, got 0"):
        skiparse_key_mask((2, 5, 7), 2, "token", 0)
