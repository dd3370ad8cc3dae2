"""Sequence parallelism on gloo with 2 and 4 spawned ranks: SSP layout moves, model parity for every valid
(U, S), communication accounting, bad setups."""

import pytest
import torch
from dist_harness import run_ranks

import ospfn.model as M

GRID = (2, 5, 6)  # token grid with Skiparse padding (H, W -> 8); 60 tokens split over 2 or 4 ranks


# --------------------------------------------------------------------------------------- rank functions


def _hash_tensor(B, L_tot, C, G_tot):
    """Folded tensor whose every value encodes (slot, batch, position, channel) exactly."""
    g = torch.arange(G_tot * B).view(-1, 1, 1)
    s = torch.arange(L_tot).view(1, -1, 1)
    c = torch.arange(C).view(1, 1, -1)
    return (g * 1_000_000 + s * 100 + c).double()


def _ranks_relayout(rank, world, S, U):
    from ospfn.parallel import ParallelConfig, init_parallel, local_rows_of, relayout
    from ospfn.ops import skiparse_fold, skiparse_layout, skiparse_switch, skiparse_unfold

    st = init_parallel(ParallelConfig(skiparse_sp=S, ulysses_sp=U))
    P, B, C = 2, 2, 3
    lay = skiparse_layout(GRID, P)
    G = P * P // S

    def shard(folded):  # this rank's part of a global folded tensor [P^2 B, L, C]
        v = folded.view(P * P, B, lay.seq, C)
        part = local_rows_of(v.permute(0, 2, 1, 3), GRID, P, "token", st)  # [G, L/U, B, C]
        return part.permute(0, 2, 1, 3).reshape(G * B, -1, C)

    out = {}
    y_tok = _hash_tensor(B, lay.seq, C, P * P)
    y_grp = skiparse_switch(y_tok, GRID, P)
    # token -> group and back: equals "switch on the full tensor, then this rank's shard"
    got = relayout(shard(y_tok), GRID, P, "token", "group", st, batch=B)
    out["switch_fwd"] = torch.equal(got, shard(y_grp))
    out["switch_back"] = torch.equal(relayout(shard(y_grp), GRID, P, "group", "token", st, batch=B), shard(y_tok))
    # backward of the switch is the reverse move
    x = shard(y_tok).clone().requires_grad_()
    gz = _hash_tensor(B, lay.seq, C, P * P) + 0.5
    relayout(x, GRID, P, "token", "group", st, batch=B).backward(shard(gz))
    out["switch_grad"] = torch.equal(x.grad, shard(skiparse_switch(gz, GRID, P)))
    # entering and leaving the sparse region from the raster chunk layout
    xs = torch.arange(B * lay.n * C, dtype=torch.float64).view(B, lay.n, C)
    n = lay.n // (S * U)
    mine = xs[:, st.sp_rank * n : (st.sp_rank + 1) * n]
    entered = relayout(mine, GRID, P, "full", "token", st, batch=B)
    out["enter"] = torch.equal(entered, shard(skiparse_fold(xs, GRID, P, "token")))
    left = relayout(shard(skiparse_fold(xs, GRID, P, "group")), GRID, P, "group", "full", st, batch=B)
    out["leave"] = torch.equal(left, mine)
    out["unfold_ok"] = torch.equal(skiparse_unfold(skiparse_fold(xs, GRID, P, "group"), GRID, P, "group"), xs)
    return out


def _tiny(heads=4, dim=32):
    cfg = M.DiTConfig.preset("tiny", dim=dim, num_heads=heads, ffn_dim=64, text_dim=16, freq_dim=16, text_len=6)
    g = torch.Generator().manual_seed(0)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in M.init_params(cfg).items()}
    gi = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, GRID[0], 2 * GRID[1], 2 * GRID[2], generator=gi)
    ctx = torch.randn(2, 6, 16, generator=gi)
    t = torch.tensor([700.0, 300.0])
    return cfg, params, x, t, ctx


def _reference(cfg, params, x, t, ctx):
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    out = M.forward(p, cfg, x, t, ctx)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * go).sum().backward()
    return out.detach(), {k: v.grad for k, v in p.items()}, go


def _ranks_model(rank, world, combos, heads, quant):
    from ospfn.parallel import ParallelConfig, comm_stats, init_parallel, sum_sp_grads

    cfg, params, x, t, ctx = _tiny(heads=heads, dim=8 * heads)
    if quant:
        cfg = cfg.replace(quant="hif8", quant_attn="hif8")
    ref_out, ref_grads, go = _reference(cfg, params, x, t, ctx)
    results = []
    for U, S in combos:
        st = init_parallel(ParallelConfig(skiparse_sp=S, ulysses_sp=U))
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        with comm_stats() as cs:
            out = M.forward(p, cfg, x, t, ctx, run=M.RunOptions(parallel=st))
        (out * go).sum().backward()
        sum_sp_grads(p.values(), st)
        err_out = float((out.detach() - ref_out).abs().max())
        err_grad = max(float((p[k].grad - ref_grads[k]).abs().max() / (ref_grads[k].abs().max() + 1e-12)) for k in p)
        results.append({"U": U, "S": S, "err_out": err_out, "err_grad": err_grad, "comm": cs.summary(), "records": dict(cs.records)})
    return results


def _ranks_bad(rank, world, case):
    from ospfn.parallel import ParallelConfig, init_parallel

    if case == "world":
        init_parallel(ParallelConfig(skiparse_sp=2, ulysses_sp=1))
    elif case == "skiparse_sp":
        cfg, params, x, t, ctx = _tiny()
        st = init_parallel(ParallelConfig(skiparse_sp=3, ulysses_sp=1))
        M.forward(params, cfg, x, t, ctx, run=M.RunOptions(parallel=st))
    elif case == "grid":
        cfg, params, x, t, ctx = _tiny()
        st = init_parallel(ParallelConfig(skiparse_sp=1, ulysses_sp=world))
        M.forward(params, cfg, x[..., :2, :2], t, ctx, run=M.RunOptions(parallel=st))  # 2 x 1 x 1 = 2 tokens on 4 ranks
    return None


# --------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("S,U,world", [(2, 1, 2), (4, 1, 4), (2, 2, 4), (1, 2, 2)])
def test_relayout_equals_global_switch_then_shard(S, U, world):
    for r in run_ranks(_ranks_relayout, world, S, U):
        assert r == {k: True for k in r}, r


VALID = [(1, 2), (2, 1), (1, 4), (2, 2), (4, 1)]  # (U, S) beyond (1, 1), up to 4 ranks


def test_model_parity_for_every_valid_combination():
    """dual_end tiny model on a padded grid: forward and summed parameter gradients equal one process."""
    results = run_ranks(_ranks_model, 4, VALID, 4, False)
    for per_rank in results:
        for r in per_rank:
            assert r["err_out"] < 1e-5, r
            assert r["err_grad"] < 1e-4, r


def test_heads_not_dividing_ulysses_are_padded():
    results = run_ranks(_ranks_model, 4, [(4, 1), (2, 2)], 3, False)  # 3 heads on U = 4 and on S*U = 4 full blocks
    for r in results[0] + results[3]:
        assert r["err_out"] < 1e-5 and r["err_grad"] < 1e-4, r


def test_hif8_model_under_sp_quantises_like_one_process():
    results = run_ranks(_ranks_model, 2, [(1, 2), (2, 1)], 4, True)
    layers = _tiny()[0].num_layers
    for r in results[0] + results[1]:
        assert r["err_out"] < 1e-5 and r["err_grad"] < 1e-4, r
        # the amax all-reduces are accounted collectives: per block 10 Linears (q k v o, cross q k v o, ffn 0 2)
        # and the q, k, v of attention quantisation, one fp32 scalar each, in the forward
        assert r["comm"]["amax"] == {"calls": 13 * layers, "bytes": 4 * 13 * layers, "bytes_to_others": 4 * 13 * layers}, r["comm"]


def test_accounting_ssp_is_a_quarter_of_ulysses_per_sparse_block():
    """Per inner sparse block (after the first): SSP one all-to-all of N*C/S elements per rank; Ulysses four of
    N*C/U; with S = U the measured ratio is exactly 1/4 in calls and bytes."""
    ssp, uly = run_ranks(_ranks_model, 2, [(1, 2), (2, 1)], 4, False)[0]
    cfg = _tiny()[0]
    sched = M.block_schedule(cfg)
    sparse = [i for i, k in enumerate(sched) if k != "full"]
    inner = {f"block{i}:{sched[i]}" for i in sparse[1:]}

    def fwd(rec, kind):
        calls = sum(v["calls"] for (k, t), v in rec.items() if k == kind and t in inner)
        nbytes = sum(v["bytes"] for (k, t), v in rec.items() if k == kind and t in inner)
        return calls, nbytes

    ssp_calls, ssp_bytes = fwd(ssp["records"], "ssp_switch")
    uly_calls, uly_bytes = fwd(uly["records"], "ulysses")
    assert fwd(ssp["records"], "ulysses") == (0, 0)  # no Ulysses inside sparse blocks under pure SSP
    assert fwd(uly["records"], "ssp_switch") == (0, 0)  # the switch is local when only sequences are split
    assert ssp_calls == len(inner) and uly_calls == 4 * len(inner)
    from ospfn.ops import skiparse_layout

    n_pad = skiparse_layout(GRID, 2).n_pad
    assert ssp_bytes == len(inner) * 2 * n_pad * cfg.dim * 4 // 2  # B = 2 samples, fp32, S = 2
    assert ssp_calls / uly_calls == 0.25 and ssp_bytes / uly_bytes == 0.25


@pytest.mark.parametrize(
    "world,case,message",
    [
        (3, "world", r"world size 3 is not a multiple of skiparse_sp \* ulysses_sp = 2 \* 1 = 2"),
        (3, "skiparse_sp", r"skiparse_sp = 3 must divide sparse_ratio\^2 = 4"),
        (4, "grid", r"\(2 tokens\) cannot be split into skiparse_sp \* ulysses_sp = 4 equal sequence shards"),
    ],
)
def test_bad_setups_fail_on_every_rank_without_hanging(world, case, message):
    import re

    with pytest.raises(RuntimeError) as e:
        run_ranks(_ranks_bad, world, case, timeout=120)
    text = str(e.value)
    sections = re.split(r"^rank (\d+): ", text, flags=re.M)[1:]  # [rank, body, rank, body, ...]
    bodies = dict(zip(map(int, sections[::2]), sections[1::2]))
    assert sorted(bodies) == list(range(world)), text
    for r, body in bodies.items():
        assert re.match(r"ValueError: .*" + message, body), (r, body[:300])
