"""Triton kernels for FlashI2V's Fourier high-frequency filter (installed as ``ospfn.kernels.fourier``).

The ``triton`` backend of ``ospfn.ops.fourier_high_freq`` / ``fourier_cutoff``.  The FFTs stay in ``torch.fft``
(cuFFT on a GPU); everything between and after them is four small kernels:

1. ``_mag_mean_kernel`` -- reads the half spectrum once, coalesced, all channels of a tile in flight: the
   channel-mean magnitude ``A`` of each bin, scattered (from a cached rank table) into ascending-radius order,
   for the bin and its mirror; plus one partial sum of ``A`` per program (the per-sample total);
2. ``_cutoff_kernel`` -- one program per sample walks ``A`` in radius order (contiguous loads), keeps a running
   cumulative sum, and stops at the block where it reaches ``ratio * total``: for the inference ratio 0.1 that
   is the first block.  Writes the cutoff (squared integer radius and float radius);
3. ``_zero_low_kernel`` -- zeroes the bins with radius < cutoff in place (stores only, no loads);
4. ``_modulus_kernel`` -- ``sqrt(h**2 + 1e-12)`` of the inverse transform, cast to the output dtype.

Two equivalences make it cheaper than the literal spec (the ``ref`` backend), with the same result:

* No fftshift / ifftshift: the radius of unshifted bin (u, v) is that of shifted bin
  ((u + H//2) % H, (v + W//2) % W), i.e. ``dy = (u + H//2) % H - H//2`` (same for x), so the radius map, the sort
  order and the mask are built directly in unshifted index space.
* Real transforms: ``s`` is real, so its spectrum is Hermitian, and the mask depends on ``dy**2 + dx**2`` only,
  which is the same for a bin and its negative (the Nyquist row/column maps to itself).  The masked spectrum is
  therefore Hermitian and ``ifft2`` of it is real: ``rfft2`` / ``irfft2`` give it with half the FFT work and half
  the spectrum memory.  The magnitude of a full-grid bin (u, v) with v > W//2 is that of its mirror
  ((H - u) % H, W - v) in the half spectrum, and the total counts each mirrored column twice.

The imaginary part of ``h`` is zero up to rounding, so the modulus ``sqrt(re**2 + im**2 + 1e-12)`` becomes
``sqrt(re**2 + 1e-12)`` (an absolute difference below ~1e-8 for unit-scale latents).  Within a group of bins of
equal radius the cutoff does not depend on their order, so the fast path may sort bins differently from the ref.
Radii are compared as exact integers ``dy**2 + dx**2``.

Both entry points are ``torch.library`` custom ops (``torch.ops.ospfn_triton.fourier_high_freq`` /
``fourier_cutoff``) with fake implementations, so ``torch.compile`` traces each as one opaque node (FFTs
included).  Not differentiable, like the op.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ospfn.kernels.common import block_size, interpreting, to_out_dtype

MAG_EPS = 1e-12  # added under the square root of every magnitude (spectrum and output); the spec's epsilon

# ----------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _sqrt(x):
    """Correctly rounded square root in fp32 (``tl.sqrt`` may be approximate there) and fp64."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(x, y):
    """Correctly rounded division in fp32 and fp64."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.math.div_rn(x, y)


@triton.jit
def _mag_mean_kernel(
    spec_ptr, rank_ptr, mirror_ptr, a_ptr, part_ptr,
    C, n_half, n_full, n_blocks,
    EPS: tl.constexpr, BLOCK: tl.constexpr, CBLOCK: tl.constexpr,
):  # fmt: skip
    """Program (b, j), for the half-spectrum bins of block j: A = mean_c sqrt(re^2 + im^2 + eps), written to
    a_sorted[b] at the ascending-radius position of the bin and of its mirror (if the mirror is not itself in
    the half spectrum); part[b, j] = the sum of A over the full-grid bins this block stands for."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_half
    cs = tl.arange(0, CBLOCK)
    ri = tl.arange(0, 2)  # (re, im) interleaved, as torch.view_as_real lays out a complex tensor
    acc = tl.zeros([BLOCK], dtype=a_ptr.dtype.element_ty)
    for c0 in range(0, C, CBLOCK):  # a [CBLOCK, BLOCK, 2] tile per step: all channels' loads in flight at once
        ch = c0 + cs
        ptrs = spec_ptr + ((b * C + ch[:, None, None]) * n_half + offs[None, :, None]) * 2 + ri[None, None, :]
        z = tl.load(ptrs, mask=(ch[:, None, None] < C) & mask[None, :, None], other=0.0)
        mag = _sqrt(tl.sum(z * z, axis=2) + EPS)
        acc += tl.sum(tl.where(ch[:, None] < C, mag, 0.0), axis=0)
    a = _div(acc, tl.zeros_like(acc) + C)  # correctly rounded, like torch's mean (C may be a constexpr 1)
    rank = tl.load(rank_ptr + offs, mask=mask, other=0)
    mirror = tl.load(mirror_ptr + offs, mask=mask, other=-1)
    tl.store(a_ptr + b * n_full + rank, a, mask=mask)
    tl.store(a_ptr + b * n_full + mirror, a, mask=mask & (mirror >= 0))
    weight = tl.where(mirror >= 0, 2.0, 1.0)
    tl.store(part_ptr + b * n_blocks + blk, tl.sum(tl.where(mask, a * weight, 0.0), axis=0))


@triton.jit
def _cutoff_kernel(
    a_ptr, part_ptr, rho_ptr, d2s_ptr, rs_ptr, d2cut_ptr, cut_ptr,
    n_full, n_blocks,
    BLOCK: tl.constexpr, PBLOCK: tl.constexpr,
):  # fmt: skip
    """Program b: k = #{sorted bins whose cumulative A < ratio[b] * total}, clamped to n_full - 1;
    d2cut[b] = squared radius and cut[b] = radius of the k-th bin in ascending-radius order."""
    b = tl.program_id(0).to(tl.int64)
    tot = tl.zeros([PBLOCK], dtype=part_ptr.dtype.element_ty)
    for start in range(0, n_blocks, PBLOCK):
        o = start + tl.arange(0, PBLOCK)
        tot += tl.load(part_ptr + b * n_blocks + o, mask=o < n_blocks, other=0.0)
    target = tl.load(rho_ptr + b) * tl.sum(tot, axis=0)
    carry = tl.sum(tl.zeros([BLOCK], dtype=a_ptr.dtype.element_ty), axis=0)
    count = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    p = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    # Blocks after the one where the running sum reaches the target cannot add to the count: stop there.
    # (A NaN or non-positive target never enters the loop: k = 0, nothing removed.)
    while (p < n_full) & (carry < target):
        offs = p + tl.arange(0, BLOCK)
        mask = offs < n_full
        a = tl.load(a_ptr + b * n_full + offs, mask=mask, other=0.0)
        cum = tl.cumsum(a, axis=0) + carry
        count += tl.sum((mask & (cum < target)).to(tl.int32), axis=0)
        carry = tl.max(tl.where(mask, cum, carry), axis=0)  # cum is non-decreasing: its last valid value
        p += BLOCK
    k = tl.minimum(count, n_full - 1)
    tl.store(d2cut_ptr + b, tl.load(d2s_ptr + k))
    tl.store(cut_ptr + b, tl.load(rs_ptr + k))


@triton.jit
def _zero_low_kernel(spec_ptr, d2cut_ptr, C, H, W, Wr, n_half, BLOCK: tl.constexpr, CBLOCK: tl.constexpr):
    """Program (b, j): spectrum[b, :, bin] = 0 for the bins of block j whose squared radius < d2cut[b]."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    u = offs // Wr
    v = offs % Wr
    dy = (u + H // 2) % H - H // 2
    dx = (v + W // 2) % W - W // 2
    low = (offs < n_half) & (dy * dy + dx * dx < tl.load(d2cut_ptr + b))
    if tl.max(low.to(tl.int32), axis=0) > 0:  # most blocks hold no low bin: skip their stores
        cs = tl.arange(0, CBLOCK)
        ri = tl.arange(0, 2)
        zero = tl.zeros([CBLOCK, BLOCK, 2], dtype=spec_ptr.dtype.element_ty)
        for c0 in range(0, C, CBLOCK):
            ch = c0 + cs
            ptrs = spec_ptr + ((b * C + ch[:, None, None]) * n_half + offs[None, :, None]) * 2 + ri[None, None, :]
            tl.store(ptrs, zero, mask=(ch[:, None, None] < C) & low[None, :, None])


@triton.jit
def _modulus_kernel(h_ptr, out_ptr, n, EPS: tl.constexpr, BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    y = _sqrt(h * h + EPS)
    tl.store(out_ptr + offs, to_out_dtype(y, out_ptr, EXACT_BF16), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# host side


@functools.lru_cache(maxsize=64)
def _tables(H: int, W: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Index tables for an (H, W) grid, in unshifted index space.

    Bins of the full grid sorted by squared radius ``d2 = dy**2 + dx**2`` (stable; ties in any order give the
    same cutoff).  For the half spectrum [H, W//2 + 1] of ``rfft2``: ``rank`` [n_half] int32, the sorted
    position of each half bin; ``mirror`` [n_half] int32, the sorted position of its negative
    ((H - u) % H, W - v) when that lies outside the half spectrum, else -1.  For the sorted full grid: ``d2s``
    [H*W] int32 squared radii and ``rs`` [H*W] float32 radii (the ref backend's float32 radius values).
    """
    u = torch.arange(H, dtype=torch.int64)
    v = torch.arange(W, dtype=torch.int64)
    dy = (u + H // 2) % H - H // 2
    dx = (v + W // 2) % W - W // 2
    d2 = (dy[:, None] ** 2 + dx[None, :] ** 2).flatten()
    order = torch.argsort(d2, stable=True)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(H * W)
    Wr = W // 2 + 1
    hu = u[:, None].expand(H, Wr)
    hv = torch.arange(Wr, dtype=torch.int64)[None, :].expand(H, Wr)
    rank = pos.view(H, W)[:, :Wr]
    mu, mv = (H - hu) % H, (W - hv) % W
    mirror = torch.where(mv >= Wr, pos[(mu * W + mv).flatten()].view(H, Wr), -1)
    d2s = d2[order]
    return tuple(
        x.contiguous().to(device)
        for x in (rank.to(torch.int32), mirror.to(torch.int32), d2s.to(torch.int32), torch.sqrt(d2s.to(torch.float32)))
    )


def _config(n: int, cuda_block: int) -> int:
    """BLOCK for a loop or grid over ``n`` items (see :func:`ospfn.kernels.common.block_size`)."""
    return block_size(n, cuda_block)


def _cblock(C: int) -> int:
    return triton.next_power_of_2(C) if interpreting() else min(16, triton.next_power_of_2(C))


def _cutoff_from_spectrum(spec: torch.Tensor, rho: torch.Tensor, H: int, W: int):
    """Kernels 1-2 on the half spectrum ``spec`` [B, C, H, Wr] (complex, contiguous): (d2cut int32 [B], cut [B])."""
    B, C = spec.shape[:2]
    Wr = W // 2 + 1
    n_half, n_full = H * Wr, H * W
    dev = spec.device
    real = torch.view_as_real(spec)
    rank, mirror, d2s, rs = _tables(H, W, dev)

    BLOCK1 = _config(n_half, 64)
    n_blocks = triton.cdiv(n_half, BLOCK1)
    a_sorted = torch.empty((B, n_full), dtype=real.dtype, device=dev)
    part = torch.empty((B, n_blocks), dtype=real.dtype, device=dev)
    _mag_mean_kernel[(B, n_blocks)](
        real, rank, mirror, a_sorted, part, C, n_half, n_full, n_blocks,
        EPS=MAG_EPS, BLOCK=BLOCK1, CBLOCK=_cblock(C), num_warps=4,
    )  # fmt: skip

    d2cut = torch.empty(B, dtype=torch.int32, device=dev)
    cut = torch.empty(B, dtype=torch.float32, device=dev)
    _cutoff_kernel[(B,)](
        a_sorted, part, rho, d2s, rs, d2cut, cut, n_full, n_blocks,
        BLOCK=_config(n_full, 2048), PBLOCK=_config(n_blocks, 256), num_warps=8,
    )  # fmt: skip
    return d2cut, cut


def _half_spectrum(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.fft.rfft2(s.to(dtype), dim=(-2, -1), norm="backward").contiguous()


# The compute dtype (float64 for float64 inputs, else float32) is the dtype of ``rho``: ospfn.ops passes the
# ratios in it.


@torch.library.custom_op("ospfn_triton::fourier_cutoff", mutates_args=())
def fourier_cutoff_op(s: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """``torch.ops.ospfn_triton.fourier_cutoff``: s [B, C, H, W], rho [B] in the compute dtype -> float32 [B]."""
    H, W = s.shape[-2:]
    return _cutoff_from_spectrum(_half_spectrum(s, rho.dtype), rho.contiguous(), H, W)[1]


@fourier_cutoff_op.register_fake
def _(s, rho):
    return torch.empty((s.shape[0],), dtype=torch.float32, device=s.device)


@torch.library.custom_op("ospfn_triton::fourier_high_freq", mutates_args=())
def fourier_high_freq_op(s: torch.Tensor, rho: torch.Tensor, return_abs: bool) -> torch.Tensor:
    """``torch.ops.ospfn_triton.fourier_high_freq``: s [B, C, H, W], rho [B] in the compute dtype -> s's shape
    and dtype."""
    B, C, H, W = s.shape
    Wr = W // 2 + 1
    n_half = H * Wr
    spec = _half_spectrum(s, rho.dtype)
    d2cut, _ = _cutoff_from_spectrum(spec, rho.contiguous(), H, W)

    BLOCK3 = _config(n_half, 64)
    _zero_low_kernel[(B, triton.cdiv(n_half, BLOCK3))](
        torch.view_as_real(spec), d2cut, C, H, W, Wr, n_half, BLOCK=BLOCK3, CBLOCK=_cblock(C), num_warps=4
    )

    h = torch.fft.irfft2(spec, s=(H, W), dim=(-2, -1), norm="backward")
    if not return_abs:
        return h.to(s.dtype)
    h = h.contiguous()
    out = h if s.dtype == h.dtype else torch.empty(h.shape, dtype=s.dtype, device=h.device)
    n = h.numel()
    BLOCK4 = min(1 << 16, _config(n, 1024))
    _modulus_kernel[(triton.cdiv(n, BLOCK4),)](h, out, n, EPS=MAG_EPS, BLOCK=BLOCK4, EXACT_BF16=interpreting())
    return out


@fourier_high_freq_op.register_fake
def _(s, rho, return_abs):
    return torch.empty(s.shape, dtype=s.dtype, device=s.device)


# ----------------------------------------------------------------------------------------------------------
# the triton backend of ospfn.ops.fourier_* (arguments validated there; ``rho`` [B] in the compute dtype)


def fourier_cutoff(s: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """Triton backend of ``ospfn.ops.fourier_cutoff``."""
    return fourier_cutoff_op(s, rho)


def fourier_high_freq(s: torch.Tensor, rho: torch.Tensor, return_abs: bool) -> torch.Tensor:
    """Triton backend of ``ospfn.ops.fourier_high_freq``."""
    return fourier_high_freq_op(s, rho, bool(return_abs))
