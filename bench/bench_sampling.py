"""One sampling step of the ``osp-next-1.3b`` architecture: the OSP-Next ``dual_end`` Skiparse schedule vs full
attention everywhere (the analogue of OSP-Next's end-to-end speed-up claim, 1.53x at 480p).

A step is what ``ospfn.sched.sample`` does per step: one DiT call on the classifier-free-guidance batch of two
(unconditional + conditional text, 512 UMT5-width tokens each), the guidance combination and the Euler update;
measured as ``sample(..., steps=1, guidance=5)``.  Both schedules run on the SAME random weights (Skiparse adds
no parameters): ``dual_end`` is the preset (sparse ratio 2, the first and last ``num_full_blocks / 2`` blocks
full), ``full`` the same config with ``skiparse_model_type="full"``.

Two modes:

* CPU (default): the preset's widths (dim 1536, 12 heads, ffn 8960, text 4096 -> 1536) with **8 layers** instead
  of 30 (4 full + 4 Skiparse: ``num_full_blocks`` must be a multiple of 4 and at most half the layers, so 8 is
  the smallest depth with both kinds; the preset has 8 full of 30), fp32, latent grid 2 x 32 x 56 -> token grid
  2 x 16 x 28 (896 tokens per sample, the aspect of 480 x 832), text 512 tokens: 1.4 TFLOP per step.  Small
  grids are dominated by the linear layers, which Skiparse does not reduce: the ideal speed-up there is 1.02x
  (``flops_ratio``, from ``ospfn.model.flops``, for the measured configuration), against 1.54x at 480p, so the
  CPU run checks the harness and the direction, not the claim.  About 2-3 minutes on an idle 2-core machine.
* CUDA (``--device cuda``; needs a GPU, not run by the test suite): the full preset (30 layers, 8 full), bf16
  weights, latent 21 x 60 x 104 = 480 x 832 x 81 frames -> 21 x 30 x 52 = 32,760 tokens per sample.

Timing: one process; after one warm-up call of each schedule, R rounds each run both once, the order swapped
every round (so a slow drift of a shared machine hits both alike).  ``ratio`` = median over rounds of the paired
ratio full_time / dual_end_time of the same round (> 1: dual_end faster); ``ratio_of_min`` = min(full) /
min(dual_end); on CPU ``ratio_cpu`` is the same paired ratio of process CPU times (``time.process_time``, which
does not count waiting for a core another tenant holds).  The device is named in the results (CPU model and
threads, or the GPU name)::

    python bench/bench_sampling.py                   # -> bench/results/sampling-cpu.json
    python bench/bench_sampling.py --device cuda     # -> bench/results/sampling-cuda.json
    python bench/bench_sampling.py --layers 12 --grid 3x16x28 --rounds 5 --threads 1 --out -   # print only

The JSON has the pytest-benchmark layout, so ``python bench/report.py bench/results/sampling-cpu.json`` makes
the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

try:
    from conftest import cpu_name, device_name, sync
except ImportError:  # imported from elsewhere
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import cpu_name, device_name, sync

import ospfn.model as M
from ospfn.model.flops import forward_flops
from ospfn.sched import sample

HERE = os.path.dirname(os.path.abspath(__file__))
PRESET = "osp-next-1.3b"
TEXT_LEN = 512
MODES = {  # device type -> (layers, token grid (T', H', W') after the (1, 2, 2) patch, dtype, rounds)
    "cpu": (8, (2, 16, 28), torch.float32, 3),
    "cuda": (30, (21, 30, 52), torch.bfloat16, 5),
}
SCHEDULES = ("full", "dual_end")


def configs(layers: int):
    """(dual_end config, full config) of the preset at ``layers`` blocks (the preset's full-block count, at most
    half the layers and a multiple of 4)."""
    base = M.DiTConfig.preset(PRESET)
    nf = base.num_full_blocks if layers == base.num_layers else min(base.num_full_blocks, (layers // 2) // 4 * 4)
    dual = base.replace(num_layers=layers, num_full_blocks=nf)
    return dual, dual.replace(skiparse_model_type="full", num_full_blocks=0)


def make_step(cfg, params, grid, device, seed=0):
    """A zero-argument callable: one guided Euler step from sigma = 1 (the first step of a 50-step, shift-7
    schedule would be the same work), returning the new latents."""
    pt, ph, pw = cfg.patch_size
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, cfg.in_dim, grid[0] * pt, grid[1] * ph, grid[2] * pw, generator=g).to(device)
    dtype = params["patch_embedding.weight"].dtype
    ctx = torch.randn(1, TEXT_LEN, cfg.text_dim, generator=g).to(device, dtype)
    neg = torch.randn(1, TEXT_LEN, cfg.text_dim, generator=g).to(device, dtype)

    def run():
        with torch.no_grad():
            out = sample(params, cfg, noise=noise, context=ctx, neg_context=neg, guidance=5.0, steps=1, shift=7.0)
        sync(device)
        return out

    return run


def timed(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def measure(device: torch.device, layers: int, grid: tuple, dtype: torch.dtype, rounds: int, log=print) -> dict:
    dual, full = configs(layers)
    log(f"{PRESET}: {layers} layers ({dual.num_full_blocks} full in dual_end), dim {dual.dim}, grid {grid} = "
        f"{grid[0] * grid[1] * grid[2]} tokens x CFG batch 2, text {TEXT_LEN}, {dtype}, on {device_name(device)}")  # fmt: skip
    t0 = time.perf_counter()
    params = M.init_params(dual, seed=0, dtype=dtype, device=device)
    log(f"  weights: {sum(v.numel() for v in params.values()) / 1e6:.0f} M parameters ({time.perf_counter() - t0:.1f} s)")
    run = {"dual_end": make_step(dual, params, grid, device), "full": make_step(full, params, grid, device)}
    for name in SCHEDULES:  # warm-up (first-call costs, autotuning) and a sanity check
        w, _ = timed(run[name])
        log(f"  warm-up {name}: {w:.2f} s")
    times = {n: [] for n in SCHEDULES}
    cpu = {n: [] for n in SCHEDULES}
    for r in range(rounds):
        for name in SCHEDULES if r % 2 == 0 else SCHEDULES[::-1]:
            w, c = timed(run[name])
            times[name].append(w)
            cpu[name].append(c)
        log(f"  round {r + 1}/{rounds}: full {times['full'][-1]:.3f} s, dual_end {times['dual_end'][-1]:.3f} s")
    paired = [f / d for f, d in zip(times["full"], times["dual_end"])]
    f_full = forward_flops(full, grid, TEXT_LEN)["total"]
    f_dual = forward_flops(dual, grid, TEXT_LEN)["total"]
    res = {
        "device": device_name(device), "device_type": device.type, "layers": layers, "num_full_blocks": dual.num_full_blocks,
        "grid": list(grid), "tokens": grid[0] * grid[1] * grid[2], "text_len": TEXT_LEN, "dtype": str(dtype).replace("torch.", ""),
        "rounds": rounds, "times": times, "cpu_times": cpu, "paired": paired, "ratio": statistics.median(paired),
        "ratio_of_min": min(times["full"]) / min(times["dual_end"]), "flops_ratio": f_full / f_dual,
        "tflop_per_step_full": 2 * f_full / 1e12, "tflop_per_step_dual_end": 2 * f_dual / 1e12,
    }  # fmt: skip
    if device.type == "cpu":
        res["ratio_cpu"] = statistics.median([f / d for f, d in zip(cpu["full"], cpu["dual_end"])])
    if device.type == "cuda":
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return res


def _stats(ts: list[float]) -> dict:
    return {
        "min": min(ts), "max": max(ts), "mean": statistics.fmean(ts), "median": statistics.median(ts),
        "stddev": statistics.stdev(ts) if len(ts) > 1 else 0.0, "rounds": len(ts), "iterations": 1, "data": ts,
    }  # fmt: skip


def to_benchmark_json(res: dict, info: dict) -> dict:
    """The pytest-benchmark JSON layout (what ``bench/report.py`` reads), the ratios on the dual_end row."""
    benches = []
    for name in SCHEDULES:
        extra = {"device": res["device"], "tokens": res["tokens"], "layers": res["layers"], "dtype": res["dtype"]}
        if name == "dual_end":
            extra.update(ratio=res["ratio"], ratio_of_min=res["ratio_of_min"], flops_ratio=res["flops_ratio"])
            if "ratio_cpu" in res:
                extra["ratio_cpu"] = res["ratio_cpu"]
        benches.append({
            "group": f"one sampling step, CFG batch 2 ({res['device_type']})", "name": f"sampling_step[{name}]",
            "fullname": f"bench/bench_sampling.py::sampling_step[{name}]", "params": {"schedule": name},
            "stats": _stats(res["times"][name]), "extra_info": extra,
        })  # fmt: skip
    return {
        "machine_info": {**info, "machine": platform.machine(), "system": platform.system()},
        "commit_info": {},
        "benchmarks": benches,
        "result": res,
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": "bench_sampling (script mode)",
    }


def table(res: dict) -> str:
    rows = [
        "| schedule | device | layers (full) | tokens x batch | median step (s) | min (s) | speed-up (full / dual_end) | ideal (FLOPs) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in SCHEDULES:
        ts = res["times"][name]
        full_blocks = res["num_full_blocks"] if name == "dual_end" else res["layers"]
        if name == "dual_end":
            cpu = f", cpu time {res['ratio_cpu']:.3f}" if "ratio_cpu" in res else ""
            ratio, ideal = f"{res['ratio']:.3f} (of min {res['ratio_of_min']:.3f}{cpu})", f"{res['flops_ratio']:.3f}"
        else:
            ratio, ideal = "1", "1"
        rows.append(f"| {name} | {res['device']} | {res['layers']} ({full_blocks}) | {res['tokens']:,} x 2 | "
                    f"{statistics.median(ts):.3f} | {min(ts):.3f} | {ratio} | {ideal} |")  # fmt: skip
    return "\n".join(rows)


def _grid(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    try:
        g = tuple(int(p) for p in parts)
    except ValueError:
        g = ()
    if len(g) != 3 or min(g) < 1 or g[1] % 2 or g[2] % 2:
        raise argparse.ArgumentTypeError(f"must be TxHxW token-grid sizes >= 1 with even H and W (Skiparse groups 2 x 2), got {text!r}")
    return g


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--layers", type=int, default=None, help="DiT blocks (even, >= 8; default: 8 on cpu, 30 on cuda)")
    p.add_argument("--grid", type=_grid, default=None, help="token grid TxHxW after the patch (default: 2x16x28 on cpu, 21x30x52 on cuda)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="weights (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 3 on cpu, 5 on cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="results JSON (default: bench/results/sampling-<device>.json; - to skip)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    layers, grid, dtype, rounds = MODES[a.device]
    layers = layers if a.layers is None else a.layers
    grid = grid if a.grid is None else a.grid
    dtype = dtype if a.dtype is None else {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    rounds = rounds if a.rounds is None else a.rounds
    if layers < 8 or layers % 2:
        p.error(f"--layers must be even and >= 8 (dual_end needs 4 full blocks and sparse ones), got {layers}")
    if rounds < 1:
        p.error(f"--rounds must be >= 1, got {rounds}")
    out = a.out if a.out is not None else os.path.join(HERE, "results", f"sampling-{a.device}.json")
    device = torch.device(a.device)
    info = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_at_start": list(os.getloadavg()), "node": platform.node()}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    t0 = time.perf_counter()
    res = measure(device, layers, grid, dtype, rounds)
    info["loadavg_at_end"] = list(os.getloadavg())
    info["wall_s"] = time.perf_counter() - t0
    print()
    print(table(res))
    if out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(to_benchmark_json(res, info), f, indent=2)
        print(f"\nwrote {out} ({info['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
