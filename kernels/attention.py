"""Flash attention in Triton, forward and backward, with a key-padding mask (``ospfn.kernels.attention``).

The ``triton`` backend of ``ospfn.ops.attention``.  Layout (B, S, H, D) like FlashAttention: ``q`` is
[B, Sq, H, D], ``k`` and ``v`` are [B, Sk, H, D] (Sq may differ from Sk), any strides as long as the head dim
is unit-stride (otherwise that tensor is copied once).  D is at most 128; it is padded to the next power of two
>= 16 inside the kernels with load/store masks.

Numerics
    * scores, online softmax, the log-sum-exp and all accumulators are fp32; the two matmuls of each step take
      their operands in the input dtype (P and dS are cast to it, as FlashAttention does) and accumulate in fp32.
    * fp32 inputs use ``input_precision="ieee"`` so results match an fp32 reference closely; on fp16 / bf16
      inputs the precision flag has no effect (tensor cores take them natively).
    * softmax runs in base 2: ``scores * scale * log2(e)`` and ``exp2``; the saved LSE is in the same units.

Key mask
    ``key_mask`` [B, Sk] bool, True = real key.  Masked keys get score -inf: they never receive attention
    weight, their dK and dV are exactly zero, and their K/V values do not influence anything -- masked K and V
    rows are replaced by zeros as they are loaded (one ``tl.where`` per tile), so NaN or Inf there cannot leak
    through ``0 * NaN`` into the output or the gradients.  A batch entry with no real key at all gives an
    all-zero output and zero gradients, never NaN: the running max is taken as 0 while it is still -inf, an
    empty row stores LSE = +inf, so the backward recomputes P = 0 there.

Backward (FlashAttention-2 style, deterministic, no atomics)
    1. ``delta = rowsum(dO * O)`` in fp32;
    2. one program per key block: loops over all query blocks, accumulates dK and dV in registers
       (key blocks that are entirely masked skip the loop and write zeros);
    3. one program per query block: loops over all key blocks, accumulates dQ in registers.

torch.compile
    Forward and backward are the custom ops ``torch.ops.ospfn_triton.attention_fwd`` (returns ``out`` and the
    LSE) and ``attention_bwd``, with fake implementations; the forward op's autograd formula calls the backward
    op, so dynamo / AOTAutograd trace training steps through the kernels without a graph break.

Arguments are validated by ``ospfn.ops.attention`` and the backend registry (dtype, ``D <= MAX_HEAD_DIM``,
device), not here.

Example (CPU under ``TRITON_INTERPRET=1``, or CUDA tensors on a GPU)::

    >>> import torch
    >>> from ospfn.kernels.attention import attention
    >>> q, k, v = (torch.randn(1, 20, 2, 16) for _ in range(3))
    >>> mask = torch.ones(1, 20, dtype=torch.bool); mask[:, 15:] = False
    >>> out = attention(q, k, v, key_mask=mask)
    >>> out.shape
    torch.Size([1, 20, 2, 16])
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ospfn.kernels.common import interpreting

__all__ = ["attention", "attention_forward", "attention_backward", "attention_fwd_op", "attention_bwd_op", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128  # the largest head dim the kernels take (the backend registry enforces it; nothing here checks)
LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BOUNDS: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; zeros where the row is >= n_rows (if BOUNDS) or the column >= HEAD_DIM."""
    if BOUNDS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_rows(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if BLOCK_D == HEAD_DIM:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _key_valid(KM, cols, Sk, stride_mn, HAS_MASK: tl.constexpr, BOUNDS: tl.constexpr):
    """int1 [BLOCK_N]: the key exists (col < Sk) and is not masked.  Only called when HAS_MASK or BOUNDS."""
    if HAS_MASK:
        if BOUNDS:
            ok = tl.load(KM + cols * stride_mn, mask=cols < Sk, other=0) != 0
        else:
            ok = tl.load(KM + cols * stride_mn) != 0
    else:
        ok = cols < Sk
    return ok


@triton.jit
def _fwd_step(acc, m_i, l_i, q, K, V, KM, start_n, Sk, stride_kn, stride_vn, stride_mn, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_MASK: tl.constexpr, BOUNDS: tl.constexpr, PREC: tl.constexpr):
    """One key block of the online softmax.  K, V, KM point at key 0 of this (batch, head)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    start64 = tl.cast(start_n, tl.int64)
    k = _load_rows(K + start64 * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :], cols, Sk, offs_d,
                   HEAD_DIM, BLOCK_D, BOUNDS)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    if HAS_MASK or BOUNDS:
        ok = _key_valid(KM, cols, Sk, stride_mn, HAS_MASK, BOUNDS)
        s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if HAS_MASK:
        # rows that have seen only masked keys so far keep m = -inf; subtract 0 instead (-inf - -inf = NaN)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new  # every block has at least one real key, so m_new is finite
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(V + start64 * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :], cols, Sk, offs_d,
                   HEAD_DIM, BLOCK_D, BOUNDS)
    if HAS_MASK:  # a masked V row may hold NaN / Inf, and P = 0 times NaN is NaN: zero it on the way in
        v = tl.where(ok[:, None], v, tl.zeros_like(v))
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, m_new, l_i


# ----------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KM,
    qk_scale, Sq, Sk, H,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_mb, stride_mn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m

    Qb = Q + b * stride_qb + h * stride_qh + tl.cast(start_m, tl.int64) * stride_qs
    q = _load_rows(Qb + offs_m[:, None] * stride_qs + offs_d[None, :], rows, Sq, offs_d, HEAD_DIM, BLOCK_D, True)
    Kb = K + b * stride_kb + h * stride_kh
    Vb = V + b * stride_vb + h * stride_vh
    KMb = KM + b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full = (Sk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, Kb, Vb, KMb, start_n, Sk, stride_kn, stride_vn, stride_mn,
                                  qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, HAS_MASK, False, PREC)
    if n_full < Sk:
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, Kb, Vb, KMb, n_full, Sk, stride_kn, stride_vn, stride_mn,
                                  qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, HAS_MASK, True, PREC)

    empty = l_i == 0.0  # no real key at all: output 0, LSE +inf (so the backward recomputes P = 0)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))

    Ob = O + b * stride_ob + h * stride_oh + tl.cast(start_m, tl.int64) * stride_os
    _store_rows(Ob + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty), rows, Sq, offs_d,
                HEAD_DIM, BLOCK_D)
    tl.store(LSE + bh * Sq + rows, lse, mask=rows < Sq)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, Sq, H,
    stride_ob, stride_os, stride_oh,
    stride_db, stride_ds, stride_dh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    Ob = O + b * stride_ob + h * stride_oh + tl.cast(start_m, tl.int64) * stride_os
    DOb = DO + b * stride_db + h * stride_dh + tl.cast(start_m, tl.int64) * stride_ds
    o = _load_rows(Ob + offs_m[:, None] * stride_os + offs_d[None, :], rows, Sq, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DOb + offs_m[:, None] * stride_ds + offs_d[None, :], rows, Sq, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * Sq + rows, delta, mask=rows < Sq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KM,
    sm_scale, qk_scale, Sq, Sk, H,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_mb, stride_mn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    """One program per key block: dV = sum_m P^T dO, dK = scale * sum_m dS^T Q."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    start_n = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    s64 = tl.cast(start_n, tl.int64)

    k = _load_rows(K + b * stride_kb + h * stride_kh + s64 * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :],
                   cols, Sk, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + b * stride_vb + h * stride_vh + s64 * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :],
                   cols, Sk, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    Qb = Q + b * stride_qb + h * stride_qh
    DOb = DO + b * stride_db + h * stride_dh
    LSEb = LSE + bh * Sq
    DELTAb = DELTA + bh * Sq
    if HAS_MASK:
        ok = _key_valid(KM + b * stride_mb, cols, Sk, stride_mn, True, True)
        # masked K / V rows may hold NaN / Inf: zeroed, so that dS = P * (dP - delta) is 0 there, not NaN
        k = tl.where(ok[:, None], k, tl.zeros_like(k))
        v = tl.where(ok[:, None], v, tl.zeros_like(v))
        # a key block with no real key (padding) has dK = dV = 0: skip the loop over queries
        hi = tl.where(tl.max(ok.to(tl.int32), 0) > 0, Sq, 0)
    else:
        hi = Sq
    for start_m in range(0, hi, BLOCK_M):
        rows = start_m + offs_m
        m64 = tl.cast(start_m, tl.int64)
        q = _load_rows(Qb + m64 * stride_qs + offs_m[:, None] * stride_qs + offs_d[None, :], rows, Sq, offs_d,
                       HEAD_DIM, BLOCK_D, True)
        do = _load_rows(DOb + m64 * stride_ds + offs_m[:, None] * stride_ds + offs_d[None, :], rows, Sq, offs_d,
                        HEAD_DIM, BLOCK_D, True)
        # query rows past Sq: LSE +inf -> P = 0 (their q and dO are 0 too)
        lse = tl.load(LSEb + rows, mask=rows < Sq, other=float("inf"))
        delta = tl.load(DELTAb + rows, mask=rows < Sq, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=PREC)  # [BLOCK_N, BLOCK_M]
        pT = tl.math.exp2(sT * qk_scale - lse[None, :])
        if HAS_MASK:
            pT = tl.where(ok[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    dk = dk * sm_scale

    DKb = DK + b * stride_dkb + h * stride_dkh + s64 * stride_dkn
    DVb = DV + b * stride_dvb + h * stride_dvh + s64 * stride_dvn
    _store_rows(DKb + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), cols, Sk, offs_d,
                HEAD_DIM, BLOCK_D)
    _store_rows(DVb + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), cols, Sk, offs_d,
                HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_step(dq, q, do, lse, delta, K, V, KM, start_n, Sk, stride_kn, stride_vn, stride_mn, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_MASK: tl.constexpr, BOUNDS: tl.constexpr, PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    start64 = tl.cast(start_n, tl.int64)
    k = _load_rows(K + start64 * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :], cols, Sk, offs_d,
                   HEAD_DIM, BLOCK_D, BOUNDS)
    v = _load_rows(V + start64 * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :], cols, Sk, offs_d,
                   HEAD_DIM, BLOCK_D, BOUNDS)
    if HAS_MASK or BOUNDS:
        ok = _key_valid(KM, cols, Sk, stride_mn, HAS_MASK, BOUNDS)
    if HAS_MASK:  # masked K / V rows may hold NaN / Inf: zero them, or 0 * NaN reaches dS and dQ
        k = tl.where(ok[:, None], k, tl.zeros_like(k))
        v = tl.where(ok[:, None], v, tl.zeros_like(v))
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if HAS_MASK or BOUNDS:
        # missing keys have k = v = 0 but exp2(-lse) may overflow to inf, and inf * 0 = NaN: zero P explicitly
        p = tl.where(ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KM,
    sm_scale, qk_scale, Sq, Sk, H,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_db, stride_ds, stride_dh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_mb, stride_mn,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    """One program per query block: dQ = scale * sum_n dS K."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    m64 = tl.cast(start_m, tl.int64)

    q = _load_rows(Q + b * stride_qb + h * stride_qh + m64 * stride_qs + offs_m[:, None] * stride_qs + offs_d[None, :],
                   rows, Sq, offs_d, HEAD_DIM, BLOCK_D, True)
    DOb = DO + b * stride_db + h * stride_dh + m64 * stride_ds
    do = _load_rows(DOb + offs_m[:, None] * stride_ds + offs_d[None, :], rows, Sq, offs_d, HEAD_DIM, BLOCK_D, True)
    lse = tl.load(LSE + bh * Sq + rows, mask=rows < Sq, other=float("inf"))
    delta = tl.load(DELTA + bh * Sq + rows, mask=rows < Sq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    Kb = K + b * stride_kb + h * stride_kh
    Vb = V + b * stride_vb + h * stride_vh
    KMb = KM + b * stride_mb
    n_full = (Sk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, Kb, Vb, KMb, start_n, Sk, stride_kn, stride_vn, stride_mn, qk_scale,
                      HEAD_DIM, BLOCK_D, BLOCK_N, HAS_MASK, False, PREC)
    if n_full < Sk:
        dq = _dq_step(dq, q, do, lse, delta, Kb, Vb, KMb, n_full, Sk, stride_kn, stride_vn, stride_mn, qk_scale,
                      HEAD_DIM, BLOCK_D, BLOCK_N, HAS_MASK, True, PREC)
    dq = dq * sm_scale
    DQb = DQ + b * stride_dqb + h * stride_dqh + m64 * stride_dqs
    _store_rows(DQb + offs_m[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty), rows, Sq, offs_d,
                HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------
# launch configurations
#
# CUDA (tuned for H100, D = 128, bf16): a small autotune per kernel, keyed on the head dim and the mask flag
# (triton adds the tensor dtypes to the key).  Configs that do not fit in shared memory (e.g. big blocks with
# fp32 inputs) fail to compile and are skipped by the autotuner; the smallest config of each list always fits.
# Interpreter: 16 x 16 blocks, so that even tiny test shapes cover several blocks and a partial last block.

_KEY = ["HEAD_DIM", "HAS_MASK"]


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# (register use checked with ptxas for sm_90, bf16, D = 128: stack frames of at most 64 bytes, most none)
_FWD_CONFIGS = [
    _cfg(128, 64, 8, 3),
    _cfg(128, 64, 8, 4),
    _cfg(128, 128, 8, 2),
    _cfg(128, 32, 8, 3),
    _cfg(64, 64, 4, 3),
    _cfg(64, 32, 4, 2),
]
# dK/dV: BLOCK_N keys stay resident, BLOCK_M queries stream
_DKDV_CONFIGS = [
    _cfg(32, 128, 8, 3),
    _cfg(32, 128, 8, 2),
    _cfg(16, 128, 8, 3),
    _cfg(64, 64, 8, 3),
    _cfg(32, 64, 4, 2),
]
# dQ: BLOCK_M queries stay resident, BLOCK_N keys stream
_DQ_CONFIGS = [
    _cfg(128, 64, 8, 2),
    _cfg(128, 64, 8, 3),
    _cfg(128, 32, 8, 3),
    _cfg(64, 64, 8, 3),
    _cfg(64, 32, 4, 2),
]

_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY)(_attn_fwd_kernel)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_KEY)(_attn_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_KEY)(_attn_bwd_dq_kernel)

_INTERP_BLOCK = 16
_DELTA_BLOCK_M = 64


def _launch(tuned, raw, grid_of, args, meta):
    """Autotuned launch on CUDA; fixed small blocks under the interpreter."""
    if interpreting():
        blocks = {"BLOCK_M": _INTERP_BLOCK, "BLOCK_N": _INTERP_BLOCK}
        raw[grid_of(blocks)](*args, **meta, **blocks)
    else:
        tuned[grid_of](*args, **meta)


# ----------------------------------------------------------------------------------------------------------
# host side


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    # fp32: exact fp32 products (no TF32) so results track an fp32 reference; ignored for fp16 / bf16
    return "ieee" if dtype == torch.float32 else "tf32"


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _mask_arg(key_mask: torch.Tensor | None, like: torch.Tensor):
    """(tensor, stride_b, stride_n) for the kernel; a 1-element dummy when there is no mask."""
    if key_mask is None:
        return torch.empty(1, dtype=torch.uint8, device=like.device), 0, 0
    km = key_mask.view(torch.uint8)  # same size as bool: no copy, strides kept
    return km, km.stride(0), km.stride(1)


def attention_forward(q, k, v, key_mask=None, scale=None):
    """Forward only: returns ``(out, lse)``; ``lse`` [B, H, Sq] fp32 in log2 units (+inf for rows with no key).

    No argument checks (see :func:`attention`); the head dim of q, k, v must be unit-stride.
    """
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    km, smb, smn = _mask_arg(key_mask, q)
    args = (q, k, v, out, lse, km, scale * LOG2E, Sq, Sk, H,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            smb, smn)
    meta = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), HAS_MASK=key_mask is not None, PREC=_precision(q.dtype))
    _launch(_fwd_tuned, _attn_fwd_kernel, lambda m: (triton.cdiv(Sq, m["BLOCK_M"]), B * H), args, meta)
    return out, lse


def attention_backward(do, q, k, v, out, lse, key_mask=None, scale=None, need_dq=True, need_dkdv=True):
    """Gradients ``(dq, dk, dv)`` (None where not needed) from the saved ``out`` and ``lse``."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    do = _unit_last(do)
    if q.numel() == 0 or k.numel() == 0:  # no work; with Sk = 0 the output was 0, so are the gradients
        return (q.new_zeros(q.shape) if need_dq else None, k.new_zeros(k.shape) if need_dkdv else None,
                v.new_zeros(v.shape) if need_dkdv else None)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if need_dq else None
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if need_dkdv else None
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if need_dkdv else None
    BLOCK_D = _block_d(D)
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    bm = _INTERP_BLOCK if interpreting() else _DELTA_BLOCK_M
    _attn_bwd_delta_kernel[(triton.cdiv(Sq, bm), B * H)](
        out, do, delta, Sq, H,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=bm,
    )
    km, smb, smn = _mask_arg(key_mask, q)
    meta = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, HAS_MASK=key_mask is not None, PREC=_precision(q.dtype))
    qk_scale = scale * LOG2E
    if need_dkdv:
        args = (q, k, v, do, dk, dv, lse, delta, km, scale, qk_scale, Sq, Sk, H,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                do.stride(0), do.stride(1), do.stride(2),
                dk.stride(0), dk.stride(1), dk.stride(2),
                dv.stride(0), dv.stride(1), dv.stride(2),
                smb, smn)
        _launch(_dkdv_tuned, _attn_bwd_dkdv_kernel, lambda m: (triton.cdiv(Sk, m["BLOCK_N"]), B * H), args, meta)
    if need_dq:
        args = (q, k, v, do, dq, lse, delta, km, scale, qk_scale, Sq, Sk, H,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                do.stride(0), do.stride(1), do.stride(2),
                dq.stride(0), dq.stride(1), dq.stride(2),
                smb, smn)
        _launch(_dq_tuned, _attn_bwd_dq_kernel, lambda m: (triton.cdiv(Sq, m["BLOCK_M"]), B * H), args, meta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# custom ops: torch.ops.ospfn_triton.attention_fwd / attention_bwd, with fake implementations; the forward op
# carries the autograd formula (through the backward op), so torch.compile traces both without a graph break


@torch.library.custom_op("ospfn_triton::attention_fwd", mutates_args=())
def attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] fp32 in log2 units)``; see :func:`attention_forward`."""
    return attention_forward(_unit_last(q), _unit_last(k), _unit_last(v), key_mask, scale)


@attention_fwd_op.register_fake
def _(q, k, v, key_mask, scale):
    B, Sq, H, D = q.shape
    return q.new_empty((B, Sq, H, D)), q.new_empty((B, H, Sq), dtype=torch.float32)


@torch.library.custom_op("ospfn_triton::attention_bwd", mutates_args=())
def attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    key_mask: Optional[torch.Tensor], scale: float, need_dq: bool, need_dkdv: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dq, dk, dv)``; a gradient that is not needed (``need_dq`` / ``need_dkdv`` False) is not computed and
    comes back as an empty tensor (shape (0,)) -- an op cannot return None."""
    dq, dk, dv = attention_backward(do, _unit_last(q), _unit_last(k), _unit_last(v), out, lse, key_mask, scale,
                                    need_dq, need_dkdv)  # fmt: skip
    empty = q.new_empty(0)
    return (dq if dq is not None else empty, dk if dk is not None else empty.clone(),
            dv if dv is not None else empty.clone())  # fmt: skip


@attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, key_mask, scale, need_dq, need_dkdv):
    return (q.new_empty(q.shape if need_dq else (0,)), k.new_empty(k.shape if need_dkdv else (0,)),
            v.new_empty(v.shape if need_dkdv else (0,)))  # fmt: skip


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_mask = ctx.saved_tensors
    need_dq = ctx.needs_input_grad[0]
    need_dkdv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dq, dk, dv = attention_bwd_op(dout, q, k, v, out, lse, key_mask, ctx.scale, need_dq, need_dkdv)
    return (dq if need_dq else None, dk if need_dkdv else None, dv if need_dkdv else None, None, None)


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T * scale, masked) v`` per batch and head; the ``triton`` backend.

    q [B, Sq, H, D], k and v [B, Sk, H, D] (fp16, bf16 or fp32, D <= 128, any strides); ``key_mask`` [B, Sk]
    bool with True = real key, or None; ``scale`` defaults to ``1/sqrt(D)``.  Returns [B, Sq, H, D] in the
    input dtype.  Differentiable in q, k, v.  A batch entry without any real key gives zeros (and zero
    gradients), never NaN.  The arguments are not checked here: :func:`ospfn.ops.attention` validates them
    (and the backend registry the limits of this kernel, e.g. ``D <= MAX_HEAD_DIM``).

    >>> import torch
    >>> from ospfn.kernels.attention import attention
    >>> q = torch.randn(2, 5, 1, 16, requires_grad=True)
    >>> k, v = torch.randn(2, 7, 1, 16), torch.randn(2, 7, 1, 16)
    >>> mask = torch.tensor([[True] * 7, [False] * 7])
    >>> out = attention(q, k, v, key_mask=mask)
    >>> bool(out[1].eq(0).all())
    True
    >>> out.sum().backward(); bool(q.grad[1].eq(0).all())
    True
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return attention_fwd_op(q, k, v, key_mask, scale)[0]
