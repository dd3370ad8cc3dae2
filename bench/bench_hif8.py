"""HiF8 codec throughput: encode, decode, round, quantize (tensor / row) on 2^24 fp32 elements.

Every backend that can run here is measured; ``extra_info`` carries GB/s and the speed-up over the ``ref``
backend on the same device, measured in the same run.  GB/s counts the minimal traffic (read the input
once, write the output once), so the two-pass tensor-wise quantize reads its input twice in reality.

    python -m pytest bench/bench_hif8.py --benchmark-json=bench/results/hif8-cpu.json
"""

import pytest
import torch
from conftest import backend_device, device_name, median_time, sync

from ospfn.ops import hif8_decode, hif8_encode, hif8_quantize, hif8_round

N = 1 << 24


def _case(op: str, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, generator=g) * 4).to(device)
    if op == "encode":
        return (lambda b: hif8_encode(x, backend=b)), 4 * N + N
    if op == "decode":
        c = hif8_encode(x, backend="ref")
        return (lambda b: hif8_decode(c, backend=b)), N + 4 * N
    if op == "round":
        return (lambda b: hif8_round(x, backend=b)), 8 * N
    if op == "quantize":
        return (lambda b: hif8_quantize(x, 15.0, backend=b)), 8 * N
    if op == "quantize_row":
        xr = x.view(-1, 4096)
        return (lambda b: hif8_quantize(xr, 15.0, granularity="row", backend=b)), 8 * N
    raise ValueError(op)


OPS = ["encode", "decode", "round", "quantize", "quantize_row"]


@pytest.mark.parametrize("backend", ["ref", "cpp", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_hif8(benchmark, baseline_times, op, backend):
    device = backend_device(backend)
    if device is None:
        pytest.skip(f"backend {backend!r} cannot be benchmarked here")
    fn, nbytes = _case(op, device)

    def run():
        fn(backend)
        sync(device)

    benchmark.group = f"hif8 {op} ({device.type})"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    t = benchmark.stats.stats.median
    key = (op, device.type)
    if backend == "ref":
        baseline_times[key] = t
    base = baseline_times.get(key) or median_time(lambda: fn("ref"), device)
    benchmark.extra_info.update(
        device=device_name(device),
        elements=N,
        gbps=nbytes / t / 1e9,
        speedup_vs_ref=base / t,
    )
