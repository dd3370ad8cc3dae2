"""FlashI2V Fourier guidance: the high-frequency magnitude filter f_high(s) (docs/flashi2v.md#fourier-guidance).

Public ops (each takes ``backend=None|"ref"|"triton"``, see :mod:`ospfn.backends`):

* :func:`fourier_high_freq` -- ``f_high(s)``: remove the low-frequency disc that holds the fraction ``ratio`` of
  the (channel-mean) spectral magnitude, return the modulus (or real part) of the high-passed spatial signal
* :func:`fourier_cutoff` -- the per-sample cutoff radius that :func:`fourier_high_freq` uses

Semantics (docs/flashi2v.md#fourier-guidance, steps 1-6), per sample b of ``s`` [B, C, H, W]:

1. ``F = fftshift(fft2(s, norm="backward"))`` over (H, W);
2. radius map ``r[y, x] = sqrt((y - H//2)**2 + (x - W//2)**2)`` in bin-index units;
3. ``A = mean_c sqrt(re**2 + im**2 + 1e-12)``; all H*W bins sorted by radius (one stable order);
   ``cum = cumsum(A)`` in that order; ``target = ratio[b] * cum[-1]`` (the total);
   ``k = min(#{cum < target}, H*W - 1)``; ``cutoff[b] = radius of the k-th bin``;
4. ``M = [r >= cutoff[b]]`` shared by all channels;
5. ``h = ifft2(ifftshift(F * M))``; output ``sqrt(re(h)**2 + im(h)**2 + 1e-12)`` (``return_abs=True``) or ``re(h)``;
6. cast to ``s``'s dtype.

Step 7 of docs/flashi2v.md#fourier-guidance (repeating the [B, C, h, w] feature over the latent frames) is the caller's job.

Decisions:

* Compute dtype: float64 inputs are computed in float64 (a higher-precision reference for tests); every other
  float dtype (fp32, bf16, fp16, fp8) is computed in float32, as the spec says.  The output has ``s``'s dtype.
* ``ratio`` is a Python number or a float tensor of shape [B] (a 0-d tensor is broadcast to every sample).  A
  number, and a CPU tensor, must lie in [0, 1] (``ValueError`` otherwise).  The values of a tensor on another
  device (CUDA) are not checked, since that would synchronise with the host, nor those of any tensor inside a
  ``torch.compile``-d function (a value-dependent check would break the graph); there a value below 0 (or NaN)
  behaves like 0 (nothing removed) and a value above 1 like 1, which is what the cutoff rule gives them.
* No autograd: the input is detached and the result has no autograd history (FlashI2V computes the feature
  under ``no_grad``).
* Radius tables are cached per (H, W, device).  Distinct radii stay distinct in float32 for H, W <= 2048.

The ``triton`` backend (CUDA; CPU under ``TRITON_INTERPRET=1``) keeps the FFTs in ``torch.fft`` (cuFFT) but uses
the real-input transforms ``rfft2`` / ``irfft2`` and never shifts: the mask is symmetric under frequency negation,
so the masked spectrum stays Hermitian and ``ifft2`` of it is real, and the radius map is built directly in
unshifted index space.  See ``kernels/fourier.py``.

Example::

    >>> import torch
    >>> from ospfn.ops.fourier import fourier_cutoff, fourier_high_freq
    >>> s = torch.zeros(1, 2, 8, 8)
    >>> s[:, :, 0, 0] = 1.0  # a delta: every bin has magnitude 1
    >>> fourier_cutoff(s, 0.0).tolist()  # ratio 0 removes nothing
    [0.0]
    >>> torch.allclose(fourier_high_freq(s, 0.0), s.abs(), atol=1e-5)
    True
    >>> fourier_cutoff(s, 0.2).tolist()  # the bin where the running sum reaches 20 % lies at radius 2
    [2.0]
    >>> y = fourier_high_freq(s, torch.tensor([0.2]))
    >>> y.shape, y.dtype, y.requires_grad
    (torch.Size([1, 2, 8, 8]), torch.float32, False)
"""

from __future__ import annotations

import functools
import numbers

import torch

from ospfn.backends import register, select

__all__ = ["fourier_high_freq", "fourier_cutoff", "MAG_EPS"]

MAG_EPS = 1e-12  # added under the square root of every magnitude (spectrum and output)


# ----------------------------------------------------------------------------------------------------------
# argument checks shared by every backend


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the filter is computed in for an input of ``dtype``: float64 stays float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_s(s: object, op: str) -> torch.Tensor:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{op}: s must be a torch.Tensor of shape [B, C, H, W], got {type(s).__name__}")
    if not s.dtype.is_floating_point:
        raise TypeError(
            f"{op}: s must be a real floating-point tensor (float32, bfloat16, float16, float64), got {s.dtype}"
        )
    if s.dim() != 4:
        raise ValueError(f"{op}: s must have shape [B, C, H, W] (4 dims), got shape {tuple(s.shape)}")
    return s.detach()


def _check_ratio(ratio: object, s: torch.Tensor, op: str) -> torch.Tensor:
    """``ratio`` as a [B] tensor on ``s``'s device in the compute dtype."""
    B = s.shape[0]
    dtype = compute_dtype(s.dtype)
    if isinstance(ratio, bool) or not isinstance(ratio, (numbers.Real, torch.Tensor)):
        raise TypeError(
            f"{op}: ratio must be a float in [0, 1] or a float tensor of shape [B] = [{B}], got {type(ratio).__name__}"
        )
    if not isinstance(ratio, torch.Tensor):
        v = float(ratio)
        if not 0.0 <= v <= 1.0:  # also rejects NaN
            raise ValueError(f"{op}: ratio must be in [0, 1], got {ratio!r}")
        return torch.full((B,), v, dtype=dtype, device=s.device)
    if not ratio.dtype.is_floating_point:
        raise TypeError(
            f"{op}: ratio must be a float in [0, 1] or a float tensor of shape [B], got dtype {ratio.dtype}"
        )
    if ratio.dim() > 1 or (ratio.dim() == 1 and ratio.shape[0] != B):
        raise ValueError(f"{op}: ratio tensor must have shape [B] = [{B}] (or be 0-d), got shape {tuple(ratio.shape)}")
    r = ratio.detach()
    # CPU values are looked at without a host synchronisation; not while torch.compile traces, where a
    # value-dependent branch would break the graph (out-of-range values then act as on CUDA, see above)
    if r.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = ~((r >= 0) & (r <= 1))
        if bool(bad.any()):
            where = bad.nonzero().view(-1)[:4].tolist()
            raise ValueError(f"{op}: ratio values must be in [0, 1], got {r[bad][:4].tolist()} (at {where})")
    return r.to(device=s.device, dtype=dtype).expand(B).contiguous()


def _check_return_abs(return_abs: object, op: str) -> bool:
    if not isinstance(return_abs, bool):
        raise TypeError(f"{op}: return_abs must be a bool, got {return_abs!r}")
    return return_abs


# ----------------------------------------------------------------------------------------------------------
# public API


def fourier_high_freq(
    s: torch.Tensor,
    ratio: float | torch.Tensor,
    *,
    return_abs: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """FlashI2V's high-frequency feature ``f_high(s)``: [B, C, H, W] -> [B, C, H, W] in ``s``'s dtype.

    ``ratio`` (rho, a float or a [B] tensor in [0, 1]) is the fraction of the channel-mean spectral magnitude,
    counted from the centre outwards, whose disc of frequencies is removed: 0 removes nothing (the result is
    ``|s|`` up to the 1e-12 epsilon), larger values remove more.  Each sample uses its own cutoff radius
    (:func:`fourier_cutoff`), shared by its channels.  ``return_abs=True`` (every released config) returns the
    modulus of the high-passed spatial signal, ``False`` its real part.  Not differentiable.  See the module
    docstring for the exact steps.

    >>> s = torch.randn(2, 4, 6, 10)
    >>> y = fourier_high_freq(s, torch.tensor([0.1, 0.9]))
    >>> y.shape == s.shape and bool((y >= 0).all())
    True
    >>> bool(torch.allclose(fourier_high_freq(s, 0.0, return_abs=False), s, atol=1e-5))
    True
    """
    op = "fourier_high_freq"
    x = _check_s(s, op)
    rho = _check_ratio(ratio, x, op)
    ra = _check_return_abs(return_abs, op)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return select(op, backend, x.device)(x, rho, ra)


def fourier_cutoff(s: torch.Tensor, ratio: float | torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The per-sample cutoff radius (frequency-bin index units, float32 [B]) of :func:`fourier_high_freq`.

    Bins with radius ``>= cutoff[b]`` are kept; 0 means nothing is removed.  Non-decreasing in ``ratio``.

    >>> s = torch.zeros(1, 1, 4, 4)
    >>> s[0, 0, 0, 0] = 1.0
    >>> fourier_cutoff(s, torch.tensor([1.0])).tolist()  # ratio 1 keeps only the outermost bin
    [2.8284270763397217]
    """
    op = "fourier_cutoff"
    x = _check_s(s, op)
    rho = _check_ratio(ratio, x, op)
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        raise ValueError(f"fourier_cutoff: s must have C, H, W >= 1 to define a spectrum, got shape {tuple(x.shape)}")
    return select(op, backend, x.device)(x, rho)


# ----------------------------------------------------------------------------------------------------------
# ref backend: the spec's steps, literally, in PyTorch (vectorised over the batch)


@functools.lru_cache(maxsize=64)
def radius_map(H: int, W: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(r, order, r_sorted)`` for the fftshift-ed (H, W) grid: ``r`` [H, W] float32 radius in bin units around
    (H//2, W//2), ``order`` [H*W] the stable ascending-radius order of the flattened bins, ``r_sorted = r[order]``."""
    y = torch.arange(H, dtype=torch.int64) - H // 2
    x = torch.arange(W, dtype=torch.int64) - W // 2
    r = torch.sqrt((y[:, None] ** 2 + x[None, :] ** 2).to(torch.float32))
    order = torch.argsort(r.flatten(), stable=True)
    return r.to(device), order.to(device), r.flatten()[order].to(device)


def _ref_spectrum_cutoff(s: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-3: (shifted spectrum F [B, C, H, W], radius map r [H, W], cutoff [B] float32)."""
    B, C, H, W = s.shape
    # contiguous: pocketfft rounds differently on strided input, and a view must give what its copy gives
    F = torch.fft.fftshift(torch.fft.fft2(s.to(compute_dtype(s.dtype)).contiguous(), dim=(-2, -1), norm="backward"), dim=(-2, -1))
    r, order, r_sorted = radius_map(H, W, s.device)
    mag = torch.sqrt(F.real * F.real + F.imag * F.imag + MAG_EPS)
    A = mag.mean(dim=1).reshape(B, H * W)
    cum = torch.cumsum(A[:, order], dim=1)
    target = rho * cum[:, -1]
    k = (cum < target[:, None]).sum(dim=1).clamp(max=H * W - 1)
    return F, r, r_sorted[k]


def _ref_cutoff(s: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    return _ref_spectrum_cutoff(s, rho)[2]


def _ref_high_freq(s: torch.Tensor, rho: torch.Tensor, return_abs: bool) -> torch.Tensor:
    F, r, cutoff = _ref_spectrum_cutoff(s, rho)
    mask = r[None, None] >= cutoff[:, None, None, None]  # [B, 1, H, W]
    h = torch.fft.ifft2(torch.fft.ifftshift(F * mask, dim=(-2, -1)), dim=(-2, -1), norm="backward")
    out = torch.sqrt(h.real * h.real + h.imag * h.imag + MAG_EPS) if return_abs else h.real
    return out.to(s.dtype)


register("fourier_high_freq", "ref", _ref_high_freq)
register("fourier_cutoff", "ref", _ref_cutoff)

# triton backend: kernels/fourier.py, imported on first use
register("fourier_high_freq", "triton", "ospfn.kernels.fourier:fourier_high_freq")
register("fourier_cutoff", "triton", "ospfn.kernels.fourier:fourier_cutoff")
