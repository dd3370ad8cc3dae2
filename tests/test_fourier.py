"""FlashI2V Fourier high-frequency filter (docs/flashi2v.md#fourier-guidance) against an independent numpy oracle.

The oracle below follows the spec's steps one sample at a time in float64 with numpy.fft and plain loops;
it shares no code with ospfn.  Both backends (ref, and triton: the Triton interpreter on CPU, the compiled
kernels on a GPU) are compared with it on odd and even grids.
"""

import doctest
import math

import numpy as np
import pytest
import torch
from conftest import backend_device, require

import ospfn
from ospfn.ops.fourier import fourier_cutoff, fourier_high_freq

BACKENDS = ("ref", "triton")


@pytest.fixture(params=BACKENDS)
def fb(request):
    require(request.param)
    return request.param


# ----------------------------------------------------------------------------------------------------------
# the oracle


def radius_grid(H: int, W: int) -> np.ndarray:
    """r[y, x] = distance of shifted bin (y, x) from (H//2, W//2), in bin units (spec step 2)."""
    r = np.empty((H, W))
    for y in range(H):
        for x in range(W):
            r[y, x] = math.sqrt((y - H // 2) ** 2 + (x - W // 2) ** 2)
    return r


def oracle(s: torch.Tensor, rho, return_abs: bool = True, *, shifted: bool = True, strict: bool = True, eps=1e-12):
    """Spec section 1 steps 1-6 in float64, sample by sample.  Returns (output [B, C, H, W] float64, cutoffs).

    ``shifted=False`` does the same without fftshift/ifftshift (mask built from the ifftshift-ed radius map);
    ``strict=False`` counts ``cum <= target`` instead of the spec's ``cum < target`` (to show a case can tell
    the two rules apart); ``eps`` is the spec's 1e-12 under the square roots.
    """
    x = s.detach().double().numpy()
    B, C, H, W = x.shape
    rho = [float(rho)] * B if isinstance(rho, (int, float)) else [float(v) for v in rho]
    r = radius_grid(H, W)
    if not shifted:
        r = np.fft.ifftshift(r)
    out = np.empty_like(x)
    cutoffs = []
    for b in range(B):
        F = np.fft.fft2(x[b], axes=(-2, -1))
        if shifted:
            F = np.fft.fftshift(F, axes=(-2, -1))
        A = np.sqrt(F.real**2 + F.imag**2 + eps).mean(axis=0)
        order = np.argsort(r.ravel(), kind="stable")
        cum = np.cumsum(A.ravel()[order])
        target = rho[b] * cum[-1]
        below = cum < target if strict else cum <= target
        k = min(int(np.count_nonzero(below)), H * W - 1)
        cutoff = r.ravel()[order[k]]
        Fh = F * (r >= cutoff)
        if shifted:
            Fh = np.fft.ifftshift(Fh, axes=(-2, -1))
        h = np.fft.ifft2(Fh, axes=(-2, -1))
        out[b] = np.sqrt(h.real**2 + h.imag**2 + eps) if return_abs else h.real
        cutoffs.append(cutoff)
    return out, cutoffs


def latents(B, C, H, W, seed):
    """White noise plus smooth structure, so the magnitude piles up at low frequencies like a VAE latent."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(B, C, H, W, generator=g)
    mean = torch.randn(B, C, 1, 1, generator=g)
    rows = torch.randn(B, C, H, 1, generator=g).cumsum(2) / math.sqrt(H)
    cols = torch.randn(B, C, 1, W, generator=g).cumsum(3) / math.sqrt(W)
    return 0.5 * noise + 0.3 * mean + rows * cols


def run(fn, s, ratio, backend, **kw):
    dev = backend_device(backend)
    if isinstance(ratio, torch.Tensor):
        ratio = ratio.to(dev)
    return fn(s.to(dev), ratio, backend=backend, **kw).cpu()


def assert_close(got: torch.Tensor, want: np.ndarray, tol: float):
    want_t = torch.from_numpy(want).to(torch.float64)
    err = (got.double() - want_t).abs().max().item()
    scale = max(1.0, want_t.abs().max().item())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol * scale:.3g}"


# ----------------------------------------------------------------------------------------------------------
# against the oracle

SHAPES = [(7, 9), (8, 16), (12, 11), (11, 12), (10, 10)]


@pytest.mark.parametrize("return_abs", [True, False])
@pytest.mark.parametrize("hw", SHAPES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_matches_oracle(fb, hw, return_abs):
    H, W = hw
    s = latents(3, 3, H, W, seed=H * 100 + W)
    rho = torch.tensor([0.15, 0.6, 1.0])  # 1.0: the clamp, and only the outermost bins survive
    want, want_cut = oracle(s, rho.tolist(), return_abs)
    got = run(fourier_high_freq, s, rho, fb, return_abs=return_abs)
    assert got.dtype == torch.float32 and got.shape == s.shape
    assert_close(got, want, 2e-6)
    assert 0 < want_cut[0] < want_cut[1] < want_cut[2], "the case must remove something, differently per sample"
    assert want_cut[2] == math.hypot(H // 2, W // 2)
    assert run(fourier_cutoff, s, rho, fb).tolist() == pytest.approx(want_cut, rel=1e-6)


def test_degenerate_grids(fb):
    """Single rows, columns and bins, and a 2x2 grid (every bin on the Nyquist row or column)."""
    for H, W in [(1, 5), (6, 1), (1, 1), (2, 2), (1, 2)]:
        s = latents(3, 2, H, W, seed=H * 10 + W)
        rho = torch.tensor([0.0, 0.5, 1.0])
        for return_abs in (True, False):
            want, want_cut = oracle(s, rho.tolist(), return_abs)
            assert_close(run(fourier_high_freq, s, rho, fb, return_abs=return_abs), want, 2e-6)
        assert run(fourier_cutoff, s, rho, fb).tolist() == pytest.approx(want_cut, rel=1e-6)


def test_non_contiguous_input(fb):
    base = latents(2, 3, 10, 7, seed=37)
    s = base.transpose(-1, -2)  # [2, 3, 7, 10], not contiguous
    assert not s.is_contiguous()
    rho = torch.tensor([0.3, 0.7])
    assert_close(run(fourier_high_freq, s, rho, fb), oracle(s.contiguous(), rho.tolist())[0], 2e-6)


def test_matches_oracle_at_latent_size():
    """ref on a real latent grid (60x104, 16 channels) at the training and inference ratios."""
    s = latents(2, 16, 60, 104, seed=7)
    rho = torch.tensor([0.1, 0.9])
    want, want_cut = oracle(s, rho.tolist())
    assert_close(fourier_high_freq(s, rho, backend="ref"), want, 2e-6)
    assert fourier_cutoff(s, rho, backend="ref").tolist() == pytest.approx(want_cut, rel=1e-6)


def test_unshifted_mask_equals_shifted():
    """The identity the triton backend relies on: masking in unshifted index space with the ifftshift-ed
    radius map is the spec's fftshift -> mask -> ifftshift, for odd and even sizes."""
    for H, W in [(7, 9), (8, 16), (12, 11)]:
        s = latents(2, 2, H, W, seed=3)
        a, ca = oracle(s, [0.2, 0.7])
        b, cb = oracle(s, [0.2, 0.7], shifted=False)
        assert ca == cb
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block", [4, 16])
def test_triton_tiling(monkeypatch, block):
    """Small blocks under the interpreter: many programs, several cutoff-loop iterations and partial-sum
    chunks, the early exit of the cutoff loop, channel tiles, and blocks with and without low-frequency bins."""
    require("triton")
    if not ospfn.backends.interpreting():
        pytest.skip("block sizes are only overridden under the interpreter; the cuda tests cover real sizes")
    import ospfn.kernels.fourier as kf

    monkeypatch.setattr(kf, "_config", lambda n, cuda_block: block)
    monkeypatch.setattr(kf, "_cblock", lambda C: 2)  # 3 channels in two tiles, the second one half masked
    s = latents(6, 3, 9, 12, seed=11)
    s[:4, 2] *= 4  # the channel in the half-masked tile weighs most in A
    s[4:] *= 3e-8  # where the epsilon dominates, a masked channel must not add sqrt(1e-12)
    rho = torch.tensor([0.0, 0.3, 0.75, 1.0, 0.2, 0.7])
    want, want_cut = oracle(s, rho.tolist())
    assert want_cut[:4] != oracle(s[:4, :2], rho[:4].tolist())[1], "the case must depend on the last channel"
    assert want_cut[4:] != oracle(s[4:], rho[4:].tolist(), eps=0.0)[1], "the case must depend on the epsilon"
    got = fourier_high_freq(s, rho, backend="triton")
    assert_close(got[:4], want[:4], 2e-6)
    np.testing.assert_allclose(got[4:].double().numpy(), want[4:], rtol=1e-5, atol=0)
    assert fourier_cutoff(s, rho, backend="triton").tolist() == pytest.approx(want_cut, rel=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_ref_on_cuda(dtype):
    """Compiled kernels at latent sizes (60x104 and 90x160, 16 channels) on the GPU: same cutoffs as the ref,
    and an error against the float64 oracle at most twice the ref's own (plus a 1e-6 relative floor)."""
    require("triton")
    for H, W in [(60, 104), (90, 160)]:
        s = latents(4, 16, H, W, seed=H).to("cuda", dtype)
        rho = torch.tensor([0.05, 0.1, 0.5, 0.95], device="cuda")
        assert torch.equal(fourier_cutoff(s, rho, backend="triton"), fourier_cutoff(s, rho, backend="ref"))
        for return_abs in (True, False):
            want = torch.from_numpy(oracle(s.float().cpu(), rho.tolist(), return_abs)[0])
            got = fourier_high_freq(s, rho, return_abs=return_abs, backend="triton")
            ref = fourier_high_freq(s, rho, return_abs=return_abs, backend="ref")
            assert got.dtype == dtype
            err = (got.cpu().double() - want).abs().max().item()
            err_ref = (ref.cpu().double() - want).abs().max().item()
            assert err <= 2 * err_ref + 1e-6 * want.abs().max().item(), (err, err_ref)


# ----------------------------------------------------------------------------------------------------------
# the cutoff rule, exactly


def delta(B, C, H, W):
    s = torch.zeros(B, C, H, W)
    # Every bin of the spectrum is exactly 256, whose square swallows the 1e-12 epsilon even in float64, so the
    # magnitudes and their cumulative sums are exact in both the fp32 backends and the float64 oracle.
    s[:, :, 0, 0] = 256.0
    return s


def test_cutoff_rule_at_exact_ties(fb):
    """A delta makes A = 256 for all 128 bins, so with rho = m/128 the target equals the cumulative sum at the
    end of the m-th bin: the spec's strict ``cum < target`` keeps that bin (and its radius) in the high band.
    m = 1 is the spec's "the DC bin alone reaches the target: nothing is removed"."""
    H, W = 8, 16
    s = delta(2, 3, H, W)
    r_sorted = np.sort(radius_grid(H, W).ravel())
    ends = [m for m in range(1, H * W) if r_sorted[m - 1] < r_sorted[m]][:6]
    ends += [H * W // 2] if r_sorted[H * W // 2 - 1] < r_sorted[H * W // 2] else []
    for m in ends:
        rho = m / (H * W)
        _, want = oracle(s, rho)
        _, other = oracle(s, rho, strict=False)
        assert want != other, "the case must tell cum < target from cum <= target"
        assert want[0] == r_sorted[m - 1]
        got = run(fourier_cutoff, s, rho, fb)
        assert got.tolist() == pytest.approx(want, rel=1e-6), f"m = {m}"
    # m = 1: nothing removed, the output is |s|
    y = run(fourier_high_freq, s, 1 / (H * W), fb)
    assert run(fourier_cutoff, s, 1 / (H * W), fb).tolist() == [0.0, 0.0]
    torch.testing.assert_close(y, s, rtol=1e-6, atol=1e-5)


def test_epsilon_in_the_magnitude(fb):
    """Latents of scale 1e-7: the 1e-12 under the square root is comparable to |F|^2 and moves the cutoffs."""
    s = latents(4, 3, 9, 10, seed=41) * 1e-7
    rho = [0.2, 0.4, 0.6, 0.8]
    want, want_cut = oracle(s, rho)
    assert want_cut != oracle(s, rho, eps=0.0)[1], "the case must depend on the epsilon"
    assert run(fourier_cutoff, s, torch.tensor(rho), fb).tolist() == pytest.approx(want_cut, rel=1e-6)
    got = run(fourier_high_freq, s, torch.tensor(rho), fb)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=0)


def test_rho_zero_gives_abs(fb):
    for H, W in [(7, 9), (8, 16)]:
        s = latents(2, 3, H, W, seed=5)
        torch.testing.assert_close(run(fourier_high_freq, s, 0.0, fb), torch.sqrt(s * s + 1e-12), rtol=0, atol=1e-5)
        torch.testing.assert_close(run(fourier_high_freq, s, 0.0, fb, return_abs=False), s, rtol=0, atol=1e-5)
        assert run(fourier_cutoff, s, 0.0, fb).tolist() == [0.0, 0.0]


def test_cutoff_monotone_in_rho(fb):
    """One batch holds the same sample 21 times with rho = 0, 0.05, ..., 1."""
    H, W = 11, 12
    rhos = torch.linspace(0, 1, 21)
    s = latents(1, 3, H, W, seed=9).expand(len(rhos), -1, -1, -1)
    cut = run(fourier_cutoff, s, rhos, fb)
    assert cut[0] == 0.0
    assert cut[-1] == pytest.approx(math.hypot(H // 2, W // 2), rel=1e-6)  # rho = 1: only the outermost bins
    assert bool((cut[1:] >= cut[:-1]).all()), cut.tolist()
    assert len(set(cut.tolist())) >= 8, "the sweep must move the cutoff"
    assert cut.tolist() == pytest.approx(oracle(s, rhos.tolist())[1], rel=1e-6)


def test_each_sample_uses_its_own_rho(fb):
    H, W = 9, 10
    s = latents(3, 3, H, W, seed=13)
    rho = torch.tensor([0.1, 0.5, 0.9])
    y = run(fourier_high_freq, s, rho, fb)
    for b in range(3):
        alone = run(fourier_high_freq, s[b : b + 1], float(rho[b]), fb)
        torch.testing.assert_close(y[b : b + 1], alone, rtol=1e-6, atol=1e-6)
    # and the ratios matter: one shared rho would give another result
    assert not torch.allclose(y, run(fourier_high_freq, s, 0.5, fb), atol=1e-3)


def test_tensor_and_float_ratio_agree(fb):
    s = latents(2, 3, 8, 9, seed=17)
    want = run(fourier_high_freq, s, 0.3, fb)
    assert torch.equal(run(fourier_high_freq, s, torch.tensor([0.3, 0.3]), fb), want)
    assert torch.equal(run(fourier_high_freq, s, torch.tensor(0.3), fb), want)  # 0-d: every sample
    assert torch.equal(run(fourier_high_freq, s, torch.tensor([0.3, 0.3], dtype=torch.float64), fb), want)


def test_invariant_to_fftshift_round_trip(fb):
    """Filtering commutes with a circular shift of the input: ifftshift(f(fftshift(s))) = f(s)."""
    for H, W in [(7, 9), (8, 12)]:
        s = latents(2, 3, H, W, seed=19)
        rho = torch.tensor([0.2, 0.6])
        y = run(fourier_high_freq, s, rho, fb)
        shifted = torch.fft.fftshift(s, dim=(-2, -1))
        y2 = torch.fft.ifftshift(run(fourier_high_freq, shifted, rho, fb), dim=(-2, -1))
        torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_dtype(fb, dtype):
    s = latents(2, 3, 8, 11, seed=23).to(dtype)
    rho = torch.tensor([0.1, 0.7])
    for return_abs in (True, False):
        y = run(fourier_high_freq, s, rho, fb, return_abs=return_abs)
        assert y.dtype == dtype and y.shape == s.shape
        want, _ = oracle(s.float(), rho.tolist(), return_abs)  # computed in fp32 from the upcast input
        want_rounded = torch.from_numpy(want).to(dtype).double().numpy()
        ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        assert_close(y, want_rounded, ulp)  # at most one rounding step away


def test_float64_is_computed_in_float64(fb):
    s = latents(2, 3, 7, 10, seed=29).double()
    rho = torch.tensor([0.25, 0.8], dtype=torch.float64)
    y = run(fourier_high_freq, s, rho, fb)
    assert y.dtype == torch.float64
    assert_close(y, oracle(s, rho.tolist())[0], 1e-12)


def test_no_autograd(fb):
    s = latents(2, 3, 7, 9, seed=31).requires_grad_()
    y = run(fourier_high_freq, s, 0.4, fb)
    assert not y.requires_grad and y.grad_fn is None


def test_empty_batch(fb):
    s = torch.zeros(0, 3, 7, 9)
    assert run(fourier_high_freq, s, 0.5, fb).shape == s.shape
    assert run(fourier_cutoff, s, 0.5, fb).shape == (0,)


# ----------------------------------------------------------------------------------------------------------
# bad input, registration, docs

GOOD = torch.zeros(2, 3, 4, 5)


@pytest.mark.parametrize(
    "s, ratio, kw, exc, match",
    [
        ([[1.0]], 0.1, {}, TypeError, r"fourier_high_freq: s must be a torch.Tensor .* got list"),
        (torch.zeros(2, 3, 4, 5, dtype=torch.int32), 0.1, {}, TypeError, r"s must be a real floating-point .*int32"),
        (torch.zeros(2, 3, 4, 5, dtype=torch.complex64), 0.1, {}, TypeError, r"s must be a real floating-point"),
        (torch.zeros(3, 4, 5), 0.1, {}, ValueError, r"s must have shape \[B, C, H, W\] \(4 dims\).*\(3, 4, 5\)"),
        (torch.zeros(1, 2, 3, 4, 5), 0.1, {}, ValueError, r"4 dims"),
        (GOOD, -0.1, {}, ValueError, r"fourier_high_freq: ratio must be in \[0, 1\], got -0.1"),
        (GOOD, 1.5, {}, ValueError, r"ratio must be in \[0, 1\], got 1.5"),
        (GOOD, float("nan"), {}, ValueError, r"ratio must be in \[0, 1\], got nan"),
        (GOOD, True, {}, TypeError, r"ratio must be a float in \[0, 1\] or a float tensor of shape \[B\] = \[2\]"),
        (GOOD, "0.1", {}, TypeError, r"ratio must be .* got str"),
        (GOOD, [0.1, 0.2], {}, TypeError, r"ratio must be .* got list"),
        (GOOD, torch.tensor([0.1, 0.2, 0.3]), {}, ValueError, r"ratio tensor must have shape \[B\] = \[2\].*\(3,\)"),
        (GOOD, torch.zeros(2, 1), {}, ValueError, r"ratio tensor must have shape \[B\] = \[2\].*\(2, 1\)"),
        (GOOD, torch.tensor([0, 1]), {}, TypeError, r"ratio must be .* got dtype torch.int64"),
        (GOOD, torch.tensor([0.5, 1.25]), {}, ValueError, r"ratio values must be in \[0, 1\], got \[1.25\] \(at \[1\]"),
        (GOOD, torch.tensor([float("nan"), 0.5]), {}, ValueError, r"ratio values must be in \[0, 1\], got \[nan\]"),
        (GOOD, 0.1, {"return_abs": 1}, TypeError, r"return_abs must be a bool, got 1"),
        (GOOD, 0.1, {"backend": "cuda"}, ValueError, r"backend must be one of"),
    ],
)
def test_bad_input(s, ratio, kw, exc, match):
    with pytest.raises(exc, match=match):
        fourier_high_freq(s, ratio, **kw)


def test_bad_input_cutoff():
    with pytest.raises(ValueError, match=r"fourier_cutoff: ratio must be in \[0, 1\], got 2"):
        fourier_cutoff(GOOD, 2)
    with pytest.raises(ValueError, match=r"fourier_cutoff: s must have shape"):
        fourier_cutoff(torch.zeros(4, 5), 0.1)


def test_registered_backends():
    for op in ("fourier_high_freq", "fourier_cutoff"):
        assert set(ospfn.backends.implementations(op)) >= {"ref", "triton"}
    assert ospfn.backends.resolve("fourier_high_freq", None, "cpu") == "ref"


def test_docstring_examples():
    import ospfn.ops.fourier as mod

    res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
