"""Skiparse-2D benchmarks: sparse vs full attention at the same N, and the fold/switch/unfold permutations.

Attention: N = 8192 tokens (grid 8x32x32), 2 heads, head dim 64, ratio 2.  ``full`` is dense attention over
all N tokens; ``token`` / ``group`` run the same tokens as 4 sub-sequences of N/4: ``core`` on inputs
already in the sparse layout (inside a model the residual stream is re-laid-out once per block, before the
q/k/v projections), ``relayout`` including fold of q, k, v and unfold of the output (an upper bound on the
re-layout cost).  The FLOP ideal is P^2 = 4x; ``extra_info`` has the measured speed-up over ``full`` (same
run) and its fraction of the ideal.

Permutations: x [1, 21*30*52 (480p latent tokens), 1536] bf16, GB/s = bytes read + written.

    python -m pytest bench/bench_skiparse.py --benchmark-json=bench/results/skiparse-cpu.json
"""

import pytest
import torch
from conftest import backend_device, device_name, median_time, sync

from ospfn.ops import attention, skiparse_fold, skiparse_key_mask, skiparse_layout, skiparse_switch, skiparse_unfold

GRID, P, HEADS, D = (8, 32, 32), 2, 2, 64
N = GRID[0] * GRID[1] * GRID[2]


def _qkv(device, dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, N, HEADS, D, generator=g).to(device, dtype) for _ in range(3)]


def _fold(t, kind):
    lay = skiparse_layout(GRID, P)
    return skiparse_fold(t.reshape(1, N, HEADS * D), GRID, P, kind).reshape(P * P, lay.seq, HEADS, D)


def _run_attention(layout, q, k, v, backend, mode="core"):
    if layout == "full":
        return attention(q, k, v, backend=backend)
    mask = skiparse_key_mask(GRID, P, layout, 1, device=q.device)
    if mode == "core":  # q, k, v already folded
        return attention(q, k, v, key_mask=mask, backend=backend)
    o = attention(_fold(q, layout), _fold(k, layout), _fold(v, layout), key_mask=mask, backend=backend)
    return skiparse_unfold(o.reshape(P * P, -1, HEADS * D), GRID, P, layout)


def _flops(layout):
    n = N if layout == "full" else N // (P * P)
    groups = 1 if layout == "full" else P * P
    return 4 * groups * n * n * HEADS * D


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout,mode", [("full", "core"), ("token", "core"), ("group", "core"), ("token", "relayout"), ("group", "relayout")])
def test_attention(benchmark, baseline_times, layout, mode, backend):
    device = backend_device(backend)
    if device is None or (backend == "triton" and device.type != "cuda"):
        pytest.skip(f"backend {backend!r} cannot be benchmarked here")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = _qkv(device, dtype)
    if layout != "full" and mode == "core":
        q, k, v = (_fold(t, layout).contiguous() for t in (q, k, v))

    def run():
        _run_attention(layout, q, k, v, backend, mode)
        sync(device)

    benchmark.group = f"skiparse attention N={N} ({device.type}, {backend})"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    t = benchmark.stats.stats.median
    key = ("attn", device.type, backend)
    if layout == "full":
        baseline_times[key] = t
    if key not in baseline_times:
        qf, kf, vf = _qkv(device, dtype)
        baseline_times[key] = median_time(lambda: _run_attention("full", qf, kf, vf, backend), device)
    full = baseline_times[key]
    benchmark.extra_info.update(
        device=device_name(device),
        dtype=str(dtype).replace("torch.", ""),
        tflops=_flops(layout) / t / 1e12,
        speedup_vs_full=full / t,
        fraction_of_ideal=(full / t) / (P * P) if layout != "full" else 1.0,
    )


PERM_GRID, PERM_C = (21, 30, 52), 1536


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("op", ["fold_token", "fold_group", "switch", "unfold_group"])
def test_permutation(benchmark, op, backend):
    device = backend_device(backend)
    if device is None or (backend == "triton" and device.type != "cuda"):
        pytest.skip(f"backend {backend!r} cannot be benchmarked here")
    lay = skiparse_layout(PERM_GRID, P)
    x = torch.randn(1, lay.n, PERM_C, dtype=torch.bfloat16, device=device)
    y = skiparse_fold(x, PERM_GRID, P, "group", backend="ref")
    if op == "fold_token":
        fn, nbytes = (lambda: skiparse_fold(x, PERM_GRID, P, "token", backend=backend)), (lay.n + lay.n_pad) * PERM_C * 2
    elif op == "fold_group":
        fn, nbytes = (lambda: skiparse_fold(x, PERM_GRID, P, "group", backend=backend)), (lay.n + lay.n_pad) * PERM_C * 2
    elif op == "switch":
        fn, nbytes = (lambda: skiparse_switch(y, PERM_GRID, P, backend=backend)), 2 * lay.n_pad * PERM_C * 2
    else:
        fn, nbytes = (lambda: skiparse_unfold(y, PERM_GRID, P, "group", backend=backend)), (lay.n + lay.n) * PERM_C * 2

    def run():
        fn()
        sync(device)

    benchmark.group = f"skiparse {op} ({device.type})"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    t = benchmark.stats.stats.median
    extra = {"device": device_name(device), "gbps": nbytes / t / 1e9}
    if device.type == "cuda":
        from conftest import peak_bandwidth_gbps

        peak = peak_bandwidth_gbps(device)
        if peak:
            extra["fraction_of_bandwidth"] = nbytes / t / 1e9 / peak
    benchmark.extra_info.update(extra)
