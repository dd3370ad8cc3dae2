"""The functional DiT: schedule, Skiparse model vs an independent masked-dense reference, FlashI2V, diffusers
parity, config validation and the module shells."""

import pytest
import torch
from dit_reference import reference_forward

import ospfn.model as M
from ospfn.model.checkpoint import convert_state_dict
from ospfn.nn import DiT, ParamHolder


def perturbed(params, seed=0, scale=0.05, skip=()):
    """Random non-trivial parameters (the initial head is zero, which would hide everything)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v if k.startswith(skip) else v + scale * torch.randn(v.shape, generator=g).to(v.dtype)) for k, v in params.items()}


def inputs(cfg, B=2, T=2, H=10, W=14, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_dim, T, H, W, generator=g)
    t = torch.tensor([937.0, 241.5][:B])
    ctx = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    return x, t, ctx


def ref(params, cfg, x, t, ctx, **kw):
    return reference_forward(
        params, dim=cfg.dim, heads=cfg.num_heads, num_layers=cfg.num_layers, patch=cfg.patch_size, eps=cfg.eps,
        model_type=cfg.skiparse_model_type, ratio=cfg.sparse_ratio, num_full=cfg.num_full_blocks, x=x, t=t, ctx=ctx, **kw,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ schedule


def test_block_schedule_of_released_models():
    s14 = M.block_schedule(M.DiTConfig.preset("osp-next-14b"))
    assert [i for i, k in enumerate(s14) if k == "full"] == [0, 1, 2, 3, 36, 37, 38, 39]
    assert s14[4:36] == ["token", "group"] * 16
    s13 = M.block_schedule(M.DiTConfig.preset("osp-next-1.3b"))
    assert [i for i, k in enumerate(s13) if k == "full"] == [0, 1, 2, 3, 26, 27, 28, 29]
    assert s13[4] == "token" and s13[25] == "group"
    assert M.block_schedule(M.DiTConfig.preset("wan2.1-t2v-14b")) == ["full"] * 40
    all_sparse = M.block_schedule(M.DiTConfig.preset("tiny", num_full_blocks=0))
    assert all_sparse == ["token", "group"] * 4


# ------------------------------------------------------------------------------------------------ skiparse model


@pytest.mark.parametrize("grid_hw", [(10, 14), (8, 8)])  # (10, 14) -> token grid 5 x 7: padded to 8 x 8
def test_dual_end_equals_masked_dense_reference(grid_hw):
    cfg = M.DiTConfig.preset("tiny")
    params = perturbed(M.init_params(cfg))
    x, t, ctx = inputs(cfg, H=grid_hw[0], W=grid_hw[1])
    p1 = {k: v.clone().requires_grad_() for k, v in params.items()}
    p2 = {k: v.clone().requires_grad_() for k, v in params.items()}
    out = M.forward(p1, cfg, x, t, ctx)
    want = ref(p2, cfg, x, t, ctx)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    go = torch.randn_like(out)
    g1 = torch.autograd.grad(out, list(p1.values()), go)
    g2 = torch.autograd.grad(want, list(p2.values()), go)
    for name, a, b in zip(p1, g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_sparse_differs_from_full():
    """Guards the test above against a model that ignores the schedule."""
    cfg = M.DiTConfig.preset("tiny")
    params = perturbed(M.init_params(cfg))
    x, t, ctx = inputs(cfg)
    full = M.forward(params, cfg.replace(skiparse_model_type="full", num_full_blocks=0), x, t, ctx)
    assert (M.forward(params, cfg, x, t, ctx) - full).abs().max() > 1e-3


def test_ratio_one_and_full_type_are_the_full_model():
    cfg = M.DiTConfig.preset("tiny")
    params = perturbed(M.init_params(cfg))
    x, t, ctx = inputs(cfg)
    full = M.forward(params, cfg.replace(skiparse_model_type="full", num_full_blocks=0), x, t, ctx)
    assert torch.equal(M.forward(params, cfg.replace(sparse_ratio=1), x, t, ctx), full)
    torch.testing.assert_close(full, ref(params, cfg.replace(skiparse_model_type="full", num_full_blocks=0), x, t, ctx), rtol=1e-4, atol=1e-5)


def test_grad_checkpoint_gives_same_gradients():
    cfg = M.DiTConfig.preset("tiny")
    params = perturbed(M.init_params(cfg))
    x, t, ctx = inputs(cfg)
    grads = []
    for ckpt in (False, True):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        M.forward(p, cfg, x, t, ctx, run=M.RunOptions(grad_checkpoint=ckpt)).square().mean().backward()
        grads.append([v.grad for v in p.values()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_bf16_params_run_with_fp32_modulation():
    cfg = M.DiTConfig.preset("tiny")
    p32 = perturbed(M.init_params(cfg))
    pbf = {k: (v.float() if M.params.keeps_fp32(k) else v.bfloat16()) for k, v in p32.items()}
    assert pbf["blocks.0.modulation"].dtype == torch.float32 and pbf["blocks.0.ffn.0.weight"].dtype == torch.bfloat16
    x, t, ctx = inputs(cfg)
    y = M.forward(pbf, cfg, x, t, ctx)
    y32 = M.forward(p32, cfg, x, t, ctx)
    assert y.dtype == torch.float32
    assert ((y - y32).norm() / y32.norm()) < 0.05


# ------------------------------------------------------------------------------------------------ FlashI2V


def test_flashi2v_at_init_is_t2v_bit_for_bit():
    cfg_t2v = M.DiTConfig.preset("tiny")
    cfg = cfg_t2v.replace(i2v="flashi2v")
    params = perturbed(M.init_params(cfg), skip=("fourier_embedding.", "learnable_proj."))
    t2v_params = {k: params[k] for k in M.param_shapes(cfg_t2v)}
    x, t, ctx = inputs(cfg)
    s = torch.randn(2, 16, 1, 10, 14)
    assert torch.equal(M.forward(params, cfg, x, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.3)), M.forward(t2v_params, cfg_t2v, x, t, ctx))
    phi = M.flashi2v_shift(params, cfg, s)
    assert phi.shape == (2, 16, 1, 10, 14) and phi.dtype == torch.float32 and torch.equal(phi, torch.zeros_like(phi))


def test_flashi2v_branches_change_the_output_when_trained():
    cfg = M.DiTConfig.preset("tiny", i2v="flashi2v")
    base = perturbed(M.init_params(cfg), skip=("fourier_embedding.", "learnable_proj."))
    x, t, ctx = inputs(cfg)
    s = torch.randn(2, 16, 1, 10, 14)
    y0 = M.forward(base, cfg, x, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.3))
    p = dict(base)
    p["fourier_embedding.1.weight"] = torch.randn_like(p["fourier_embedding.1.weight"]) * 0.05
    assert (M.forward(p, cfg, x, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.3)) - y0).abs().max() > 1e-4
    p = dict(base)
    p["learnable_proj.proj.2.weight"] = torch.randn_like(p["learnable_proj.proj.2.weight"]) * 0.05
    phi = M.flashi2v_shift(p, cfg, s)
    assert phi.abs().max() > 1e-3
    # the model itself does not apply phi (the caller feeds z - phi): forward is unchanged
    assert torch.equal(M.forward(p, cfg, x, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.3)), y0)


def test_flashi2v_matches_reference_with_fourier_branch():
    cfg = M.DiTConfig.preset("tiny", i2v="flashi2v", skiparse_model_type="full", num_full_blocks=0)
    params = perturbed(M.init_params(cfg))
    x, t, ctx = inputs(cfg)
    s = torch.randn(2, 16, 1, 10, 14)
    f = M.fourier_features(s, 0.3)
    out = M.forward(params, cfg, x, t, ctx, image=M.ImageCond(fourier_feats=f))
    torch.testing.assert_close(out, ref(params, cfg, x, t, ctx, fourier=f), rtol=1e-4, atol=1e-5)
    assert torch.equal(out, M.forward(params, cfg, x, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.3)))


@pytest.mark.parametrize("conv3", [False, True])
def test_phi_shapes(conv3):
    cfg = M.DiTConfig.preset("tiny", i2v="flashi2v", conv3x3x3_proj=conv3)
    shapes = M.param_shapes(cfg)
    k = (3, 3, 3) if conv3 else (1, 3, 3)
    assert shapes["learnable_proj.proj.0.weight"] == (64, 16, *k)
    assert shapes["learnable_proj.proj.2.weight"] == (16, 64, *k)
    p = perturbed(M.init_params(cfg))
    s = torch.randn(1, 16, 1, 6, 8)
    phi = M.flashi2v_shift(p, cfg, s)
    assert phi.shape == (1, 16, 1, 6, 8)
    # one frame with zero temporal padding: a 3x3x3 kernel only uses its middle temporal slice
    w0 = p["learnable_proj.proj.0.weight"][:, :, k[0] // 2 : k[0] // 2 + 1]
    w2 = p["learnable_proj.proj.2.weight"][:, :, k[0] // 2 : k[0] // 2 + 1]
    h = torch.nn.functional.conv3d(s, w0, p["learnable_proj.proj.0.bias"], padding=(0, 1, 1))
    want = torch.nn.functional.conv3d(torch.nn.functional.silu(h), w2, p["learnable_proj.proj.2.bias"], padding=(0, 1, 1))
    torch.testing.assert_close(phi, want)


# ------------------------------------------------------------------------------------------------ HiF8


BLOCK_LINEARS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]  # docs/hif8.md#training-with-hif8


@pytest.mark.parametrize("quant_attn", [None, "hif8"])
def test_hif8_mode_quantises_exactly_the_block_linears(quant_attn, monkeypatch):
    """Every Linear inside the blocks (and nothing else) computes Q15(x) @ Q15(W)^T + b with the oracle's Q15 on
    the very operands the model passes, pad rows of Skiparse blocks are zero (kept out of the amax), and with
    quant_attn the self-attention q, k, v reaching attention lie on the Q15 grid (quantised after RoPE).

    Checked call by call rather than end to end: an end-to-end comparison with an independent reference is not
    exact here, because a value that two correct implementations compute an ulp apart can fall on either side of
    a HiF8 rounding midpoint, and the 3-bit mantissa turns that into an error the following layers amplify."""
    import ospfn.model.dit as dit
    from hif8_oracle import oracle_quantize
    from ospfn.ops import skiparse_key_mask

    q15 = lambda z: oracle_quantize(z, 15.0, rowwise=False)  # noqa: E731
    cfg = M.DiTConfig.preset("tiny", quant="hif8", quant_attn=quant_attn)
    params = perturbed(M.init_params(cfg))
    x, t, ctx = inputs(cfg)  # token grid 2 x 5 x 7: Skiparse pads it
    B, grid = x.shape[0], (x.shape[2], x.shape[3] // cfg.patch_size[1], x.shape[4] // cfg.patch_size[2])
    names = {v.data_ptr(): k for k, v in params.items()}
    calls, attn_in = [], []
    real_linear, real_attention = dit.hif8_linear, dit.attention

    def spy_linear(a, w, b=None, **kw):
        y = real_linear(a, w, b, **kw)
        calls.append((names.get(w.data_ptr()), a.detach().clone()))
        assert torch.equal(y, torch.nn.functional.linear(q15(a), q15(w), b)), names.get(w.data_ptr())
        return y

    def spy_attention(q, k, v, **kw):
        if k.shape[1] == q.shape[1]:  # self-attention (cross-attention keys are the text tokens)
            attn_in.append((q, k, v))
        return real_attention(q, k, v, **kw)

    monkeypatch.setattr(dit, "hif8_linear", spy_linear)
    monkeypatch.setattr(dit, "attention", spy_attention)
    out = M.forward(params, cfg, x, t, ctx)
    monkeypatch.undo()

    # exactly the listed Linears of every block, once each, and no embedding / head / modulation
    want = [f"blocks.{i}.{n}.weight" for i in range(cfg.num_layers) for n in BLOCK_LINEARS]
    assert sorted(str(n) for n, _ in calls) == sorted(want)
    # Skiparse blocks: the rows that are padding reach the quantiser as zeros (they cannot move the amax)
    sched = M.block_schedule(cfg)
    masks = {kind: skiparse_key_mask(grid, cfg.sparse_ratio, kind, B) for kind in ("token", "group")}
    checked = 0
    for name, a in calls:
        i, lin = int(name.split(".")[1]), name.split(".", 2)[2].removesuffix(".weight")
        if sched[i] == "full" or lin in ("cross_attn.k", "cross_attn.v"):  # text tokens have no padding
            continue
        m = masks[sched[i]]
        assert a.shape[:2] == m.shape and (~m).any()  # this grid is padded, so the check is not vacuous
        assert torch.equal(a[~m], torch.zeros_like(a[~m])), name
        checked += 1
    assert checked == (len(sched) - sched.count("full")) * (len(BLOCK_LINEARS) - 2)
    # q, k, v at attention: fixed points of Q15 iff quant_attn (so this check can fail)
    assert len(attn_in) == cfg.num_layers
    on_grid = [all(torch.equal(q15(z), z) for z in qkv) for qkv in attn_in]
    assert all(on_grid) if quant_attn else not any(on_grid)
    plain = M.forward(params, cfg.replace(quant=None, quant_attn=None), x, t, ctx)
    assert float((out - plain).norm() / plain.norm()) > 1e-2  # the quantisation is really there
    if quant_attn is None:
        # end to end against the independent masked-dense reference, with the same attention arithmetic (the
        # reference's; SDPA's other summation order moves values across rounding midpoints); with quant_attn the
        # reference's float64 RoPE does that too, so there the call-by-call checks above are the test
        want = ref(params, cfg, x, t, ctx, block_linear=lambda a, w, b: torch.nn.functional.linear(q15(a), q15(w), b))
        torch.testing.assert_close(M.forward(params, cfg, x, t, ctx, run=M.RunOptions(attn_backend="ref")), want, rtol=1e-4, atol=1e-5)


def test_hif8_mode_gradients_flow():
    cfg = M.DiTConfig.preset("tiny", quant="hif8", quant_attn="hif8")
    params = {k: v.requires_grad_() for k, v in perturbed(M.init_params(cfg)).items()}
    x, t, ctx = inputs(cfg)
    M.forward(params, cfg, x, t, ctx).square().mean().backward()
    assert all(torch.isfinite(v.grad).all() and v.grad.abs().max() > 0 for k, v in params.items() if "ffn" in k or "attn" in k)


# ------------------------------------------------------------------------------------------------ diffusers


def _diffusers_model(seed=0):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (pip install -e .[dev])")
    torch.manual_seed(seed)
    m = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=96, num_layers=3,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for prm in m.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)
    cfg = M.DiTConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=3, in_dim=16, out_dim=16, text_dim=32, freq_dim=32, text_len=8)
    return m, cfg


def test_parity_with_diffusers():
    m, cfg = _diffusers_model()
    sd = convert_state_dict(m.state_dict(), "diffusers", "wan")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 3, 10, 14, generator=g)  # token grid 3 x 5 x 7: odd H', W'
    t = torch.tensor([999.0, 321.0])
    ctx = torch.randn(2, 8, 32, generator=g)
    with torch.no_grad():
        want = m(x, t, ctx).sample
        got = M.forward(sd, cfg, x, t, ctx)
    assert ((got - want).norm() / want.norm()) < 1e-4


def test_diffusers_names_round_trip_exactly():
    m, cfg = _diffusers_model()
    sd = m.state_dict()
    wan = convert_state_dict(sd, "diffusers", "wan")
    assert set(wan) == set(M.param_shapes(cfg))
    assert all(tuple(wan[k].shape) == s for k, s in M.param_shapes(cfg).items())
    back = convert_state_dict(wan, "wan", "diffusers")
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] for k in sd)


# ------------------------------------------------------------------------------------------------ config


def test_presets():
    c = M.DiTConfig.preset("wan2.1-t2v-14b")
    assert (c.dim, c.ffn_dim, c.num_heads, c.num_layers, c.head_dim) == (5120, 13824, 40, 40, 128)
    c = M.DiTConfig.preset("osp-next-14b")
    assert (c.skiparse_model_type, c.sparse_ratio, c.num_full_blocks) == ("dual_end", 2, 8)
    assert M.DiTConfig.preset("flashi2v-14b").i2v == "flashi2v"
    assert M.DiTConfig.preset("wan2.1-t2v-1.3b").dim == 1536
    assert M.DiTConfig.preset("tiny", dim=32).dim == 32


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(dim=63), r"dim \(63\) must be divisible by num_heads \(4\)"),
        (dict(num_full_blocks=2), r"num_full_blocks % 4 == 0"),
        (dict(num_full_blocks=8), r"num_full_blocks % 4 == 0 and <= num_layers/2 \(4\)"),
        (dict(num_layers=7), r"needs an even num_layers, got 7"),
        (dict(skiparse_model_type="sparse"), r"skiparse_model_type must be one of \('full', 'dual_end'\), got 'sparse'"),
        (dict(sparse_ratio=0), r"sparse_ratio must be an int >= 1, got 0"),
        (dict(i2v="ti2v"), r"i2v must be one of \('none', 'flashi2v'\)"),
        (dict(quant="fp8"), r"quant must be one of \(None, 'hif8'\)"),
        (dict(patch_size=(1, 2)), r"patch_size must be a \(t, h, w\) triple"),
        (dict(num_heads=32), r"dim \(64\) must be divisible|head dim"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        M.DiTConfig.preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'wan3'"):
        M.DiTConfig.preset("wan3")


def test_forward_input_errors():
    cfg = M.DiTConfig.preset("tiny")
    params = M.init_params(cfg)
    x, t, ctx = inputs(cfg)
    with pytest.raises(ValueError, match=r"x has 8 channels but cfg.in_dim = 16"):
        M.forward(params, cfg, x[:, :8], t, ctx)
    with pytest.raises(ValueError, match=r"must be divisible by patch_size"):
        M.forward(params, cfg, x[..., :9, :], t, ctx)
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \[2\]"):
        M.forward(params, cfg, x, t[:1], ctx)
    with pytest.raises(ValueError, match=r"context must be \[2, L, text_dim=32\]"):
        M.forward(params, cfg, x, t, ctx[..., :5])
    cfg_i2v = cfg.replace(i2v="flashi2v")
    p_i2v = M.init_params(cfg_i2v)
    s = torch.randn(2, 16, 1, 10, 14)
    with pytest.raises(ValueError, match=r"FlashI2V model .* needs image=ImageCond"):
        M.forward(p_i2v, cfg_i2v, x, t, ctx)
    with pytest.raises(ValueError, match=r"ImageCond needs fourier_feats, or latent and fourier_ratio .*fourier_ratio=None"):
        M.forward(p_i2v, cfg_i2v, x, t, ctx, image=M.ImageCond(latent=s))
    with pytest.raises(ValueError, match=r"apply_shift=True\) needs latent"):
        M.forward(p_i2v, cfg_i2v, x, t, ctx, image=M.ImageCond(fourier_feats=M.fourier_features(s, 0.1), apply_shift=True))
    with pytest.raises(ValueError, match=r"cfg.i2v = 'none' takes none"):
        M.forward(params, cfg, x, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.1))
    with pytest.raises(TypeError, match=r"run must be an ospfn.model.RunOptions or None, got dict"):
        M.forward(params, cfg, x, t, ctx, run={"attn_backend": "ref"})
    with pytest.raises(TypeError, match=r"image must be an ospfn.model.ImageCond or None, got Tensor"):
        M.forward(p_i2v, cfg_i2v, x, t, ctx, image=s)


def test_image_cond_apply_shift_is_the_shifted_input():
    cfg = M.DiTConfig.preset("tiny", i2v="flashi2v")
    params = perturbed(M.init_params(cfg))
    x, t, ctx = inputs(cfg)
    s = torch.randn(2, 16, 1, 10, 14)
    shifted = x - M.flashi2v_shift(params, cfg, s)
    want = M.forward(params, cfg, shifted, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.4))
    got = M.forward(params, cfg, x, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.4, apply_shift=True))
    assert torch.equal(got, want)
    assert (M.forward(params, cfg, x, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.4)) - want).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ nn shells


def test_module_shell_is_the_functional_model():
    cfg = M.DiTConfig.preset("tiny", i2v="flashi2v")
    params = perturbed(M.init_params(cfg))
    net = DiT(cfg, params)
    assert sorted(n for n, _ in net.named_parameters()) == sorted(M.param_shapes(cfg))
    assert all(p is params[n] or p.data_ptr() == params[n].data_ptr() for n, p in net.named_parameters())
    # leaves hold parameters and cannot be mistaken for live layers (PEFT / hooks would never see a call)
    leaf = net.blocks_list[0].self_attn.q
    assert isinstance(leaf, ParamHolder) and not isinstance(leaf, torch.nn.Linear)
    with pytest.raises(RuntimeError, match="ParamHolder holds parameters only"):
        leaf(torch.ones(1, cfg.dim))
    x, t, ctx = inputs(cfg)
    s = torch.randn(2, 16, 1, 10, 14)
    assert torch.equal(net(x, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.2)), M.forward(params, cfg, x, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.2)))
    net(x, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.2)).sum().backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if not n.startswith("learnable_proj"))
