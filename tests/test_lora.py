"""LoRA adapters (ospfn.lora) and ``forward(..., lora=)``: against weights merged by the test's own arithmetic,
several weighted adapters, B = 0 and weight 0 as the base model, merge / unmerge, HiF8 (quantised base, exact
low-rank path), gradients to the adapter only, torch.compile, the nn shells, bad inputs."""

import math

import pytest
import torch
import torch._dynamo

import ospfn.model as M
import ospfn.model.dit as dit
from ospfn.lora import DEFAULT_TARGETS, LoraAdapter, LoraConfig, init_lora, lora_targets, merge_lora, unmerge_lora
from ospfn.nn import DiT

ALL = DEFAULT_TARGETS + ("ffn.0", "ffn.2")
MODES = {
    "full": dict(skiparse_model_type="full", num_layers=2),
    "dual_end": dict(num_layers=2, num_full_blocks=0),  # token, group (Skiparse pads the grid)
    "dual_end_8": {},  # full, full, token, group, token, group, full, full
    "flashi2v": dict(num_layers=2, num_full_blocks=0, i2v="flashi2v"),
}


def _model(mode="dual_end", seed=0, **extra):
    cfg = M.DiTConfig.preset("tiny", **{**MODES[mode], **extra})
    g = torch.Generator().manual_seed(seed)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in M.init_params(cfg).items()}
    gi = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, cfg.in_dim, 2, 10, 14, generator=gi)  # token grid 2 x 5 x 7
    t = torch.tensor([937.0, 241.5])
    ctx = torch.randn(2, 6, cfg.text_dim, generator=gi)
    kw = {}
    if cfg.i2v == "flashi2v":
        kw = dict(image=M.ImageCond(latent=torch.randn(2, cfg.in_dim, 1, 10, 14, generator=gi), fourier_ratio=0.3))
    return cfg, params, (x, t, ctx), kw


def _trained(cfg, rank=4, alpha=6.0, targets=ALL, seed=3, bias_on=("blocks.0.self_attn.o", "blocks.1.ffn.2")):
    """An adapter with non-zero B (as after training) and a bias delta on a few modules."""
    ad = init_lora(cfg, LoraConfig(rank=rank, alpha=alpha, targets=targets), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    w = dict(ad.weights)
    for k, v in ad.weights.items():
        if k.endswith(".lora_B"):
            w[k] = 0.2 * torch.randn(v.shape, generator=g)
            if k[: -len(".lora_B")] in bias_on:
                w[k[: -len(".lora_B")] + ".lora_bias"] = 0.1 * torch.randn(v.shape[0], generator=g)
    return LoraAdapter(ad.config, w)


def _merged_by_hand(params, pairs):
    """W + sum_j w_j * (alpha_j / r_j) * B_j @ A_j and b + sum_j w_j * bias_j, in float64, to fp32 (the test's own
    arithmetic, from the adapters' raw tensors)."""
    out = dict(params)
    for ad, w in pairs:
        s = ad.config.alpha / ad.config.rank
        for key, a in ad.weights.items():
            if not key.endswith(".lora_A"):
                continue
            mod = key[: -len(".lora_A")]
            b = ad.weights[mod + ".lora_B"]
            out[mod + ".weight"] = (out[mod + ".weight"].double() + w * s * b.double() @ a.double()).float()
            if mod + ".lora_bias" in ad.weights:
                out[mod + ".bias"] = (out[mod + ".bias"].double() + w * ad.weights[mod + ".lora_bias"].double()).float()
    return out


def _close(a, b, tol=2e-5):
    err = float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())
    assert err < tol, err


# ------------------------------------------------------------------------------------------------ the data


def test_config_and_init():
    cfg = M.DiTConfig.preset("tiny")
    lc = LoraConfig()
    assert (lc.rank, lc.alpha, lc.scale, lc.init) == (32, 64.0, 2.0, "gaussian")
    assert lc.targets == tuple(f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo")
    assert LoraConfig(targets=["ffn.0"]).targets == ("ffn.0",)
    tg = lora_targets(cfg, LoraConfig(rank=2, targets=("cross_attn.k", "ffn.2")))
    assert tg[:2] == [("blocks.0.cross_attn.k", 64, 64), ("blocks.0.ffn.2", 128, 64)] and len(tg) == 2 * cfg.num_layers
    r = 8
    gauss = init_lora(cfg, LoraConfig(rank=r, targets=ALL), seed=5)
    assert len(gauss.modules()) == 10 * cfg.num_layers and len(gauss.weights) == 20 * cfg.num_layers
    As = torch.cat([v.flatten() for k, v in gauss.weights.items() if k.endswith("lora_A")])
    assert abs(float(As.std()) - 1 / r) < 0.01 * (1 / r) * 10 and abs(float(As.mean())) < 0.01  # PEFT: std = 1 / r
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in gauss.weights.items() if k.endswith("lora_B"))
    assert gauss.weights["blocks.0.ffn.2.lora_A"].shape == (r, 128) and gauss.weights["blocks.0.ffn.2.lora_B"].shape == (64, r)
    kai = init_lora(cfg, LoraConfig(rank=r, init="kaiming", targets=("ffn.2",)), seed=5)
    a = kai.weights["blocks.0.ffn.2.lora_A"]  # kaiming-uniform(a = sqrt 5): U(-1/sqrt(in), 1/sqrt(in)), in = 128
    assert float(a.abs().max()) <= 1 / math.sqrt(128) and float(a.abs().max()) > 0.9 / math.sqrt(128)
    assert abs(float(a.var()) - 1 / (3 * 128)) < 0.2 / (3 * 128)
    zeros = init_lora(cfg, LoraConfig(rank=2, init="zeros"))
    assert all(float(v.abs().max()) == 0 for v in zeros.parameters())
    # deterministic per seed, different across seeds, same values in another dtype
    again = init_lora(cfg, LoraConfig(rank=r, targets=ALL), seed=5)
    assert all(torch.equal(gauss.weights[k], again.weights[k]) for k in gauss.weights)
    other = init_lora(cfg, LoraConfig(rank=r, targets=ALL), seed=6)
    assert not torch.equal(gauss.weights["blocks.0.self_attn.q.lora_A"], other.weights["blocks.0.self_attn.q.lora_A"])
    half = init_lora(cfg, LoraConfig(rank=r, targets=ALL), seed=5, dtype=torch.bfloat16)
    assert half.weights["blocks.3.ffn.0.lora_A"].dtype == torch.bfloat16
    assert torch.equal(half.weights["blocks.3.ffn.0.lora_A"], gauss.weights["blocks.3.ffn.0.lora_A"].bfloat16())
    # helpers
    assert gauss.scale == 64.0 / r and gauss.numel() == sum(v.numel() for v in gauss.weights.values())
    assert gauss.state_dict() == gauss.weights and gauss.state_dict() is not gauss.weights
    assert [k for k, _ in gauss.named_parameters()][:3] == ["blocks.0.self_attn.q.lora_A", "blocks.0.self_attn.q.lora_B", "blocks.0.self_attn.k.lora_A"]
    cl = gauss.clone().requires_grad_()
    assert all(p.requires_grad for p in cl.parameters()) and not any(p.requires_grad for p in gauss.parameters())
    assert cl.weights["blocks.0.ffn.0.lora_A"].data_ptr() != gauss.weights["blocks.0.ffn.0.lora_A"].data_ptr()
    assert gauss.to(dtype=torch.float64).weights["blocks.0.ffn.0.lora_A"].dtype == torch.float64
    assert "LoraAdapter(rank=8, alpha=64.0, modules=80" in repr(gauss)


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("mode", ["full", "dual_end_8", "flashi2v"])
def test_forward_with_adapter_equals_forward_on_merged_weights(mode):
    """forward(lora=adapter) == forward on W + scale * B @ A merged by the test (fp32), and == forward on
    merge_lora's weights; for the dense, the Skiparse (padded grid) and the FlashI2V models."""
    cfg, params, args, kw = _model(mode)
    ad = _trained(cfg)
    base = M.forward(params, cfg, *args, **kw)
    got = M.forward(params, cfg, *args, **kw, lora=ad)
    want = M.forward(_merged_by_hand(params, [(ad, 1.0)]), cfg, *args, **kw)
    assert float((got - base).abs().max()) > 1e-2 * float(base.abs().max())  # the adapter really changes the output
    _close(got, want)
    _close(M.forward(merge_lora(params, ad), cfg, *args, **kw), got)


def test_zero_B_weight_zero_and_none_are_the_base_model():
    cfg, params, args, _ = _model("dual_end")
    base = M.forward(params, cfg, *args)
    for init in ("gaussian", "kaiming"):
        ad = init_lora(cfg, LoraConfig(rank=4, alpha=8.0, targets=ALL, init=init), seed=1)
        assert torch.equal(M.forward(params, cfg, *args, lora=ad), base)  # B = 0: exactly the base output
    trained = _trained(cfg)
    for off in (None, [], (trained, 0.0), [(trained, 0)], [(trained, 0.0), (trained, 0.0)]):
        assert torch.equal(M.forward(params, cfg, *args, lora=off), base)
    # weight 0 runs no low-rank op at all (nothing is added to the blocks' dicts)
    seen = []
    real = dit.dit_block

    def spy(x, p, bc, lay):
        seen.append(sorted(k for k in p if k.endswith(".lora")))
        return real(x, p, bc, lay)

    dit.dit_block = spy
    try:
        M.forward(params, cfg, *args, lora=(trained, 0.0))
        M.forward(params, cfg, *args, lora=trained)
    finally:
        dit.dit_block = real
    L = cfg.num_layers
    assert seen[:L] == [[]] * L and seen[L] == sorted(n + ".lora" for n in ALL)


def test_several_adapters_with_weights_add_up():
    cfg, params, args, _ = _model("dual_end")
    a1 = _trained(cfg, rank=4, alpha=6.0, seed=3)
    a2 = _trained(cfg, rank=2, alpha=1.0, targets=("self_attn.q", "ffn.0"), seed=4, bias_on=("blocks.2.ffn.0",))
    a3 = _trained(cfg, rank=3, alpha=3.0, targets=("cross_attn.v",), seed=5, bias_on=())
    spec = [(a1, 0.7), (a2, -1.3), a3]
    got = M.forward(params, cfg, *args, lora=spec)
    _close(got, M.forward(_merged_by_hand(params, [(a1, 0.7), (a2, -1.3), (a3, 1.0)]), cfg, *args))
    _close(M.forward(merge_lora(params, spec), cfg, *args), got)
    # one weighted pair, and the same adapter twice, are what the weights say
    _close(M.forward(params, cfg, *args, lora=(a1, 0.5)), M.forward(_merged_by_hand(params, [(a1, 0.5)]), cfg, *args))
    _close(M.forward(params, cfg, *args, lora=[a1, a1]), M.forward(params, cfg, *args, lora=(a1, 2.0)))


def test_merge_and_unmerge():
    cfg, params, _, _ = _model("full")
    a1, a2 = _trained(cfg, seed=3), _trained(cfg, rank=2, alpha=1.0, targets=("ffn.0",), seed=4, bias_on=("blocks.1.ffn.0",))
    before = {k: v.clone() for k, v in params.items()}
    merged = merge_lora(params, [(a1, 0.5), a2], weight=2.0)
    assert all(torch.equal(params[k], before[k]) for k in params)  # the input is not modified
    hand = _merged_by_hand(params, [(a1, 1.0), (a2, 2.0)])
    for k in params:
        assert torch.allclose(merged[k], hand[k], rtol=0, atol=1e-6), k
    touched = {k for k in params if not torch.equal(merged[k], params[k])}
    assert touched == {m + ".weight" for m in a1.modules()} | {"blocks.0.self_attn.o.bias", "blocks.1.ffn.2.bias", "blocks.1.ffn.0.bias"}
    assert merged["blocks.0.norm3.weight"] is params["blocks.0.norm3.weight"]  # untouched entries are shared
    back = unmerge_lora(merged, [(a1, 0.5), a2], weight=2.0)
    for k in params:  # the inverse, up to fp32 rounding of the two casts
        assert torch.allclose(back[k], params[k], rtol=0, atol=4 * torch.finfo(torch.float32).eps * float(merged[k].abs().max())), k
    # dtype kept: bf16 weights are merged in fp32 and rounded once
    p16 = {k: v.bfloat16() for k, v in params.items()}
    m16 = merge_lora(p16, a1)
    k = "blocks.1.self_attn.v.weight"
    hand16 = _merged_by_hand({n: v.float() for n, v in p16.items()}, [(a1, 1.0)])[k]
    assert m16[k].dtype == torch.bfloat16 and p16[k].dtype == torch.bfloat16
    assert float((m16[k].float() - hand16).abs().max()) <= 2**-8 * float(hand16.abs().max())  # one bf16 rounding


def test_hif8_base_is_quantised_and_the_low_rank_path_is_not(monkeypatch):
    """Under cfg.quant='hif8' every adapted Linear returns hif8_linear(x, W, b) of the base weight plus the low-rank
    delta in full precision (the test's float64 delta, fp32 tolerance: a quantised delta would be off by ~1e-1),
    checked call by call; end to end the output equals the HiF8 base forward with that delta added per Linear."""
    cfg, params, args, _ = _model("dual_end", quant="hif8")
    ad = _trained(cfg)
    where = {v.data_ptr(): k for k, v in params.items()}
    real_linear, real_hif8 = dit._linear, dit.hif8_linear
    base_ws, checked = [], []

    def ref_delta(x, key_of_weight, rows):
        mod = key_of_weight[: -len(".weight")]
        a, b = ad.weights[mod + ".lora_A"].double(), ad.weights[mod + ".lora_B"].double()
        d = ad.scale * (x.double() @ a.T) @ b.T
        if mod + ".lora_bias" in ad.weights:
            d = d + ad.weights[mod + ".lora_bias"].double()
        return d

    def spy_hif8(x, w, b=None, **kw):
        base_ws.append(where.get(w.data_ptr()))
        return real_hif8(x, w, b, **kw)

    def spy_linear(x, p, name, bc=None, rows=None):
        y = real_linear(x, p, name, bc, rows)
        key = where.get(p[name + ".weight"].data_ptr())
        if name + ".lora" in p:
            plain = {k: v for k, v in p.items() if not k.endswith(".lora")}
            base = real_linear(x, plain, name, bc, rows)
            keep = slice(None) if rows is None else rows
            want = base.double()[keep] + ref_delta(x, key, rows)[keep]
            err = float((y.double()[keep] - want).abs().max() / want.abs().max())
            assert err < 1e-6, (key, err)
            checked.append(key)
        return y

    monkeypatch.setattr(dit, "hif8_linear", spy_hif8)
    monkeypatch.setattr(dit, "_linear", spy_linear)
    got = M.forward(params, cfg, *args, lora=ad)
    monkeypatch.undo()
    want_keys = sorted(f"blocks.{i}.{n}.weight" for i in range(cfg.num_layers) for n in ALL)
    assert sorted(checked) == want_keys
    assert None not in base_ws and sorted(set(base_ws)) == want_keys  # hif8_linear gets the base W (not a merged one)

    def ref_linear(x, p, name, bc=None, rows=None):  # the HiF8 base Linear plus the test's delta (fp32)
        y = real_linear(x, p, name, bc, rows)
        key = where.get(p[name + ".weight"].data_ptr())
        if key is None or not key.startswith("blocks."):
            return y
        return y + ref_delta(x if rows is None else x * rows[..., None], key, rows).float()

    monkeypatch.setattr(dit, "_linear", ref_linear)
    want = M.forward(params, cfg, *args)
    monkeypatch.undo()
    _close(got, want, 1e-4)  # HiF8 roundings downstream may flip on an ulp (see test_model's HiF8 test)
    base = M.forward(params, cfg, *args)
    assert float((got - base).abs().max()) > 1e-2 * float(base.abs().max())


def test_low_rank_path_runs_in_high_precision_for_bf16_activations():
    """bf16 activations and weights, fp32 adapter: the delta is computed in fp32 and rounded once when added."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g).bfloat16()
    W, b = torch.randn(32, 64, generator=g).bfloat16(), torch.randn(32, generator=g).bfloat16()
    A, B = torch.randn(4, 64, generator=g), torch.randn(32, 4, generator=g)
    y = dit._linear(x, {"q.weight": W, "q.bias": b, "q.lora": ((A, B, None, 0.75, 1.0),)}, "q")
    want = torch.nn.functional.linear(x, W, b) + (0.75 * (x.double() @ A.double().T) @ B.double().T).bfloat16()
    assert y.dtype == torch.bfloat16
    assert float((y.float() - want.float()).abs().max()) <= float(want.float().abs().max()) * 2**-7  # one bf16 rounding apart


def test_gradients_reach_only_the_adapter():
    """Frozen params (requires_grad False) get no gradient; with B = 0, dL/dA = 0 and dL/dB != 0; with B != 0 both
    are non-zero and equal the chain rule through the merged weight: dB = s dW A^T, dA = s B^T dW (dW from the
    test's merged-weight forward)."""
    cfg, params, args, _ = _model("dual_end")
    go = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(9))
    ad = init_lora(cfg, LoraConfig(rank=4, alpha=6.0, targets=ALL), seed=1).requires_grad_()
    (M.forward(params, cfg, *args, lora=ad) * go).sum().backward()
    assert all(v.grad is None for v in params.values())
    for k, v in ad.weights.items():
        if k.endswith("lora_A"):
            assert v.grad is not None and float(v.grad.abs().max()) == 0.0, k
        else:
            assert float(v.grad.abs().max()) > 0, k
    ad = _trained(cfg).requires_grad_()
    (M.forward(params, cfg, *args, lora=ad) * go).sum().backward()
    merged = {k: v.clone().requires_grad_() for k, v in _merged_by_hand(params, [(ad.detach(), 1.0)]).items()}
    (M.forward(merged, cfg, *args) * go).sum().backward()
    s = ad.scale
    for mod in ad.modules():
        dW = merged[mod + ".weight"].grad.double()
        A, B = ad.weights[mod + ".lora_A"], ad.weights[mod + ".lora_B"]
        _close(B.grad, s * dW @ A.detach().double().T, 1e-4)
        _close(A.grad, s * B.detach().double().T @ dW, 1e-4)
        if mod + ".lora_bias" in ad.weights:
            _close(ad.weights[mod + ".lora_bias"].grad, merged[mod + ".bias"].grad, 1e-4)
    assert all(v.grad is None for v in params.values())
    # gradient checkpointing recomputes the blocks with the same adapter terms
    ck = ad.detach().clone().requires_grad_()
    (M.forward(params, cfg, *args, lora=ck, run=M.RunOptions(grad_checkpoint=True)) * go).sum().backward()
    for k, v in ad.weights.items():
        torch.testing.assert_close(ck.weights[k].grad, v.grad, rtol=1e-6, atol=0, msg=k)


def test_compiles_to_one_graph_with_an_adapter():
    """torch.compile(fullgraph=True) over forward with a LoRA adapter: no graph break; compiled == eager, forward and
    the adapter's gradients (dynamo's aot_eager backend: the traced graphs run by eager kernels)."""
    torch._dynamo.reset()
    try:
        cfg, params, args, _ = _model("full", num_layers=1)  # one block: the LoRA code is the same in every layout
        ad = _trained(cfg, targets=("self_attn.q", "cross_attn.k", "ffn.2"), bias_on=("blocks.0.ffn.2",)).requires_grad_()

        def loss(ad):
            return M.forward(params, cfg, *args, lora=[(ad, 0.5), ad]).square().mean()

        eager = loss(ad)
        eager.backward()
        g0 = {k: v.grad.clone() for k, v in ad.weights.items()}
        for v in ad.parameters():
            v.grad = None
        comp = torch.compile(loss, backend="aot_eager", fullgraph=True)(ad)
        comp.backward()
        assert torch.equal(comp, eager)
        for k, v in ad.weights.items():
            torch.testing.assert_close(v.grad, g0[k], rtol=0, atol=0, msg=k)
        # the module shells' per-block compilation (training's compile_blocks) with an attached adapter
        net = DiT(cfg, params, lora=ad.detach())
        with torch.no_grad():
            want = [net(*args), net(*args, lora_weight=0.0)]
            for block in net.blocks_list:
                block.compile(backend="aot_eager", fullgraph=True)
            assert torch.equal(net(*args), want[0]) and torch.equal(net(*args, lora_weight=0.0), want[1])
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ the nn shells


def test_module_shell_carries_the_adapter():
    cfg, params, args, kw = _model("flashi2v")
    ad = _trained(cfg)
    net = DiT(cfg, params, lora=ad.clone())
    names = dict(net.named_parameters())
    assert set(names) == set(M.param_shapes(cfg)) | set(ad.weights)  # the adapter's own keys
    assert set(net.params()) == set(M.param_shapes(cfg))
    assert sorted(n for n, _ in net.named_lora_parameters()) == sorted(ad.weights)
    want = M.forward(params, cfg, *args, **kw, lora=ad)
    assert torch.equal(net(*args, **kw), want)
    assert torch.equal(net(*args, **kw, lora_weight=0.0), M.forward(params, cfg, *args, **kw))
    _close(net(*args, **kw, lora_weight=-0.5), M.forward(params, cfg, *args, **kw, lora=(ad, -0.5)))
    # only the adapter trains; its gradients equal the functional ones
    net.freeze_base()
    assert [n for n, p in net.named_parameters() if p.requires_grad] == [n for n, _ in net.named_lora_parameters()]
    go = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(4))
    (net(*args, **kw) * go).sum().backward()
    ref = ad.clone().requires_grad_()
    (M.forward(params, cfg, *args, **kw, lora=ref) * go).sum().backward()
    back = net.lora_adapter()
    assert isinstance(back, LoraAdapter) and back.config == ad.config
    for k, v in ref.weights.items():
        torch.testing.assert_close(back.weights[k].grad, v.grad, rtol=1e-5, atol=1e-7, msg=k)
    assert all(p.grad is None for p in net.params().values())
    assert DiT(cfg, params).lora_adapter() is None and DiT(cfg, params).lora_parameters() == []


# ------------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_raise_clearly():
    cfg, params, args, _ = _model("full")
    ad = _trained(cfg)
    w = ad.weights

    def with_(**changes):
        d = dict(w)
        for k, v in changes.items():
            if v is None:
                d.pop(k)
            else:
                d[k] = v
        return d

    F = lambda lora: M.forward(params, cfg, *args, lora=lora)  # noqa: E731
    with pytest.raises(TypeError, match=r"forward: lora must be None, a LoraAdapter, a \(LoraAdapter, weight\) pair.*got dict"):
        F(dict(w))
    with pytest.raises(TypeError, match=r"forward: lora must be .* got str"):
        F("adapter")
    with pytest.raises(TypeError, match=r"forward: lora\[1\] must be a LoraAdapter or a \(LoraAdapter, weight\) pair, got Tensor"):
        F([ad, torch.ones(1)])
    with pytest.raises(TypeError, match=r"the weight of lora\[0\] must be a finite Python number, got tensor"):
        F((ad, torch.ones(1)))
    with pytest.raises(TypeError, match=r"the weight of lora\[0\] must be a finite Python number, got nan"):
        F((ad, float("nan")))
    with pytest.raises(TypeError, match=r"the weight of lora\[0\] must be a finite Python number, got True"):
        F([(ad, True)])
    # shapes against the model: an adapter of another model
    other = init_lora(M.DiTConfig.preset("tiny", dim=32, num_heads=2, skiparse_model_type="full", num_layers=2), ad.config)
    with pytest.raises(ValueError, match=r"forward: lora.weights: blocks.0.self_attn.q is a Linear 64 -> 64 in this model .* lora_A is \(4, 32\)"):
        F(other)
    deep = init_lora(M.DiTConfig.preset("tiny", skiparse_model_type="full", num_layers=4), ad.config)
    with pytest.raises(ValueError, match=r"lora.weights has block indices \[2, 3\] but the model has num_layers = 2"):
        F(deep)
    with pytest.raises(ValueError, match=r"lora\[1\].weights\['blocks.0.self_attn.q.lora_A'\] must be on x's device cpu, got meta \(move the adapter with adapter.to\('cpu'\)\)"):
        F([ad, ad.to("meta")])
    # the adapter's own consistency (at construction, and again per forward call for mutated dicts)
    with pytest.raises(ValueError, match=r"key\(s\) of unknown module names: \['blocks.0.attn1.to_q.lora_A'\]; allowed names"):
        LoraAdapter(ad.config, with_(**{"blocks.0.attn1.to_q.lora_A": torch.zeros(4, 64)}))
    with pytest.raises(ValueError, match=r"modules outside config.targets = \('self_attn.q',\)"):
        LoraAdapter(LoraConfig(rank=4, targets=("self_attn.q",)), w)
    with pytest.raises(ValueError, match=r"not of the form 'blocks.\{i\}.\{name\}.lora_A'.*\['transformer.blocks.0.attn1.to_q.lora_A.weight'\]"):
        LoraAdapter(ad.config, {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64)})
    with pytest.raises(ValueError, match=r"\['blocks.1.ffn.0.lora_A'\] must be \[rank=4, in\], got \(3, 64\)"):
        LoraAdapter(ad.config, with_(**{"blocks.1.ffn.0.lora_A": torch.zeros(3, 64)}))
    with pytest.raises(ValueError, match=r"has blocks.1.ffn.0.lora_B without blocks.1.ffn.0.lora_A"):
        LoraAdapter(ad.config, with_(**{"blocks.1.ffn.0.lora_A": None}))
    with pytest.raises(TypeError, match=r"weights\['blocks.0.ffn.0.lora_B'\] must be a floating-point tensor, got torch.int64"):
        LoraAdapter(ad.config, with_(**{"blocks.0.ffn.0.lora_B": torch.zeros(128, 4, dtype=torch.long)}))
    mutated = ad.clone()
    mutated.weights["blocks.0.ffn.2.lora_B"] = torch.zeros(64, 5)
    with pytest.raises(ValueError, match=r"forward: lora.weights\['blocks.0.ffn.2.lora_B'\] must be \[out, rank=4\], got \(64, 5\)"):
        F(mutated)
    with pytest.raises(ValueError, match=r"LoraAdapter.check: weights: blocks.0.self_attn.q is a Linear 64 -> 64"):
        other.check(cfg)
    # configs
    for kw, msg in [(dict(rank=0), r"rank must be a positive int, got 0"), (dict(alpha=float("inf")), r"alpha must be a finite number > 0"),
                    (dict(init="normal"), r"init must be one of \('gaussian', 'kaiming', 'zeros'\), got 'normal'"),
                    (dict(targets=()), r"targets must name at least one"), (dict(targets=("ffn.0", "ffn.0")), r"names \['ffn.0'\] more than once")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            LoraConfig(**kw)
    with pytest.raises(TypeError, match=r"targets must be a tuple of block Linear names"):
        LoraConfig(targets="self_attn.q")
    with pytest.raises(TypeError, match=r"init_lora: lora_cfg must be an ospfn.lora.LoraConfig, got dict"):
        init_lora(cfg, {"rank": 4})
    # the module path takes the adapter in the modules, not per call
    net = DiT(cfg, params)
    with pytest.raises(ValueError, match=r"lora= cannot be combined with run.block_fn.*ospfn.nn.DiT\(cfg, params, lora=adapter\)"):
        M.forward(params, cfg, *args, run=M.RunOptions(block_fn=net._run_block), lora=ad)
    with pytest.raises(TypeError, match=r"DiT: lora must be an ospfn.lora.LoraAdapter or None, got dict"):
        DiT(cfg, params, lora=dict(w))
    with pytest.raises(ValueError, match=r"freeze_base: no LoRA adapter is attached"):
        net.freeze_base()
    with pytest.raises(TypeError, match=r"DiT.forward: lora_weight must be a finite Python number, got '1'"):
        net(*args, lora_weight="1")
    # merge against the wrong params
    with pytest.raises(ValueError, match=r"merge_lora: adapter_or_list: blocks.0.self_attn.q has lora_B @ lora_A of shape \(32, 32\) but params\[.blocks.0.self_attn.q.weight.\] is \(64, 64\)"):
        merge_lora(params, other)
    with pytest.raises(ValueError, match=r"merge_lora: params has no tensor for 2 module\(s\)"):
        merge_lora({k: v for k, v in params.items() if not k.startswith("blocks.1.ffn")}, ad)
    with pytest.raises(TypeError, match=r"unmerge_lora: weight must be a finite Python number, got None"):
        unmerge_lora(params, ad, weight=None)
