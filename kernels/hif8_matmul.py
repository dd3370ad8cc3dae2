"""W8A16 matmul with HiF8 weights (installed as ``ospfn.kernels.hif8_matmul``; docs/hif8.md).

``y = x @ (decode(codes) / s)^T + b`` for activations ``x`` [M, K] in fp16 / bf16 / fp32 and packed HiF8 weight
codes [N, K] (uint8) with an fp32 scale ``s`` per tensor or per output channel.  Each program computes one
[BLOCK_M, BLOCK_N] output tile:

* K loop: load an x tile and a uint8 code tile, decode the codes in registers to the activation dtype (exact:
  every HiF8 value is representable in fp16, bf16 and fp32), ``tl.dot`` with fp32 accumulation (bf16 / fp16
  tensor cores on a GPU; fp32 inputs use ``input_precision="ieee"`` so nothing is rounded to tf32);
* epilogue: divide by the scale (correctly rounded, per tensor or per column), add the bias, cast once to
  the output dtype.

Two decoders, both exact for all 256 codes, chosen per config (``LUT``): a gather from a 256-entry table in the
activation dtype (512 bytes, stays in L1; ~3 instructions per element), or the table-free integer decode
:func:`ospfn.kernels.common.decode_f32` (~30 integer instructions per element, no memory traffic).  Which one wins
depends on the GPU (integer throughput vs L1 gather rate) and on M: the autotuner measures both.

``BLOCK_M == 1`` selects a GEMV path without ``tl.dot`` (one activation row per program, products summed in
fp32 registers): decode / inference with M = 1 is purely memory-bound (1 byte per weight instead of 2 for
bf16), and a dot with M padded to 16 wastes tensor-core issue slots and shared-memory round trips.

Under the Triton interpreter a bf16 ``tl.dot`` returns garbage, so there (only) bf16 tiles are widened to fp32
before the dot (exact) -- the index and tiling logic is then tested in every dtype on CPU.

On CUDA the configs are autotuned, keyed on a bucket of M (1, 2-16, 17-64, 65-256, >256), N, K and the dtypes;
under the Triton interpreter (CPU tests) one fixed config is used, or the one the caller passes.

The launch is the custom op ``torch.ops.ospfn_triton.hif8_matmul`` (with a fake implementation), so
``torch.compile`` traces it as one opaque node; its gradient with respect to x is formed by ``ospfn.ops``
(``dx = g @ W_q``, the same for every backend), so the op itself has no autograd formula.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ospfn.kernels.common import decode_f32, interpreting, to_out_dtype


@triton.jit
def _w8a16_kernel(
    x_ptr,
    c_ptr,
    lut_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_cn,
    stride_ck,
    stride_om,
    stride_on,
    M_BUCKET,  # autotune key only
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    EXACT_BF16: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LUT: tl.constexpr,
):
    # grouped program order: GROUP_M row tiles share each column tile while it is hot in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    if BLOCK_M == 1:
        # GEMV: one x row, a [BLOCK_N, BLOCK_K] code tile (contiguous along K), fp32 products reduced at the end
        x_ptrs = x_ptr + offs_m * stride_xm + offs_k * stride_xk  # [BLOCK_K]
        c_ptrs = c_ptr + offs_n[:, None] * stride_cn + offs_k[None, :] * stride_ck  # [BLOCK_N, BLOCK_K]
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = offs_k < K - k0
            xv = tl.load(x_ptrs, mask=mask_k & (offs_m < M), other=0.0).to(tl.float32)
            c = tl.load(c_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0).to(tl.int32)
            if LUT:
                w = tl.load(lut_ptr + c).to(tl.float32)
            else:
                w = decode_f32(c)
            acc2 += w * xv[None, :]
            x_ptrs += BLOCK_K * stride_xk
            c_ptrs += BLOCK_K * stride_ck
        acc = tl.sum(acc2, axis=1)[None, :]  # [1, BLOCK_N]
    else:
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
        c_ptrs = c_ptr + offs_k[:, None] * stride_ck + offs_n[None, :] * stride_cn  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = offs_k < K - k0
            xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            c = tl.load(c_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0).to(tl.int32)  # code 0 = +0.0
            if LUT:
                w = tl.load(lut_ptr + c)  # the table is in x's dtype
            else:
                w = decode_f32(c).to(xt.dtype)  # exact: HiF8 values fit fp16 / bf16
            if DOT_IN_FP32:  # interpreter only: its bf16 dot is wrong; the fp32 widening is exact
                acc = tl.dot(xt.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            elif FP32_IEEE:
                acc = tl.dot(xt, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, w, acc)
            x_ptrs += BLOCK_K * stride_xk
            c_ptrs += BLOCK_K * stride_ck

    # epilogue: scale, bias, one rounding to the output dtype
    if PER_CHANNEL:
        s = tl.load(scale_ptr + offs_n, mask=mask_n, other=1.0)
        acc = tl.math.div_rn(acc, s[None, :])
    else:
        acc = tl.math.div_rn(acc, tl.load(scale_ptr))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, to_out_dtype(acc, out_ptr, EXACT_BF16), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------------------------
# configs (CUDA)


def _m_bucket(M: int) -> int:
    return 1 if M <= 1 else 16 if M <= 16 else 64 if M <= 64 else 256 if M <= 256 else 4096


def _cfg(bm, bn, bk, warps, stages, lut, group=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "LUT": lut}, num_warps=warps, num_stages=stages
    )


# M bucket -> candidate tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).  Small M is memory-bound: many
# narrow column tiles so that every SM streams codes; large M is compute-bound: the usual 128x128/128x256 tiles.
_TILES = {
    1: [(1, 16, 512, 4, 3), (1, 32, 256, 4, 3), (1, 16, 1024, 8, 3), (1, 64, 128, 4, 3), (16, 32, 256, 4, 4)],
    16: [(16, 32, 256, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 3)],
    64: [(32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (32, 128, 128, 4, 3)],
    256: [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 256, 64, 8, 3)],
    4096: [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4)],
}
# GEMV tiles use the table decoder only: compiled for sm_90, the integer decoder costs ~4x the instructions per
# element there and spills registers.  Dot tiles amortise the decode over BLOCK_M rows: both are tried.
_CONFIGS = [
    _cfg(*t, lut=lut) for tiles in _TILES.values() for t in tiles for lut in ((True,) if t[0] == 1 else (True, False))
]


def _prune(configs, named_args, **kwargs):
    bucket = named_args["M_BUCKET"]
    want = {(bm, bn, bk, w, st) for bm, bn, bk, w, st in _TILES[bucket]}
    out = []
    for c in configs:
        kw = c.kwargs
        if (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_warps, c.num_stages) in want and c not in out:
            out.append(c)
    return out


_w8a16_tuned = triton.autotune(
    configs=_CONFIGS,
    key=["M_BUCKET", "N", "K", "PER_CHANNEL", "HAS_BIAS"],
    prune_configs_by={"early_config_prune": _prune},
)(_w8a16_kernel)


@triton.jit
def _lut_kernel(out_ptr, EXACT_BF16: tl.constexpr):
    c = tl.arange(0, 256)
    tl.store(out_ptr + c, to_out_dtype(decode_f32(c), out_ptr, EXACT_BF16))


@functools.lru_cache(maxsize=None)
def _lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 256 decoded HiF8 values in ``dtype`` (exact: every HiF8 value is an fp16 / bf16 / fp32 number), on
    ``device``, made by the same in-register decoder as the table-free path."""
    out = torch.empty(256, dtype=dtype, device=device)
    _lut_kernel[(1,)](out, EXACT_BF16=interpreting())
    return out


def _interpreter_config(M: int, N: int, K: int) -> dict:
    # the interpreter pays per program and per op, not per element: few, large tiles
    bm = 1 if M == 1 else 16 if M <= 16 else 32
    return dict(
        BLOCK_M=bm,
        BLOCK_N=max(16, min(64, triton.next_power_of_2(N))),
        BLOCK_K=max(16, min(128, triton.next_power_of_2(K))),
        GROUP_M=4,
        LUT=True,
    )


# ----------------------------------------------------------------------------------------------------------
# host side (arguments validated by ospfn.ops.hif8_matmul.hif8_matmul)


def _launch(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
            config: Optional[dict]) -> torch.Tensor:  # fmt: skip
    M, K = x.shape
    N = codes.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    per_channel = scale.dim() == 1
    scale = scale.contiguous()
    bias_arg = bias.contiguous() if bias is not None else scale  # placeholder pointer, never read
    args = (
        x,
        codes,
        _lut(x.device, x.dtype),
        scale,
        bias_arg,
        out,
        M,
        N,
        K,
        x.stride(0),
        x.stride(1),
        codes.stride(0),
        codes.stride(1),
        out.stride(0),
        out.stride(1),
        _m_bucket(M),
    )
    flags = dict(
        PER_CHANNEL=per_channel,
        HAS_BIAS=bias is not None,
        FP32_IEEE=x.dtype == torch.float32,
        EXACT_BF16=interpreting(),
        DOT_IN_FP32=interpreting() and x.dtype == torch.bfloat16,
    )
    if config is None and not interpreting():

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _w8a16_tuned[grid](*args, **flags)
        return out
    cfg = dict(config) if config is not None else _interpreter_config(M, N, K)
    launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _w8a16_kernel[grid](*args, **flags, **cfg, **launch)
    return out


@torch.library.custom_op("ospfn_triton::hif8_matmul", mutates_args=())
def matmul_op(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``torch.ops.ospfn_triton.hif8_matmul``: the autotuned (CUDA) or default (interpreter) launch."""
    return _launch(x, codes, scale, bias, None)


@matmul_op.register_fake
def _(x, codes, scale, bias):
    return torch.empty((x.shape[0], codes.shape[0]), dtype=x.dtype, device=x.device)


def matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """``x`` [M, K] (fp16/bf16/fp32, any strides), ``codes`` [N, K] uint8, ``scale`` fp32 () or [N], ``bias`` [N]
    or None -> [M, N] in x's dtype.  Arguments are validated by :func:`ospfn.ops.hif8_matmul.hif8_matmul`.

    ``config`` (tests, tuning experiments): a fixed ``dict(BLOCK_M=, BLOCK_N=, BLOCK_K=, GROUP_M=, LUT=)`` instead
    of the autotuner (CUDA) or the interpreter default.  It is a direct launch, not the custom op (a dict is no
    op argument), so only ``config=None`` is traceable by ``torch.compile``.
    """
    if config is not None:
        return _launch(x, codes, scale, bias, config)
    return matmul_op(x, codes, scale, bias)


def best_config(M: int, N: int, K: int) -> dict | None:
    """The config the autotuner picked for this shape bucket (after a call), for benchmark reports."""
    for key, cfg in _w8a16_tuned.cache.items():
        if key[:3] == (_m_bucket(M), N, K):
            return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return None
