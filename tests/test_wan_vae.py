"""WanVAE against diffusers' own AutoencoderKLWan (tiny random configs, no download), with the latent
normalisation written out here as diffusers' Wan pipelines do it; the Wan original layout through a state dict
this test renames with its own table."""

import copy
import re
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ospfn.model.checkpoint import CheckpointError  # noqa: E402
from ospfn.model.wan_vae import WanVAE, wan_vae_to_diffusers  # noqa: E402

# the small test config of the project (1 residual block per level: a decoder layout unlike the released one) and a
# small config with the released structure (2 residual blocks, dim_mult 1-2-4-4: one decoder shortcut)
SPEC_TINY = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
RELEASED_SHAPE = dict(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])


def _make(cfg, seed):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKLWan(**cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # norm gains start at one: make them tell apart
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    # latents_mean / latents_std stay the class defaults: the released Wan2.1 statistics (not 0 / 1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, pipeline dir with vae/) for the facts' tiny config."""
    root = tmp_path_factory.mktemp("wanvae")
    model = _make(SPEC_TINY, 0)
    model.save_pretrained(root / "vae")
    return model, root


def _video(B=1, F=5, H=16, W=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, F, H, W, generator=g) * 2 - 1


# --- this test's own normalisation, as diffusers' WanImageToVideoPipeline / WanPipeline write it ----------


def _stats(model):
    c = model.config.z_dim
    mean = torch.tensor(model.config.latents_mean).view(1, c, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(model.config.latents_std).view(1, c, 1, 1, 1)
    return mean, inv_std


def _ref_encode(model, video):
    mean, inv_std = _stats(model)
    with torch.no_grad():
        return (model.encode(video).latent_dist.mean - mean) * inv_std


def _ref_decode(model, z):
    mean, inv_std = _stats(model)
    with torch.no_grad():
        return model.decode(z / inv_std + mean, return_dict=False)[0]


# --- Wan original names from diffusers names: this test's own table ---------------------------------------

_RES = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma", "conv2": "residual.6",
        "conv_shortcut": "shortcut"}  # fmt: skip


def _res_part(rest):
    for d, w in _RES.items():
        if rest == d or rest.startswith(d + "."):
            return w + rest[len(d):]
    raise AssertionError(f"not a residual block parameter: {rest}")


def _to_wan(sd, num_res_blocks):
    """diffusers AutoencoderKLWan names -> Wan2.1 ``WanVAE_`` names (flat encoder/decoder block lists)."""
    per_level = num_res_blocks + 2  # residual blocks + one resample per decoder level
    out = {}
    for key, v in sd.items():
        if m := re.fullmatch(r"(encoder|decoder)\.conv_in\.(.+)", key):
            new = f"{m[1]}.conv1.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.norm_out\.gamma", key):
            new = f"{m[1]}.head.0.gamma"
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_out\.(.+)", key):
            new = f"{m[1]}.head.2.{m[2]}"
        elif m := re.fullmatch(r"(quant_conv|post_quant_conv)\.(.+)", key):
            new = {"quant_conv": "conv1", "post_quant_conv": "conv2"}[m[1]] + "." + m[2]
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"{m[1]}.middle.{2 * int(m[2])}.{_res_part(m[3])}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            new = f"{m[1]}.middle.1.{m[2]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.((?:resample|time_conv).*)", key):
            new = f"encoder.downsamples.{m[1]}.{m[2]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
            new = f"encoder.downsamples.{m[1]}.{_res_part(m[2])}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.upsamples.{int(m[1]) * per_level + int(m[2])}.{_res_part(m[3])}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.upsamples.{int(m[1]) * per_level + num_res_blocks + 1}.{m[2]}"
        else:
            raise AssertionError(f"test table has no rule for {key}")
        assert new not in out, new
        out[new] = v.clone() if v.device.type != "meta" else v
    return out


# --- (a) encode / decode equal the library model with the normalisation --------------------------------


def test_encode_decode_equal_the_library(tiny):
    model, root = tiny
    vae = WanVAE.from_pretrained(root)
    assert vae.latent_channels == 16 and vae.stride == (4, 8, 8)
    v = _video(B=2, F=5, H=16, W=24)
    z = vae.encode(v)
    assert z.shape == (2, 16, 2, 2, 3) and z.dtype == torch.float32
    ref = _ref_encode(model, v)
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    # the posterior mean, not a sample: encoding twice gives the same latents
    assert torch.equal(vae.encode(v), z)
    out = vae.decode(z)
    assert out.shape == v.shape and out.dtype == torch.float32
    ref_out = _ref_decode(model, ref)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    assert float(((out > -1) & (out < 1)).float().mean()) > 0.5  # not saturated: the comparison means something
    # the normalisation is really applied (the raw posterior mean differs from z)
    with torch.no_grad():
        raw = model.encode(v).latent_dist.mean
    assert not torch.allclose(raw, z, atol=1e-2)


def test_decode_clamps_and_frames_count(tiny):
    model, root = tiny
    vae = WanVAE.from_pretrained(root / "vae")
    z = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 30
    out = vae.decode(z)
    assert out.shape == (1, 3, 9, 16, 16)
    assert float(out.abs().max()) <= 1.0


def test_slicing_matches_the_batch(tiny):
    _, root = tiny
    v = _video(B=2, F=1, H=16, W=16, seed=3)
    plain = WanVAE.from_pretrained(root)
    sliced = WanVAE.from_pretrained(root, slicing=True)
    assert sliced.model.use_slicing
    z = plain.encode(v)
    torch.testing.assert_close(sliced.encode(v), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced.decode(z), plain.decode(z), rtol=1e-5, atol=1e-5)


def test_bf16_runs(tiny):
    _, root = tiny
    v = _video(F=5, seed=4)
    z32 = WanVAE.from_pretrained(root).encode(v)
    vae = WanVAE.from_pretrained(root, dtype="bf16")
    assert vae.dtype == torch.bfloat16
    z = vae.encode(v)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert float((z - z32).norm() / z32.norm()) < 0.05
    assert vae.decode(z).dtype == torch.float32


# --- (b) the Wan original .pth through diffusers' conversion ---------------------------------------------


@pytest.mark.parametrize("cfg", [SPEC_TINY, RELEASED_SHAPE], ids=["tiny", "released-structure"])
def test_from_wan_reproduces_the_library_model(cfg, tmp_path):
    model = _make(cfg, 7)
    torch.save(_to_wan(model.state_dict(), cfg["num_res_blocks"]), tmp_path / "Wan2.1_VAE.pth")
    vae = WanVAE.from_wan(tmp_path / "Wan2.1_VAE.pth", config=cfg)
    loaded = vae.model.state_dict()
    assert set(loaded) == set(model.state_dict())
    assert all(torch.equal(loaded[k], t) for k, t in model.state_dict().items())
    v = _video(F=5, H=16, W=16, seed=5)
    z = vae.encode(v)
    torch.testing.assert_close(z, _ref_encode(model, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode(z), _ref_decode(model, z), rtol=1e-5, atol=1e-5)


def test_from_wan_reads_a_config_directory_and_safetensors(tiny, tmp_path):
    from safetensors.torch import save_file

    model, root = tiny
    wan = _to_wan(model.state_dict(), 1)
    torch.save(wan, tmp_path / "Wan2.1_VAE.pth")
    save_file({k: t.contiguous() for k, t in wan.items()}, str(tmp_path / "wan_2.1_vae.safetensors"))
    for path in ("Wan2.1_VAE.pth", "wan_2.1_vae.safetensors"):
        vae = WanVAE.from_wan(tmp_path / path, config=root)  # a pipeline dir: vae/config.json
        assert all(torch.equal(vae.model.state_dict()[k], t) for k, t in model.state_dict().items())


def test_released_wan21_layout_converts_by_the_library_table_alone():
    """The full Wan2.1 VAE (class defaults), on the meta device: the test's Wan names convert to every diffusers
    name and shape, and the renumbering is the identity (the library's table does all the work)."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        model = diffusers.AutoencoderKLWan()
    sd = model.state_dict()
    wan = _to_wan(sd, 2)
    assert "decoder.upsamples.4.shortcut.weight" in wan and "decoder.upsamples.14.residual.6.bias" in wan
    out = wan_vae_to_diffusers(wan)
    assert set(out) == set(sd)
    assert all(tuple(out[k].shape) == tuple(v.shape) for k, v in sd.items())
    direct = convert_wan_vae_to_diffusers(wan)
    assert set(direct) == set(out) and all(direct[k] is out[k] for k in out)


# --- (c) tiling -------------------------------------------------------------------------------------------


def test_tiling_is_close_to_untiled_and_equals_the_library_tiling():
    """Tiles of 128 px every 96 px on 192 x 192 frames.  The mid-block attention mixes every position, so no
    tiling can reproduce it on random weights: it is switched off here (its output projection zeroed); the rest
    of the VAE is local, so away from the seams the tiled result equals the untiled one, and along the seams it
    differs (the tiles were really used).  One frame: the causal cache widens the reach of later frames.  The tiled
    result is the library's own tiling."""
    model = _make(SPEC_TINY, 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attentions.0.proj" in name:
                p.zero_()
    v = _video(F=1, H=192, W=192, seed=6)
    plain = WanVAE(copy.deepcopy(model))
    tiled = WanVAE(copy.deepcopy(model), tiling=True, tile_size=128, tile_stride=96)
    assert tiled.model.use_tiling and tiled.model.tile_sample_min_height == 128 and tiled.model.tile_sample_stride_width == 96
    z_plain, z_tiled = plain.encode(v), tiled.encode(v)
    assert z_tiled.shape == z_plain.shape == (1, 16, 1, 24, 24)
    # inside the first and the last tile (the reach of the random convolutions fades with distance)
    torch.testing.assert_close(z_tiled[..., :5, :5], z_plain[..., :5, :5], rtol=0, atol=1e-4)
    torch.testing.assert_close(z_tiled[..., -3:, -3:], z_plain[..., -3:, -3:], rtol=0, atol=1e-4)
    assert float((z_tiled - z_plain)[..., 8:16, 8:16].abs().amax()) > 1e-2  # the seams
    x_plain, x_tiled = plain.decode(z_plain), tiled.decode(z_plain)
    assert x_tiled.shape == x_plain.shape == v.shape
    torch.testing.assert_close(x_tiled[..., :32, :32], x_plain[..., :32, :32], rtol=0, atol=1e-4)
    assert float((x_tiled - x_plain)[..., 80:160, 80:160].abs().amax()) > 1e-2
    # the same tiles as the library's own tiling
    lib = copy.deepcopy(model)
    lib.enable_tiling(tile_sample_min_height=128, tile_sample_min_width=128, tile_sample_stride_height=96, tile_sample_stride_width=96)
    torch.testing.assert_close(z_tiled, _ref_encode(lib, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_tiled, _ref_decode(lib, z_plain), rtol=1e-4, atol=1e-4)
    tiled.set_tiling(False)
    assert not tiled.model.use_tiling and not tiled.tiling


# --- (d) errors -------------------------------------------------------------------------------------------


def test_frame_count_and_size_errors(tiny):
    _, root = tiny
    vae = WanVAE.from_pretrained(root)
    for F in (2, 4, 6, 8):
        with pytest.raises(ValueError, match=rf"4k \+ 1 \(1, 5, 9, 13, \.\.\.\).*F={F}"):
            vae.encode(_video(F=F))
    with pytest.raises(ValueError, match="multiples of 8, got 20x16"):
        vae.encode(_video(F=1, H=20, W=16))
    with pytest.raises(ValueError, match="multiples of 8, got 16x12"):
        vae.encode(_video(F=1, H=16, W=12))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        vae.encode(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match="5-d tensor"):
        vae.encode(torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match="16 channels"):
        vae.decode(torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(ValueError, match="multiples of the spatial stride 8"):
        vae.set_tiling(True, tile_size=30, tile_stride=24)
    with pytest.raises(ValueError, match="must not exceed tile_size"):
        vae.set_tiling(True, tile_size=32, tile_stride=40)
    with pytest.raises(ValueError, match="dtype must be"):
        WanVAE.from_pretrained(root, dtype=torch.int8)


def test_bad_files_raise(tiny, tmp_path):
    model, root = tiny
    with pytest.raises(FileNotFoundError, match="no such directory"):
        WanVAE.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither vae/config.json"):
        WanVAE.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        WanVAE.from_wan(tmp_path / "missing.pth", config=SPEC_TINY)
    wan = _to_wan(model.state_dict(), 1)
    torch.save(dict(wan, **{"model.diffusion_model.head.modulation": torch.zeros(1)}), tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match=r"1 unexpected \['model\.diffusion_model\.head\.modulation'\]"):
        WanVAE.from_wan(tmp_path / "foreign.pth", config=SPEC_TINY)
    torch.save({k: t for k, t in wan.items() if k != "decoder.head.0.gamma"}, tmp_path / "incomplete.pth")
    with pytest.raises(CheckpointError, match=r"1 missing \['decoder\.norm_out\.gamma'\]"):
        WanVAE.from_wan(tmp_path / "incomplete.pth", config=SPEC_TINY)
    torch.save(wan, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError, match="mis-shaped"):  # the tiny weights against the full Wan2.1 config
        WanVAE.from_wan(tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(ValueError, match="describes a 'AutoencoderKL'"):
        WanVAE.from_wan(tmp_path / "Wan2.1_VAE.pth", config={"_class_name": "AutoencoderKL"})
    with pytest.raises(TypeError, match="config must be None, a dict or a path"):
        WanVAE.from_wan(tmp_path / "Wan2.1_VAE.pth", config=3)


def test_missing_diffusers_names_the_package(tiny, monkeypatch):
    _, root = tiny
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match="pip install diffusers"):
        WanVAE.from_pretrained(root)
