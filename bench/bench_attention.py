"""Flash-attention kernel (``ospfn.kernels.attention``) on Wan2.1 shapes, bf16, GPU only.

Baseline measured in the same run: ``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention-2
backend without a mask; the memory-efficient backend with a boolean key mask, the only fused one that takes
a mask).  ``extra_info`` carries TFLOP/s with FLOPs = 4*B*S^2*H*D forward and 2.5x that backward (so 3.5x
for forward + backward), the utilisation of the device's dense bf16 peak, and the speed-up over SDPA.
The masked cases pad 7% of the keys at the end, like Skiparse's padded 720p grids.

    python -m pytest bench/bench_attention.py --benchmark-json=bench/results/attention-h100.json
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_device, device_name, median_time, sync

# (B, S, H, D): Wan2.1 1.3B at 480p 81 frames (32,760 tokens, 12 heads) and 14B at 720p 81 frames (75,600, 40)
SHAPES = [(1, 32760, 12, 128), (1, 75600, 40, 128)]
_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, SXM


def _peak(device: torch.device):
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16_TFLOPS.items() if k in name), None)


def _case(shape, masked: bool, mode: str, impl: str, device: torch.device):
    from ospfn.kernels.attention import attention

    B, S, H, D = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(B, S, dtype=torch.bool, device=device)
        mask[:, S - S * 7 // 100:] = False
    need_grad = mode == "fwd+bwd"
    for t in (q, k, v):
        t.requires_grad_(need_grad)
    do = torch.randn(B, S, H, D, generator=g, device=device, dtype=torch.bfloat16)

    if impl == "triton":
        def fwd():
            return attention(q, k, v, key_mask=mask)
    else:
        am = None if mask is None else mask[:, None, None, :]

        def fwd():
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=am)
            return o.transpose(1, 2)

    def step():
        if need_grad:
            for t in (q, k, v):
                t.grad = None
            fwd().backward(do)
        else:
            with torch.no_grad():
                fwd()

    flops = 4.0 * B * S * S * H * D * (3.5 if need_grad else 1.0)
    return step, flops


@pytest.mark.parametrize("impl", ["sdpa", "triton"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "keymask"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}xS{}xH{}xD{}".format(*s))
def test_attention_kernel(benchmark, baseline_times, shape, masked, mode, impl):
    device = backend_device("triton")
    if device is None or device.type != "cuda":
        pytest.skip("the attention kernel benchmark needs a CUDA device")
    step, flops = _case(shape, masked, mode, impl, device)

    def run():
        step()
        sync(device)

    run()  # compile + autotune outside the timing
    benchmark.group = f"attention {mode} {'keymask' if masked else 'nomask'} {shape}"
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    t = benchmark.stats.stats.median
    key = (benchmark.group, device.type)
    if impl == "sdpa":
        baseline_times[key] = t
    base = baseline_times.get(key)
    if base is None:
        base_step, _ = _case(shape, masked, mode, "sdpa", device)
        base = median_time(base_step, device)
    tflops = flops / t / 1e12
    peak = _peak(device)
    benchmark.extra_info.update(
        device=device_name(device),
        tflops=tflops,
        utilisation=tflops / peak if peak else float("nan"),
        speedup_vs_sdpa=base / t,
    )
