"""LoRA on 2 gloo ranks: under sequence parallelism (SSP / Ulysses, plain and HiF8) the output and the summed
adapter gradients equal one process; under FSDP2 over the nn shells, with only the adapter trainable, the
adapter gradients equal one process on the same global batch."""

import pytest
import torch
from dist_harness import run_ranks

import ospfn.model as M

GRID = (2, 5, 6)  # token grid with Skiparse padding; 60 tokens over 2 ranks
TARGETS = ("self_attn.q", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v", "ffn.0", "ffn.2")


def _setup(quant=None, layers=None):
    from ospfn.lora import LoraAdapter, LoraConfig, init_lora

    over = dict(dim=32, num_heads=4, ffn_dim=64, text_dim=16, freq_dim=16, text_len=6, quant=quant, quant_attn=quant)
    if layers is not None:
        over.update(num_layers=layers, num_full_blocks=0)
    cfg = M.DiTConfig.preset("tiny", **over)
    g = torch.Generator().manual_seed(0)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in M.init_params(cfg).items()}
    ad = init_lora(cfg, LoraConfig(rank=4, alpha=8.0, targets=TARGETS), seed=1)
    w = {k: (0.2 * torch.randn(v.shape, generator=g) if k.endswith("lora_B") else v) for k, v in ad.weights.items()}
    w["blocks.0.cross_attn.k.lora_bias"] = 0.1 * torch.randn(cfg.dim, generator=g)  # text path: replicated on every rank
    w["blocks.1.self_attn.o.lora_bias"] = 0.1 * torch.randn(cfg.dim, generator=g)
    ad = LoraAdapter(ad.config, w)
    gi = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, GRID[0], 2 * GRID[1], 2 * GRID[2], generator=gi)
    ctx = torch.randn(2, 6, 16, generator=gi)
    t = torch.tensor([700.0, 300.0])
    go = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    return cfg, params, ad, (x, t, ctx), go


def _ranks_sp(rank, world, quants):
    from ospfn.parallel import ParallelConfig, init_parallel, sum_sp_grads

    results = []
    for quant in quants:
        cfg, params, ad, args, go = _setup(quant)
        ref = ad.clone().requires_grad_()
        ref_out = M.forward(params, cfg, *args, lora=ref)
        (ref_out * go).sum().backward()
        for U, S in [(1, 2), (2, 1)]:
            st = init_parallel(ParallelConfig(skiparse_sp=S, ulysses_sp=U))
            mine = ad.clone().requires_grad_()
            out = M.forward(params, cfg, *args, run=M.RunOptions(parallel=st), lora=mine)
            (out * go).sum().backward()
            sum_sp_grads(mine, st)  # the adapter is replicated: its gradients are partial per rank
            err_out = float((out.detach() - ref_out.detach()).abs().max())
            err_grad = max(float((mine.weights[k].grad - v.grad).abs().max() / v.grad.abs().max()) for k, v in ref.weights.items())
            results.append({"quant": quant, "U": U, "S": S, "err_out": err_out, "err_grad": err_grad})
    return results


def _ranks_all(rank, world):
    return {"sp": _ranks_sp(rank, world, [None, "hif8"]), "fsdp": _ranks_fsdp(rank, world)}


@pytest.fixture(scope="module")
def ranks():
    """Both checks in one pair of spawned processes (starting them is most of the time)."""
    return run_ranks(_ranks_all, 2)


def test_sp_output_and_summed_adapter_gradients_equal_one_process(ranks):
    for per_rank in ranks:
        assert len(per_rank["sp"]) == 4
        for r in per_rank["sp"]:
            assert r["err_out"] < 1e-5 and r["err_grad"] < 1e-4, r


def _ranks_fsdp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ospfn.nn import DiT

    cfg, params, ad, (x, t, ctx), go = _setup(layers=2)
    # one process on the whole batch of 2 (loss: mean over the samples)
    ref = ad.clone().requires_grad_()
    (M.forward(params, cfg, x, t, ctx, lora=ref) * go).sum().div(2).backward()
    # FSDP2 over the module shells: one sample per rank, gradients averaged over the 2 ranks
    net = DiT(cfg, {k: v.clone() for k, v in params.items()}, lora=ad.clone()).freeze_base()
    mesh = init_device_mesh("cpu", (world,))
    for block in net.blocks_list:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    mine = slice(rank, rank + 1)
    (net(x[mine], t[mine], ctx[mine]) * go[mine]).sum().backward()
    grads = {n: p.grad.full_tensor() for n, p in net.named_lora_parameters()}
    frozen_grads = [n for n, p in net.named_parameters() if p.grad is not None and n not in grads]
    sharded = all(hasattr(p, "full_tensor") for p in net.lora_parameters())
    errs = {k: float((grads[k] - v.grad).abs().max() / v.grad.abs().max()) for k, v in ref.weights.items()}
    return {"errs": errs, "frozen_grads": frozen_grads, "sharded": sharded, "names": sorted(grads) == sorted(ref.weights)}


def test_fsdp2_adapter_gradients_equal_one_process(ranks):
    for r in (per_rank["fsdp"] for per_rank in ranks):
        assert r["names"] and r["sharded"] and r["frozen_grads"] == [], r
        assert max(r["errs"].values()) < 1e-4, r["errs"]
