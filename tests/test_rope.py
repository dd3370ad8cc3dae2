"""Wan2.1 3D RoPE (docs/skiparse.md#true-positions-for-rope) against a complex-number reference written here."""

import pytest
import torch

from ospfn.ops import rope_3d, rope_split, skiparse_fold, skiparse_layout, skiparse_positions


def wan_style_reference(x, grid, theta=10000.0):
    """Complex multiplication as in the Wan2.1 reference: per-axis polar tables over positions 0..1023,
    split of the c = D/2 complex channels into c - 2(c//3), c//3, c//3, all in float64."""
    B, N, H, D = x.shape
    T, Hh, Ww = grid
    c = D // 2

    def table(dim):
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        ang = torch.outer(torch.arange(1024, dtype=torch.float64), inv)
        return torch.polar(torch.ones_like(ang), ang)

    freqs = torch.cat([table(D - 4 * (D // 6)), table(2 * (D // 6)), table(2 * (D // 6))], dim=1)
    ft, fh, fw = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f = torch.cat(
        [
            ft[:T].view(T, 1, 1, -1).expand(T, Hh, Ww, -1),
            fh[:Hh].view(1, Hh, 1, -1).expand(T, Hh, Ww, -1),
            fw[:Ww].view(1, 1, Ww, -1).expand(T, Hh, Ww, -1),
        ],
        dim=-1,
    ).reshape(N, 1, c)
    xc = torch.view_as_complex(x.double().reshape(B, N, H, c, 2))
    return torch.view_as_real(xc * f).flatten(3)


def test_split_of_wan():
    assert rope_split(128) == (44, 42, 42)
    assert rope_split(64) == (24, 20, 20)
    assert rope_split(40) == (16, 12, 12)


@pytest.mark.parametrize("D", [128, 64, 40])
@pytest.mark.parametrize("grid", [(3, 5, 7), (1, 4, 9)])
def test_matches_wan_reference(D, grid):
    N = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, N, 3, D, generator=torch.Generator().manual_seed(0))
    got = rope_3d(x, skiparse_positions(grid, 1, None))
    torch.testing.assert_close(got.double(), wan_style_reference(x, grid), rtol=1e-5, atol=1e-5)


def test_large_positions():
    grid = (2, 3, 1000)  # positions up to 999: angles up to ~1000 rad, still accurate
    x = torch.randn(1, 6000, 1, 64, generator=torch.Generator().manual_seed(1))
    got = rope_3d(x, skiparse_positions(grid, 1, None))
    torch.testing.assert_close(got.double(), wan_style_reference(x, grid), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kind", ["token", "group"])
def test_true_positions_under_fold(kind):
    """Rotating folded tokens by their folded positions equals folding rotated tokens; pad slots stay put."""
    grid, P, B, H, D = (2, 5, 7), 2, 2, 2, 24
    lay = skiparse_layout(grid, P)
    x = torch.randn(B, lay.n, H, D, generator=torch.Generator().manual_seed(2))
    rotated = rope_3d(x, skiparse_positions(grid, 1, None))
    want = skiparse_fold(rotated.reshape(B, lay.n, H * D), grid, P, kind).reshape(-1, lay.seq, H, D)
    folded = skiparse_fold(x.reshape(B, lay.n, H * D), grid, P, kind).reshape(-1, lay.seq, H, D)
    folded = folded + (folded == 0) * 3.0  # give pad slots a value, which must pass through unrotated
    got = rope_3d(folded, skiparse_positions(grid, P, kind))
    real = skiparse_positions(grid, P, kind)[..., 0].repeat_interleave(B, 0) >= 0
    assert torch.equal(got[real], want[real])
    assert torch.equal(got[~real], folded[~real])


def test_bf16_computed_in_fp32():
    grid = (2, 3, 4)
    x = torch.randn(1, 24, 2, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    got = rope_3d(x, skiparse_positions(grid, 1, None))
    assert got.dtype == torch.bfloat16
    want = wan_style_reference(x.float(), grid).float().bfloat16()  # rotate in high precision, round once
    assert torch.equal(got, want)


def test_bad_inputs():
    x = torch.randn(1, 6, 2, 16)
    with pytest.raises(ValueError, match="positions cover 5 tokens but x has 6"):
        rope_3d(x, torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        rope_3d(x, torch.zeros(6, 3))
    with pytest.raises(ValueError, match="head_dim must be an even int >= 6"):
        rope_3d(torch.randn(1, 6, 2, 5), torch.zeros(6, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a float tensor"):
        rope_3d(torch.zeros(1, 6, 2, 16, dtype=torch.long), torch.zeros(6, 3, dtype=torch.long))


def test_complex_and_real_rotation_agree():
    """apply_rope multiplies complex numbers on CPU/CUDA and uses the real formula elsewhere (NPU): same values."""
    from ospfn.ops.rope import _rotate_pairs

    g = torch.Generator().manual_seed(3)
    xf = torch.randn(2, 3, 5, 4, 8, 2, generator=g)
    ang = torch.randn(2, 1, 5, 1, 8, generator=g)
    c, s = torch.cos(ang), torch.sin(ang)
    want = torch.stack([xf[..., 0] * c - xf[..., 1] * s, xf[..., 0] * s + xf[..., 1] * c], dim=-1)
    torch.testing.assert_close(_rotate_pairs(xf, c, s, True), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(_rotate_pairs(xf, c, s, False), want)
