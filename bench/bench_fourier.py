"""FlashI2V Fourier high-frequency filter f_high(s) at Wan2.1 latent sizes.

s [B, 16, H, W] fp32 for the latents of 480x832 (60x104) and 720x1280 (90x160) video, batch 1 and 8, with the
inference ratio (0.1 for every sample) and training ratios (U(0.05, 0.95) per sample).  Every backend that can
run here is measured (ref on CPU; triton on CUDA when present, never the interpreter); ``extra_info`` carries the
median in ms and the speed-up over the ``ref`` backend on the same device, measured in the same run.

    python -m pytest bench/bench_fourier.py --benchmark-json=bench/results/fourier-cpu.json
"""

import pytest
import torch
from conftest import backend_device, device_name, median_time, sync

from ospfn.ops.fourier import fourier_high_freq

C = 16
SHAPES = {"60x104": (60, 104), "90x160": (90, 160)}


def _case(shape: str, batch: int, ratio: str, device: torch.device):
    H, W = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    s = torch.randn(batch, C, H, W, generator=g).to(device)
    if ratio == "infer":
        rho = 0.1
    else:
        rho = (0.05 + 0.9 * torch.rand(batch, generator=g)).to(device)
    return lambda b: fourier_high_freq(s, rho, backend=b)


@pytest.mark.parametrize("backend", ["ref", "triton"])
@pytest.mark.parametrize("ratio", ["infer", "train"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fourier_high_freq(benchmark, baseline_times, shape, batch, ratio, backend):
    device = backend_device(backend)
    if device is None:
        pytest.skip(f"backend {backend!r} cannot be benchmarked here")
    fn = _case(shape, batch, ratio, device)

    def run():
        fn(backend)
        sync(device)

    benchmark.group = f"fourier_high_freq {shape} B={batch} {ratio} ({device.type})"
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    t = benchmark.stats.stats.median
    key = (shape, batch, ratio, device.type)
    if backend == "ref":
        baseline_times[key] = t
    base = baseline_times.get(key) or median_time(lambda: fn("ref"), device)
    benchmark.extra_info.update(
        device=device_name(device),
        shape=f"{batch}x{C}x{shape}",
        ms=t * 1e3,
        speedup_vs_ref=base / t,
    )
