"""load_pipeline on the layouts users download: a tiny random Wan pipeline built and saved by diffusers itself, the
same weights written in the Wan original layout by this test (its own name tables), and ospfn's own directories;
model types (OSP-Next's Skiparse schedule, FlashI2V from T2V weights), replacement DiTs and the errors."""

import json
import re
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from test_umt5 import _to_wan as t5_to_wan  # noqa: E402  (test_umt5's own Wan T5 name table)
from test_wan_vae import SPEC_TINY  # noqa: E402
from test_wan_vae import _make as make_vae  # noqa: E402
from test_wan_vae import _to_wan as vae_to_wan  # noqa: E402  (test_wan_vae's own Wan VAE name table)

import ospfn.model as M  # noqa: E402
from ospfn.model.checkpoint import CheckpointError, CheckpointMissingError  # noqa: E402
from ospfn.model.params import FLASHI2V_BRANCH_KEYS, add_flashi2v_branches  # noqa: E402
from ospfn.pipeline import BUNDLED, WAN_NEGATIVE_PROMPT, detect_layout, load_pipeline  # noqa: E402

HEADS, HEAD_DIM, LAYERS, TEXT_DIM = 2, 12, 8, 32
T5 = dict(vocab_size=384, d_model=TEXT_DIM, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0)
PROMPTS = ["a red fox runs through the snow", ""]


# --- diffusers names -> Wan original DiT names: this test's own table --------------------------------------

_DIT_TO_WAN = [
    (r"condition_embedder\.text_embedder\.linear_1\.(weight|bias)", r"text_embedding.0.\1"),
    (r"condition_embedder\.text_embedder\.linear_2\.(weight|bias)", r"text_embedding.2.\1"),
    (r"condition_embedder\.time_embedder\.linear_1\.(weight|bias)", r"time_embedding.0.\1"),
    (r"condition_embedder\.time_embedder\.linear_2\.(weight|bias)", r"time_embedding.2.\1"),
    (r"condition_embedder\.time_proj\.(weight|bias)", r"time_projection.1.\1"),
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)", r"blocks.\1.self_attn.\2.\3"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.self_attn.o.\2"),
    (r"blocks\.(\d+)\.attn1\.norm_([qk])\.weight", r"blocks.\1.self_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.attn2\.to_([qkv])\.(weight|bias)", r"blocks.\1.cross_attn.\2.\3"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0\.(weight|bias)", r"blocks.\1.cross_attn.o.\2"),
    (r"blocks\.(\d+)\.attn2\.norm_([qk])\.weight", r"blocks.\1.cross_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm3.\2"),  # the affine norm before cross-attention
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.(weight|bias)", r"blocks.\1.ffn.0.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.2\.(weight|bias)", r"blocks.\1.ffn.2.\2"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    (r"proj_out\.(weight|bias)", r"head.head.\1"),
    (r"scale_shift_table", r"head.modulation"),
]


def dit_to_wan(sd):
    out = {}
    for key, value in sd.items():
        for pat, rep in _DIT_TO_WAN:
            if re.fullmatch(pat, key):
                out[re.sub(pat, rep, key)] = value.detach().clone()
                break
        else:
            raise AssertionError(f"test table has no rule for {key}")
    return out


def _randomise(module, seed):
    """Every tensor random (norm gains around 1), so a swapped or dropped name changes the result."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".norm" in name or "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """(diffusers WanPipeline, its save_pretrained directory, the Wan original directory of the same weights)."""
    root = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(0)
    transformer = _randomise(diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=16, ffn_dim=48, num_layers=LAYERS), seed=1)  # fmt: skip
    vae = make_vae(SPEC_TINY, 2)
    text_encoder = _randomise(transformers.UMT5EncoderModel(transformers.UMT5Config(**T5)), seed=3)
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = diffusers.WanPipeline(tokenizer=transformers.ByT5Tokenizer(), text_encoder=text_encoder, transformer=transformer,
                                 vae=vae, scheduler=scheduler)  # fmt: skip
    pipe.save_pretrained(root / "diffusers")

    wan_dir = root / "wan"
    wan_dir.mkdir()
    config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": HEADS * HEAD_DIM, "eps": 1e-6, "ffn_dim": 48,
              "freq_dim": 16, "in_dim": 16, "model_type": "t2v", "num_heads": HEADS, "num_layers": LAYERS, "out_dim": 16,
              "text_len": 512, "text_dim": TEXT_DIM}  # fmt: skip  (the released files leave text_dim at its default, 4096)
    (wan_dir / "config.json").write_text(json.dumps(config))
    sd = dit_to_wan(transformer.state_dict())
    names = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}  # fmt: skip
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: sd[k].contiguous() for k in keys}, str(wan_dir / file))
        weight_map.update(dict.fromkeys(keys, file))
    (wan_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    torch.save(t5_to_wan(text_encoder.state_dict()), wan_dir / "models_t5_umt5-xxl-enc-bf16.pth")
    transformers.ByT5Tokenizer().save_pretrained(wan_dir / "google" / "umt5-xxl")
    torch.save(vae_to_wan(vae.state_dict(), SPEC_TINY["num_res_blocks"]), wan_dir / "Wan2.1_VAE.pth")
    return pipe, root / "diffusers", wan_dir


@pytest.fixture(scope="module")
def loaded(wan):
    """(diffusers layout, Wan original layout) loaded by ospfn with the default model type."""
    _, ddir, wdir = wan
    return load_pipeline(ddir), load_pipeline(wdir, vae_config=SPEC_TINY)


def _inputs(cfg, seed=0, B=1, T=3, H=8, W=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, T, H, W, generator=g)
    t = torch.tensor([700.0] * B)
    ctx = torch.randn(B, 20, cfg.text_dim, generator=g)
    return x, t, ctx


# --- (a) + (b): both layouts give the diffusers components ----------------------------------------------


def test_layouts_are_detected(wan):
    _, ddir, wdir = wan
    assert (detect_layout(ddir), detect_layout(wdir), detect_layout(BUNDLED)) == ("diffusers", "wan", "ospfn")


def test_both_layouts_hold_the_diffusers_dit(wan, loaded):
    pipe, _, _ = wan
    a, b = loaded
    assert a.cfg == b.cfg
    assert (a.cfg.dim, a.cfg.num_heads, a.cfg.num_layers, a.cfg.ffn_dim, a.cfg.text_dim, a.cfg.freq_dim) == (24, HEADS, LAYERS, 48, TEXT_DIM, 16)
    assert (a.cfg.skiparse_model_type, a.cfg.i2v, a.model_type, b.model_type) == ("full", "none", "wan", "wan")
    want = dit_to_wan(pipe.transformer.state_dict())
    assert set(a.params) == set(b.params) == set(want)
    assert all(torch.equal(a.params[k], want[k]) and torch.equal(b.params[k], want[k]) for k in want)
    # and ospfn's forward on them is diffusers' forward
    x, t, ctx = _inputs(a.cfg)
    with torch.no_grad():
        ref = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    out = M.forward(a.params, a.cfg, x, t, ctx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_both_layouts_encode_text_like_diffusers(wan, loaded):
    pipe, _, _ = wan
    a, b = loaded
    assert a.text.text_len == b.text.text_len == 512
    fa, la = a.text.encode(PROMPTS)
    fb, lb = b.text.encode(PROMPTS)
    assert torch.equal(fa, fb) and torch.equal(la, lb)
    with torch.no_grad():
        ref = pipe._get_t5_prompt_embeds(prompt=PROMPTS, max_sequence_length=512, device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(fa, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert lengths_ok(la)


def lengths_ok(lengths):
    return lengths.tolist() == [len(PROMPTS[0].encode()) + 1, 1]  # ByT5: a token per byte, then </s>


def test_both_layouts_hold_the_diffusers_vae(wan, loaded):
    pipe, _, _ = wan
    a, b = loaded
    assert a.vae.stride == b.vae.stride == (4, 8, 8)
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    za, zb = a.vae.encode(video), b.vae.encode(video)
    assert torch.equal(za, zb)
    model = pipe.vae
    mean = torch.tensor(model.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        ref_z = (model.encode(video).latent_dist.mean - mean) / std
        ref_v = model.decode(za * std + mean, return_dict=False)[0].clamp(-1, 1)
    torch.testing.assert_close(za, ref_z, rtol=1e-5, atol=1e-5)
    va, vb = a.vae.decode(za), b.vae.decode(za)
    assert torch.equal(va, vb)
    torch.testing.assert_close(va, ref_v, rtol=1e-5, atol=1e-5)


def test_wan_family_defaults(loaded):
    a, b = loaded
    for p in (a, b):
        d = p.defaults
        assert (d["frames"], d["size"], d["steps"], d["guidance"], d["shift"], d["scheduler"]) == (81, [480, 832], 50, 5.0, 3.0, "unipc")
        assert d["negative_prompt"] == WAN_NEGATIVE_PROMPT and WAN_NEGATIVE_PROMPT.startswith("色调艳丽") and WAN_NEGATIVE_PROMPT.endswith("倒着走")
    assert (a.info["layout"], b.info["layout"], a.info["dit"], a.info["flashi2v_branches"]) == ("diffusers", "wan", None, None)
    assert a.vae_spec["kind"] == b.vae_spec["kind"] == "wan"


def test_scheduler_config_sets_shift_and_scheduler(wan, tmp_path):
    _, ddir, _ = wan
    d = _copy(ddir, tmp_path / "p")
    cfg_file = d / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["flow_shift"] = 5.0
    cfg_file.write_text(json.dumps(cfg))
    assert load_pipeline(d).defaults["shift"] == 5.0
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    shutil.rmtree(d / "scheduler")
    euler.save_pretrained(d / "scheduler")
    p = load_pipeline(d)
    assert (p.defaults["scheduler"], p.defaults["shift"]) == ("euler", 7.0)


def test_ospfn_directory_loads_as_before():
    p = load_pipeline(BUNDLED)
    assert (p.model_type, p.info["layout"], p.cfg.i2v, p.cfg.skiparse_model_type) == ("ospfn", "ospfn", "flashi2v", "dual_end")
    assert p.info["trained_steps"] == 5000 and p.info["flashi2v_branches"] == "loaded"
    assert p.defaults["scheduler"] == "euler" and p.defaults["negative_prompt"] == ""
    again = load_pipeline(BUNDLED, dit=BUNDLED / "diffusion_pytorch_model.safetensors")
    assert again.cfg == p.cfg and all(torch.equal(again.params[k], v) for k, v in p.params.items())


# --- model types ------------------------------------------------------------------------------------------


def test_osp_next_is_the_same_weights_with_the_dual_end_schedule(loaded, wan):
    _, ddir, wdir = wan
    base, _ = loaded
    for p in (load_pipeline(ddir, model_type="osp-next"), load_pipeline(wdir, model_type="osp-next", vae_config=SPEC_TINY)):
        assert p.model_type == "osp-next"
        assert (p.cfg.skiparse_model_type, p.cfg.sparse_ratio, p.cfg.num_full_blocks, p.cfg.i2v) == ("dual_end", 2, 4, "none")
        assert p.cfg == base.cfg.replace(skiparse_model_type="dual_end", sparse_ratio=2, num_full_blocks=4)
        assert set(p.params) == set(base.params) and all(torch.equal(p.params[k], v) for k, v in base.params.items())
        assert (p.defaults["scheduler"], p.defaults["shift"], p.defaults["negative_prompt"]) == ("euler", 7.0, WAN_NEGATIVE_PROMPT)
    # the schedule is in effect: sparse blocks change the output of the same weights
    x, t, ctx = _inputs(base.cfg)
    assert not torch.allclose(M.forward(p.params, p.cfg, x, t, ctx), M.forward(base.params, base.cfg, x, t, ctx), atol=1e-3)
    assert M.block_schedule(p.cfg).count("full") == 4


def test_osp_next_full_blocks_follow_the_presets():
    from ospfn.pipeline import _osp_next_settings

    for layers, full in ((30, 8), (40, 8), (16, 8), (8, 4), (4, 0)):
        assert _osp_next_settings(layers) == {"skiparse_model_type": "dual_end", "sparse_ratio": 2, "num_full_blocks": full}
    pre = M.DiTConfig.preset("osp-next-1.3b")
    assert pre.num_full_blocks == _osp_next_settings(pre.num_layers)["num_full_blocks"]


def _flashi2v_equals_t2v(fi_params, fi_cfg, params, cfg, seed):
    x, t, ctx = _inputs(cfg, seed=seed, B=2)
    s = torch.randn(2, 16, 1, 8, 8, generator=torch.Generator().manual_seed(seed + 1))
    ref = M.forward(params, cfg, x, t, ctx)
    phi = M.flashi2v_shift(fi_params, fi_cfg, s)
    assert torch.equal(phi, torch.zeros_like(phi))
    for ratio in (0.0, 0.3, 0.9):
        out = M.forward(fi_params, fi_cfg, x - phi, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=ratio))
        assert torch.equal(out, ref), float((out - ref).abs().max())
    # phi applied inside the call (as the training loss does it)
    out = M.forward(fi_params, fi_cfg, x, t, ctx, image=M.ImageCond(latent=s, fourier_ratio=0.5, apply_shift=True))
    assert torch.equal(out, ref)


def test_flashi2v_from_t2v_weights_starts_as_the_t2v_model(wan, loaded):
    _, ddir, wdir = wan
    base, _ = loaded
    p = load_pipeline(ddir, model_type="flashi2v")
    q = load_pipeline(wdir, model_type="flashi2v", vae_config=SPEC_TINY)
    assert p.model_type == "flashi2v" and p.cfg == base.cfg.replace(i2v="flashi2v") and p.info["flashi2v_branches"] == "initialised"
    assert set(p.params) == set(base.params) | set(FLASHI2V_BRANCH_KEYS)
    assert all(torch.equal(p.params[k], q.params[k]) for k in p.params)  # the same seed in both layouts
    assert all(torch.equal(p.params[k], v) for k, v in base.params.items())
    for k in FLASHI2V_BRANCH_KEYS:  # zero last layers and biases, Xavier-uniform first layers
        w = p.params[k]
        if k.endswith("bias") or k in ("fourier_embedding.1.weight", "learnable_proj.proj.2.weight"):
            assert torch.equal(w, torch.zeros_like(w)), k
        else:
            fan_in, fan_out = w[0].numel(), w.shape[0]
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert float(w.abs().max()) <= bound and float(w.std()) > bound / 3, k
    assert p.params["learnable_proj.proj.0.weight"].shape[2:] == (1, 3, 3)
    assert (p.defaults["scheduler"], p.defaults["shift"]) == ("euler", 7.0)
    _flashi2v_equals_t2v(p.params, p.cfg, base.params, base.cfg, seed=5)


def test_add_flashi2v_branches_on_random_t2v_weights():
    cfg = M.DiTConfig.preset("tiny", skiparse_model_type="full", num_full_blocks=0, sparse_ratio=1)
    params = M.init_params(cfg, seed=3)
    params = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}  # a non-zero head: the output depends on x
    for conv3 in (False, True):
        fcfg = cfg.replace(i2v="flashi2v", conv3x3x3_proj=conv3)
        fp = add_flashi2v_branches(params, fcfg, seed=7)
        assert set(fp) == set(M.param_shapes(fcfg)) and all(fp[k] is params[k] for k in params)
        assert all(tuple(fp[k].shape) == M.param_shapes(fcfg)[k] for k in FLASHI2V_BRANCH_KEYS)
        _flashi2v_equals_t2v(fp, fcfg, params, cfg, seed=9)
    again = add_flashi2v_branches(params, fcfg, seed=7)
    assert all(torch.equal(again[k], fp[k]) for k in FLASHI2V_BRANCH_KEYS)
    with pytest.raises(ValueError, match=r"cfg must be a FlashI2V config \(i2v='flashi2v'\), got i2v='none'"):
        add_flashi2v_branches(params, cfg)
    with pytest.raises(ValueError, match=r"already hold FlashI2V branch tensors \['fourier_embedding\.0\.weight'"):
        add_flashi2v_branches(fp, fcfg)
    with pytest.raises(ValueError, match=r"lack the tensor 'patch_embedding\.weight'"):
        add_flashi2v_branches({}, fcfg)


def test_load_checkpoint_init_missing(tmp_path):
    cfg = M.DiTConfig.preset("tiny", skiparse_model_type="full", num_full_blocks=0, sparse_ratio=1)
    fcfg = cfg.replace(i2v="flashi2v")
    params = M.init_params(cfg, seed=1)
    M.save_checkpoint(params, tmp_path / "t2v.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 8: .*pass init_missing='flashi2v' to create the FlashI2V branches"):
        M.load_checkpoint(tmp_path / "t2v.safetensors", fcfg)
    got = M.load_checkpoint(tmp_path / "t2v.safetensors", fcfg, init_missing="flashi2v", dtype=torch.float64)
    assert set(got) == set(M.param_shapes(fcfg)) and all(v.dtype == torch.float64 for v in got.values())
    assert all(torch.equal(got[k], params[k].double()) for k in params)
    # another missing key still raises, and so does a partial set of branches
    partial = {k: v for k, v in params.items() if k != "head.modulation"}
    M.save_checkpoint(partial, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 9: \['fourier_embedding"):
        M.load_checkpoint(tmp_path / "partial.safetensors", fcfg, init_missing="flashi2v")
    half = {**params, **{k: v for k, v in M.init_params(fcfg).items() if k.startswith("fourier_embedding.")}}
    M.save_checkpoint(half, tmp_path / "half.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 4: \['learnable_proj"):
        M.load_checkpoint(tmp_path / "half.safetensors", fcfg, init_missing="flashi2v")
    with pytest.raises(ValueError, match=r"init_missing='flashi2v' needs a FlashI2V cfg"):
        M.load_checkpoint(tmp_path / "t2v.safetensors", cfg, init_missing="flashi2v")
    with pytest.raises(ValueError, match=r"init_missing must be one of \(None, 'flashi2v'\), got 'zeros'"):
        M.load_checkpoint(tmp_path / "t2v.safetensors", fcfg, init_missing="zeros")
    # a FlashI2V checkpoint loads unchanged with init_missing
    full = M.init_params(fcfg, seed=4)
    M.save_checkpoint(full, tmp_path / "fi.safetensors")
    got = M.load_checkpoint(tmp_path / "fi.safetensors", fcfg, init_missing="flashi2v")
    assert all(torch.equal(got[k], v) for k, v in full.items())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_shapes_reads_names_without_data(tmp_path):
    import torch.distributed.checkpoint as dcp

    from ospfn.model.checkpoint import checkpoint_shapes

    cfg = M.DiTConfig.preset("tiny", i2v="flashi2v", conv3x3x3_proj=True)
    params = M.init_params(cfg)
    want = M.param_shapes(cfg)
    M.save_checkpoint(params, tmp_path / "diffusers", layout="diffusers", max_shard_bytes=200_000)
    torch.save({"model": {"_orig_mod.module." + k: v for k, v in params.items()}}, tmp_path / "model.pt")
    dcp.save({"model": params}, checkpoint_id=str(tmp_path / "dcp"))
    for path in ("diffusers", "model.pt", "dcp"):
        assert checkpoint_shapes(tmp_path / path) == want, path


# --- a replacement DiT ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dit_replaces_the_weights_osp_next_model_pt_and_dcp(wan, loaded, tmp_path):
    _, ddir, wdir = wan
    base, _ = loaded
    new = {k: v + 0.01 * torch.randn_like(v) for k, v in base.params.items()}
    # the OSP-Next release: an FSDP full state dict behind wrapper prefixes
    torch.save({"_fsdp_wrapped_module." + k: v for k, v in new.items()}, tmp_path / "model.pt")
    p = load_pipeline(ddir, dit=tmp_path / "model.pt", model_type="osp-next")
    assert p.cfg.skiparse_model_type == "dual_end" and p.info["dit"] == str(tmp_path / "model.pt")
    assert all(torch.equal(p.params[k], v) for k, v in new.items())
    fa, _ = p.text.encode(PROMPTS)
    fb, _ = base.text.encode(PROMPTS)
    assert torch.equal(fa, fb)  # the layout's text encoder stays
    # a DCP directory
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": new}, checkpoint_id=str(tmp_path / "dcp"))
    q = load_pipeline(wdir, dit=tmp_path / "dcp", vae_config=SPEC_TINY)
    assert q.model_type == "wan" and all(torch.equal(q.params[k], v) for k, v in new.items())


@pytest.mark.parametrize("conv3", [False, True])
def test_dit_flashi2v_checkpoint_is_recognised(wan, loaded, tmp_path, conv3):
    _, ddir, _ = wan
    base, _ = loaded
    fcfg = base.cfg.replace(i2v="flashi2v", conv3x3x3_proj=conv3)
    fi = {**base.params, **{k: torch.randn(s) * 0.1 for k, s in M.param_shapes(fcfg).items() if k in FLASHI2V_BRANCH_KEYS}}
    save_file({k: v.contiguous() for k, v in fi.items()}, str(tmp_path / "flashi2v.safetensors"))
    for mt in (None, "flashi2v", "osp-next"):
        p = load_pipeline(ddir, dit=tmp_path / "flashi2v.safetensors", model_type=mt)
        assert p.cfg.i2v == "flashi2v" and p.cfg.conv3x3x3_proj is conv3 and p.info["flashi2v_branches"] == "loaded"
        assert p.model_type == (mt or "flashi2v") and all(torch.equal(p.params[k], v) for k, v in fi.items())
    assert p.cfg.skiparse_model_type == "dual_end"
    with pytest.raises(CheckpointError, match=r"holds the FlashI2V branches .*use model_type='flashi2v' \(or None\)"):
        load_pipeline(ddir, dit=tmp_path / "flashi2v.safetensors", model_type="wan")


def test_dit_config_json_next_to_the_checkpoint_is_used(wan, tmp_path):
    _, ddir, _ = wan
    cfg = M.DiTConfig(dim=24, ffn_dim=48, num_heads=2, num_layers=4, text_dim=TEXT_DIM, freq_dim=16)
    params = M.init_params(cfg, seed=2)
    M.save_checkpoint(params, tmp_path / "ckpt", cfg=cfg)
    p = load_pipeline(ddir, dit=tmp_path / "ckpt")
    assert p.cfg == cfg and all(torch.equal(p.params[k], v) for k, v in params.items())
    odd = cfg.replace(num_layers=3)
    M.save_checkpoint(M.init_params(odd), tmp_path / "odd", cfg=odd)
    with pytest.raises(ValueError, match=r"model_type='osp-next' does not fit the DiT of .*odd: .*needs an even num_layers, got 3"):
        load_pipeline(ddir, dit=tmp_path / "odd", model_type="osp-next")
    bad = cfg.replace(text_dim=64)
    M.save_checkpoint(M.init_params(bad), tmp_path / "bad", cfg=bad)
    with pytest.raises(CheckpointError, match=r"text encoder of .* gives 32-dim features; the DiT config of .*bad expects text_dim 64"):
        load_pipeline(ddir, dit=tmp_path / "bad")


# --- errors ------------------------------------------------------------------------------------------------


def _copy(src, dst, skip=()):
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in skip])
    return dst


def test_unknown_layouts_name_what_they_hold(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "weights.bin").write_bytes(b"x")
    (tmp_path / "odd" / "notes").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a pipeline directory \(no pipeline\.json\), nor a diffusers .*holds \['notes/', 'weights\.bin'\]"):
        load_pipeline(tmp_path / "odd")
    with pytest.raises(FileNotFoundError, match=r"not a pipeline directory \(no pipeline\.json\): no such directory"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"it is a file; pass the directory of a pipeline, and a DiT checkpoint file as dit="):
        load_pipeline(tmp_path / "odd" / "weights.bin")


def test_bad_arguments(wan):
    _, ddir, _ = wan
    with pytest.raises(ValueError, match=r"model_type must be one of \['wan', 'osp-next', 'flashi2v'\] or None, got 'i2v'"):
        load_pipeline(ddir, model_type="i2v")
    with pytest.raises(TypeError, match=r"dit must be a path"):
        load_pipeline(ddir, dit=3)
    with pytest.raises(FileNotFoundError, match=r"dit='/nonexistent/model\.pt': no such file or directory"):
        load_pipeline(ddir, dit="/nonexistent/model.pt")
    with pytest.raises(ValueError, match=r"vae_config is for the VAE file of a Wan original directory; .* is a diffusers pipeline"):
        load_pipeline(ddir, vae_config=SPEC_TINY)
    with pytest.raises(ValueError, match=r"text_dtype is for the UMT5 encoder"):
        load_pipeline(BUNDLED, text_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"device='gpu0' is not a device"):
        load_pipeline(ddir, device="gpu0")
    with pytest.raises(TypeError, match=r"text_device must be a torch\.device"):
        load_pipeline(ddir, text_device=1.5)
    with pytest.raises(ValueError, match=r"UMT5TextEncoder\.from_pretrained: dtype must be"):
        load_pipeline(ddir, text_dtype=torch.float16)


def test_missing_components_are_listed(wan, tmp_path):
    _, ddir, wdir = wan
    d = _copy(ddir, tmp_path / "d", skip=("vae", "tokenizer"))
    with pytest.raises(CheckpointMissingError, match=r"the diffusers pipeline .* lacks \['vae', 'tokenizer'\]; it holds \["):
        load_pipeline(d)
    w = _copy(wdir, tmp_path / "w", skip=("Wan2.1_VAE.pth", "google"))
    with pytest.raises(CheckpointMissingError, match=r"the Wan original directory .* lacks \['google/umt5-xxl/ \(the tokenizer\)', "
                                                     r"'Wan2\.1_VAE\.pth \(the VAE\)'\]"):  # fmt: skip
        load_pipeline(w)
    w2 = _copy(wdir, tmp_path / "w2", skip=("diffusion_pytorch_model-00002-of-00002.safetensors",))
    with pytest.raises(CheckpointMissingError, match=r"shards listed in .* are missing"):
        load_pipeline(w2, vae_config=SPEC_TINY)
    # the released Wan2.1 VAE config does not fit the tiny file: every mismatch named
    with pytest.raises(CheckpointError, match=r"WanVAE\.from_wan: .*Wan2\.1_VAE\.pth does not match the AutoencoderKLWan config"):
        load_pipeline(wdir)


def test_unsupported_variants_are_refused(wan, tmp_path):
    _, ddir, wdir = wan
    d = _copy(ddir, tmp_path / "i2v")
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanImageToVideoPipeline"}))
    with pytest.raises(CheckpointError, match=r"describes a 'WanImageToVideoPipeline'; ospfn reads text-to-video WanPipeline"):
        load_pipeline(d)
    (d / "model_index.json").write_text(json.dumps({**index, "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    with pytest.raises(CheckpointError, match=r"transformer_2, Wan2\.2's two experts"):
        load_pipeline(d)
    (d / "model_index.json").write_text(json.dumps(index))
    tcfg = json.loads((d / "transformer" / "config.json").read_text())
    (d / "transformer" / "config.json").write_text(json.dumps({**tcfg, "image_dim": 1280, "added_kv_proj_dim": 24}))
    with pytest.raises(CheckpointError, match=r"ospfn does not run .*image_dim 1280 \(Wan2\.1-I2V's CLIP image branch\)"):
        load_pipeline(d)
    (d / "transformer" / "config.json").write_text(json.dumps(tcfg))
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    with pytest.raises(CheckpointError, match=r"scheduler 'DDIMScheduler' is not one ospfn drives"):
        load_pipeline(d)
    w = _copy(wdir, tmp_path / "wi2v")
    cfg = json.loads((w / "config.json").read_text())
    (w / "config.json").write_text(json.dumps({**cfg, "model_type": "i2v"}))
    with pytest.raises(CheckpointError, match=r"model_type 'i2v' \(Wan's image-to-video"):
        load_pipeline(w, vae_config=SPEC_TINY)


# --- generation ---------------------------------------------------------------------------------------------


def test_wan_original_layout_generates_the_diffusers_layout_video(loaded, wan):
    _, ddir, _ = wan
    a, b = loaded
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    va = a.generate("a red fox", latents=latents, steps=2)
    vb = b.generate("a red fox", latents=latents, steps=2)
    assert va.shape == (3, 5, 32, 32) and a.last_info["scheduler"] == "unipc" and float(va.std()) > 0.01
    assert torch.equal(va, vb)
    # FlashI2V created from these T2V weights generates the T2V video, whatever the first frame
    fi = load_pipeline(ddir, model_type="flashi2v")
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1
    vt = a.generate("a red fox", latents=latents, steps=2, scheduler="euler", shift=7.0)
    vf = fi.generate("a red fox", image, latents=latents, steps=2)
    assert fi.last_info["scheduler"] == "euler"
    assert torch.equal(vf, vt), float((vf - vt).abs().max())


def test_osp_next_video_is_the_masked_dense_reference_video(wan):
    """The OSP-Next model type generates the video of the dual_end model as the independent masked-dense
    reference forward (tests/dit_reference.py) computes it, through the same sampler and VAE."""
    from dit_reference import reference_forward

    from ospfn.sched import sample

    _, ddir, _ = wan
    p = load_pipeline(ddir, model_type="osp-next")
    cfg = p.cfg
    latents = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))  # 5 frames of 32x32
    video = p.generate("a red fox", latents=latents, steps=2, guidance=3.0)

    def ref_forward(params, _cfg, x, t, context, *, image=None, run=None):
        return reference_forward(
            params, dim=cfg.dim, heads=cfg.num_heads, num_layers=cfg.num_layers, patch=cfg.patch_size, eps=cfg.eps,
            model_type=cfg.skiparse_model_type, ratio=cfg.sparse_ratio, num_full=cfg.num_full_blocks, x=x, t=t, ctx=context,
        )  # fmt: skip

    ctx, neg = p.encode_prompts(["a red fox"]), p.encode_prompts([p.defaults["negative_prompt"]])
    z = sample(p.params, cfg, noise=latents, context=ctx, neg_context=neg, guidance=3.0, steps=2, shift=p.defaults["shift"],
               forward_fn=ref_forward)  # fmt: skip
    want = p.vae.decode(z)[0].clamp(-1, 1)
    assert video.shape == want.shape == (3, 5, 32, 32)
    torch.testing.assert_close(video, want, rtol=1e-4, atol=1e-5)
    # and the sparse schedule is in effect: the dense model's video from the same noise differs
    dense = load_pipeline(ddir, model_type="wan").generate("a red fox", latents=latents, steps=2, guidance=3.0, scheduler="euler", shift=p.defaults["shift"])
    assert (dense - video).abs().max() > 1e-3
