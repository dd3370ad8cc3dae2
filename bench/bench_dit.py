"""End-to-end DiT forward: OSP-Next ``dual_end`` vs the same model with full attention everywhere.

CPU: dim 256, 4 heads (d = 64), ffn 1024, 12 layers, num_full_blocks 4, token grid 8x32x32 (8192 tokens),
64 text tokens, fp32, no grad.  CUDA (when present): ``osp-next-1.3b`` at 480p (21x30x52 = 32,760 tokens),
bf16.  ``extra_info`` gives the measured speed-up of dual_end over full (same run), the FLOP-count ideal
for that configuration (``ospfn.model.flops.forward_flops``) and the fraction of it achieved.

    python -m pytest bench/bench_dit.py --benchmark-json=bench/results/dit-cpu.json
"""

import pytest
import torch
from conftest import device_name, median_time, sync

import ospfn.model as M
from ospfn.model.flops import forward_flops


def _setup(device):
    if device.type == "cuda":
        cfg = M.DiTConfig.preset("osp-next-1.3b")
        grid, text_len, dtype = (21, 30, 52), 512, torch.bfloat16
    else:
        cfg = M.DiTConfig.preset("tiny", dim=256, num_heads=4, ffn_dim=1024, num_layers=12, num_full_blocks=4, text_dim=64, text_len=64, freq_dim=64)
        grid, text_len, dtype = (8, 32, 32), 64, torch.float32
    params = M.init_params(cfg, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    pt, ph, pw = cfg.patch_size
    x = torch.randn(1, cfg.in_dim, grid[0] * pt, grid[1] * ph, grid[2] * pw, generator=g).to(device)
    t = torch.tensor([500.0], device=device)
    ctx = torch.randn(1, text_len, cfg.text_dim, generator=g).to(device, dtype)
    return cfg, params, grid, text_len, x, t, ctx


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_type", ["full", "dual_end"])
def test_dit_forward(benchmark, baseline_times, model_type, device):
    device = torch.device(device)
    cfg, params, grid, text_len, x, t, ctx = _setup(device)
    full_cfg = cfg.replace(skiparse_model_type="full", num_full_blocks=0)
    run_cfg = full_cfg if model_type == "full" else cfg

    def run():
        with torch.no_grad():
            M.forward(params, run_cfg, x, t, ctx)
        sync(device)

    benchmark.group = f"DiT forward ({device.type})"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    tm = benchmark.stats.stats.median
    key = ("dit", device.type)
    if model_type == "full":
        baseline_times[key] = tm
    if key not in baseline_times:
        baseline_times[key] = median_time(lambda: M.forward(params, full_cfg, x, t, ctx), device, repeat=3)
    f_full = forward_flops(full_cfg, grid, text_len)["total"]
    f_run = forward_flops(run_cfg, grid, text_len)["total"]
    ideal = f_full / f_run
    speedup = baseline_times[key] / tm
    benchmark.extra_info.update(
        device=device_name(device),
        tokens=grid[0] * grid[1] * grid[2],
        tflops=f_run / tm / 1e12,
        speedup_vs_full=speedup,
        flop_ideal=ideal,
        fraction_of_ideal=speedup / ideal if model_type != "full" else 1.0,
    )
