"""HiF8 W8A16 matmul (``ospfn.ops.hif8_matmul.hif8_matmul``) against dense matmuls, K = N = 5120.

``y = x @ W_q^T`` with W stored as 1-byte HiF8 codes + a per-channel fp32 scale, against the same product with
a dense weight in the same run:

* CPU (M in 1, 16, 256): hif8_matmul ``ref`` and ``cpp`` (fp32 x; the codes are decoded a block of rows at a
  time and multiplied by torch's fp32 GEMM) vs torch fp32 and bf16 ``x @ W.T``.
* CUDA (M in 1, 16, 256, 4096): the autotuned Triton kernel (bf16 x, bf16 tensor cores) vs cuBLAS bf16
  (``F.linear``).  The first call autotunes; timing starts after the warm-up round.

``extra_info``: TFLOP/s (2*M*N*K), GB/s (weight bytes + x + y, read/written once), the weight bytes, the
ratio to the fp32 (CPU) / cuBLAS bf16 (CUDA) baseline of the same M measured in the same run, and on CUDA the
fraction of the device's nominal DRAM bandwidth and the chosen kernel config.

    python -m pytest bench/bench_hif8_matmul.py --benchmark-json=bench/results/hif8-matmul-cpu.json
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_device, device_name, median_time, peak_bandwidth_gbps, sync

from ospfn.ops.hif8_matmul import hif8_matmul, hif8_pack

K = N = 5120


def _weight(device):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, K, generator=g) * 0.02).to(device)


def _x(M, device, dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(M, K, generator=g).to(device, dtype)


def _case(impl: str, M: int, device: torch.device):
    """(callable, weight bytes, activation element size) for one implementation."""
    w = _weight(device)
    if impl == "torch_fp32":
        x = _x(M, device, torch.float32)
        return (lambda: x @ w.T), 4 * N * K, 4
    if impl == "torch_bf16":
        x, wb = _x(M, device, torch.bfloat16), w.bfloat16()
        return (lambda: x @ wb.T), 2 * N * K, 2
    if impl == "cublas_bf16":
        x, wb = _x(M, device, torch.bfloat16), w.bfloat16()
        return (lambda: F.linear(x, wb)), 2 * N * K, 2
    backend, dtype = {
        "hif8_ref": ("ref", torch.float32),
        "hif8_cpp": ("cpp", torch.float32),
        "hif8_triton": ("triton", torch.bfloat16),
    }[impl]
    p = hif8_pack(w, granularity="row")
    x = _x(M, device, dtype)
    return (lambda: hif8_matmul(x, p, backend=backend)), p.nbytes, x.element_size()


CPU_IMPLS = ["torch_fp32", "torch_bf16", "hif8_ref", "hif8_cpp"]
CUDA_IMPLS = ["cublas_bf16", "hif8_triton"]


def _run(benchmark, baseline_times, impl, M, device, baseline_impl):
    fn, wbytes, xsize = _case(impl, M, device)

    def run():
        fn()
        sync(device)

    benchmark.group = f"hif8_matmul M={M} K=N={K} ({device.type})"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    t = benchmark.stats.stats.median
    key = (baseline_impl, M, device.type)
    if impl == baseline_impl:
        baseline_times[key] = t
    if key not in baseline_times:
        base_fn = _case(baseline_impl, M, device)[0]
        baseline_times[key] = median_time(base_fn, device)
    nbytes = wbytes + M * K * xsize + M * N * xsize
    info = dict(
        device=device_name(device),
        M=M,
        tflops=2 * M * N * K / t / 1e12,
        gbps=nbytes / t / 1e9,
        weight_mb=wbytes / 1e6,
        **{f"speedup_vs_{baseline_impl}": baseline_times[key] / t},
    )
    if device.type == "cuda":
        peak = peak_bandwidth_gbps(device)
        if peak:
            info["frac_peak_bw"] = info["gbps"] / peak
        if impl == "hif8_triton":
            from ospfn.kernels.hif8_matmul import best_config

            info["config"] = str(best_config(M, N, K))
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("M", [1, 16, 256])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_hif8_matmul_cpu(benchmark, baseline_times, impl, M):
    device = torch.device("cpu")
    if impl == "hif8_cpp" and backend_device("cpp") is None:
        pytest.skip("the cpp backend is not available here")
    _run(benchmark, baseline_times, impl, M, device, "torch_fp32")


@pytest.mark.parametrize("M", [1, 16, 256, 4096])
@pytest.mark.parametrize("impl", CUDA_IMPLS)
def test_hif8_matmul_cuda(benchmark, baseline_times, impl, M):
    device = backend_device("triton")
    if device is None or device.type != "cuda":
        pytest.skip("needs a CUDA device (the Triton interpreter is not benchmarked)")
    _run(benchmark, baseline_times, impl, M, device, "cublas_bf16")
