"""Sequence parallelism on CPU / gloo: SSP vs Ulysses-only on the same Skiparse model, 2 and 4 processes.

One training step (forward + backward) of a dual_end model (dim 128, 8 layers, 4 full blocks, grid 4x16x16 =
1024 tokens, batch 1) on W processes: ``ssp`` = (U, S) = (1, W), ``ulysses`` = (W, 1).  ``extra_info``:
wall time per step (the fastest of 3 alternating runs of each setup), bytes and calls of ospfn's collectives
per step (this rank's view, sparse blocks and all blocks), and the SSP / Ulysses ratios measured in the same
run.  Absolute times hold for this machine only (W processes share its cores).

    python -m pytest bench/bench_dist.py --benchmark-json=bench/results/dist-cpu.json
"""

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dist_harness import run_ranks  # noqa: E402

GRID = (4, 16, 16)
STEPS = 3
ROUNDS = 3


def _step_ranks(rank, world, U, S):
    import ospfn.model as M
    from ospfn.parallel import ParallelConfig, comm_stats, init_parallel

    st = init_parallel(ParallelConfig(skiparse_sp=S, ulysses_sp=U))
    cfg = M.DiTConfig.preset("tiny", dim=128, num_heads=4, ffn_dim=256, num_layers=8, num_full_blocks=4, text_dim=32, freq_dim=32)
    params = {k: v.requires_grad_() for k, v in M.init_params(cfg).items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, GRID[0], 2 * GRID[1], 2 * GRID[2], generator=g)
    ctx = torch.randn(1, 16, 32, generator=g)
    t = torch.tensor([500.0])
    sched = M.block_schedule(cfg)
    sparse = {f"block{i}:{k}" for i, k in enumerate(sched) if k != "full"}
    M.forward(params, cfg, x, t, ctx, run=M.RunOptions(parallel=st)).sum().backward()  # warm-up
    torch.distributed.barrier()
    t0 = time.perf_counter()
    with comm_stats() as cs:
        for _ in range(STEPS):
            M.forward(params, cfg, x, t, ctx, run=M.RunOptions(parallel=st)).sum().backward()
    torch.distributed.barrier()
    dt = (time.perf_counter() - t0) / STEPS
    return {
        "step_s": dt,
        "bytes": cs.bytes() / STEPS,
        "calls": cs.calls() / STEPS,
        "sparse_bytes": cs.bytes(tags=sparse) / STEPS,
        "sparse_calls": cs.calls(tags=sparse) / STEPS,
    }


@pytest.mark.parametrize("world", [2, 4])
def test_ssp_vs_ulysses(benchmark, world):
    res = {}

    def run():  # alternate the two setups; keep each one's fastest run (the 2 cores are shared by all ranks)
        for _ in range(ROUNDS):
            for name, (U, S) in (("ssp", (1, world)), ("ulysses", (world, 1))):
                r = run_ranks(_step_ranks, world, U, S, timeout=600)[0]
                if name not in res or r["step_s"] < res[name]["step_s"]:
                    res[name] = r

    benchmark.group = f"SSP vs Ulysses, {world} gloo ranks"
    benchmark.pedantic(run, rounds=1, iterations=1)
    s, u = res["ssp"], res["ulysses"]
    from conftest import cpu_name  # bench/conftest.py: not at module level, the spawned ranks import this module

    benchmark.extra_info.update(
        device=f"{cpu_name()}, {world} gloo processes", world=world,
        ssp_step_s=s["step_s"], ulysses_step_s=u["step_s"], time_ratio=s["step_s"] / u["step_s"],
        ssp_sparse_calls=s["sparse_calls"], ulysses_sparse_calls=u["sparse_calls"],
        sparse_calls_ratio=s["sparse_calls"] / u["sparse_calls"],
        sparse_bytes_ratio=s["sparse_bytes"] / u["sparse_bytes"],
        total_bytes_ratio=s["bytes"] / u["bytes"],
    )  # fmt: skip
