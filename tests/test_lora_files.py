"""LoRA files (ospfn.lora.io) against the libraries that define them: diffusers and PEFT.

A tiny random diffusers ``WanTransformer3DModel`` is the oracle; ospfn runs the same weights (converted to Wan
names by the project's loader) with ``forward(..., lora=adapter)``.

* an adapter saved by ospfn in the diffusers layout, loaded by diffusers (``load_lora_adapter`` and the
  pipeline's ``load_lora_weights``), gives diffusers the output ospfn computes with the adapter;
* an adapter made by PEFT on the diffusers model (per-module ranks and alphas, ``lora_bias``) and saved by
  diffusers (pipeline and model writers) loads into ospfn with the same output;
* the PEFT layout both ways through PEFT itself (``PeftModel.from_pretrained``, ``save_pretrained`` with rsLoRA);
* original-Wan and musubi-tuner files, written here from the test's own key tables (alpha != rank,
  ``lora_down`` / ``lora_up``, ``diff_b``), load into an adapter that computes the known adapter's output, and
  equal what diffusers' own converters make of the same files;
* save -> load is bit-exact; bad files give errors that name the file and the keys.

fp32 on the CPU; tolerance 1e-4 relative (the project's diffusers parity tolerance), and every comparison checks
that the adapter changes the output by far more than that.
"""

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (pip install -e .[dev])")
peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install -e .[dev])")

import ospfn.model as M  # noqa: E402
from ospfn.lora import LoraAdapter, LoraConfig, init_lora  # noqa: E402
from ospfn.lora.io import LoraFileError, detect_lora_format, load_lora, read_lora_metadata, save_lora  # noqa: E402
from ospfn.model.checkpoint import convert_state_dict  # noqa: E402

TOL = 1e-4
ALL = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
       "cross_attn.o", "ffn.0", "ffn.2")  # fmt: skip
# the test's own name tables (Wan original -> diffusers module inside a block; -> musubi's flattened name)
DIFF = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v", "self_attn.o": "attn1.to_out.0",
        "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
        "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}  # fmt: skip
MUSUBI = {"self_attn.q": "self_attn_q", "self_attn.k": "self_attn_k", "self_attn.v": "self_attn_v", "self_attn.o": "self_attn_o",
          "cross_attn.q": "cross_attn_q", "cross_attn.k": "cross_attn_k", "cross_attn.v": "cross_attn_v", "cross_attn.o": "cross_attn_o",
          "ffn.0": "ffn_0", "ffn.2": "ffn_2"}  # fmt: skip
LAYERS = 2


def rel(a, b):
    return float((a - b).norm() / b.norm())


_BASE = {}


def base():
    """(diffusers model, ospfn cfg, ospfn params, inputs): tiny, random, built once."""
    if not _BASE:
        torch.manual_seed(0)
        m = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=96, num_layers=LAYERS,
        ).eval()  # fmt: skip
        with torch.no_grad():
            for prm in m.parameters():
                prm.add_(torch.randn_like(prm) * 0.05)
        cfg = M.DiTConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=LAYERS, in_dim=16, out_dim=16, text_dim=32, freq_dim=32, text_len=8)
        g = torch.Generator().manual_seed(3)
        inputs = (torch.randn(2, 16, 2, 6, 8, generator=g), torch.tensor([912.0, 250.0]), torch.randn(2, 8, 32, generator=g))
        _BASE.update(m=m, cfg=cfg, params=convert_state_dict(m.state_dict(), "diffusers", "wan"), inputs=inputs)
    return copy.deepcopy(_BASE["m"]), _BASE["cfg"], _BASE["params"], _BASE["inputs"]


def run_diffusers(m):
    with torch.no_grad():
        return m(*base()[3]).sample


def run_ospfn(lora=None):
    _, cfg, params, (x, t, ctx) = base()
    with torch.no_grad():
        return M.forward(params, cfg, x, t, ctx, lora=lora)


def trained(rank=4, alpha=6.0, targets=ALL, seed=1, bias=("blocks.0.self_attn.o", "blocks.1.ffn.2", "blocks.1.cross_attn.k"), dtype=torch.float32):
    """A known adapter with non-zero A and B (as after training) and a bias delta on a few modules."""
    cfg = base()[1]
    ad = init_lora(cfg, LoraConfig(rank=rank, alpha=alpha, targets=targets), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    w = {k: v + 0.15 * torch.randn(v.shape, generator=g) for k, v in ad.weights.items()}
    for mod in bias:
        if mod + ".lora_B" in w:
            w[mod + ".lora_bias"] = 0.1 * torch.randn(w[mod + ".lora_B"].shape[0], generator=g)
    return LoraAdapter(ad.config, {k: v.to(dtype) for k, v in w.items()})


def assert_matches(got, want, base_out):
    assert rel(got, want) < TOL, rel(got, want)
    assert rel(base_out, want) > 100 * TOL  # the adapter matters: a pass is no coincidence


# ------------------------------------------------------------------------------------------------ diffusers


@pytest.mark.parametrize("loader", ["load_lora_adapter", "WanPipeline.load_lora_weights"])
def test_ospfn_diffusers_file_runs_in_diffusers(tmp_path, loader):
    ad = trained()  # scale 1.5, FFN included, lora_bias on three modules
    file = save_lora(tmp_path, ad)
    assert file == tmp_path / "pytorch_lora_weights.safetensors"
    assert detect_lora_format(tmp_path) == "diffusers"
    m = base()[0]
    if loader == "load_lora_adapter":
        m.load_lora_adapter(str(tmp_path), use_safetensors=True, adapter_name="ospfn")
    else:
        diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=m, scheduler=None).load_lora_weights(str(tmp_path))
    assert_matches(run_ospfn(ad), run_diffusers(m), run_ospfn())
    # the keys are diffusers' module names, prefixed transformer., and the config is diffusers' metadata
    keys = load_file(file)
    assert "transformer.blocks.1.attn1.to_out.0.lora_B.weight" in keys and "transformer.blocks.0.ffn.net.2.lora_A.weight" in keys


def _peft_on_diffusers(m, seed=7, **cfg_kw):
    """A PEFT adapter on the diffusers model with non-zero A, B and bias (as after training)."""
    m.add_adapter(peft.LoraConfig(**cfg_kw), adapter_name="default")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if ".lora_" in name:
                prm.add_(0.2 * torch.randn(prm.shape, generator=g))
    return m


PEFT_CFG = dict(
    r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_out.0", "ffn.net.0.proj", "ffn.net.2"], lora_bias=True,
    rank_pattern={"attn2.to_k": 2}, alpha_pattern={"ffn.net.0.proj": 3, "blocks.1.attn1.to_q": 12},
)  # fmt: skip


@pytest.mark.filterwarnings("ignore:Adapter 'default'.*invalid shape")  # PEFT's own warning about its lora_B.bias when saving
@pytest.mark.parametrize("writer", ["WanPipeline.save_lora_weights", "save_lora_adapter"])
def test_peft_adapter_saved_by_diffusers_loads_in_ospfn(tmp_path, writer):
    m = _peft_on_diffusers(base()[0], **PEFT_CFG)
    want = run_diffusers(m)
    if writer == "save_lora_adapter":  # the model's writer: keys and metadata without the transformer. prefix
        m.save_lora_adapter(str(tmp_path))
    else:
        diffusers.WanPipeline.save_lora_weights(
            str(tmp_path), transformer_lora_layers=peft.get_peft_model_state_dict(m),
            transformer_lora_adapter_metadata=m.peft_config["default"].to_dict(),
        )  # fmt: skip
    assert detect_lora_format(tmp_path) == "diffusers"
    ad = load_lora(tmp_path, base()[1])
    assert ad.config.rank == 4 and ad.config.targets == ("self_attn.q", "self_attn.k", "self_attn.o", "cross_attn.q", "cross_attn.k",
                                                        "cross_attn.o", "ffn.0", "ffn.2")  # fmt: skip
    assert ad.scale == 1.5  # the most common scale; rank 2 of attn2.to_k is padded with zeros
    assert not ad.weights["blocks.0.cross_attn.k.lora_A"][2:].any()
    assert_matches(run_ospfn(ad), want, run_ospfn())


# ------------------------------------------------------------------------------------------------ PEFT


def test_ospfn_peft_layout_loads_in_peft(tmp_path):
    ad = trained(rank=4, alpha=8.0, bias=())
    save_lora(tmp_path, ad, format="peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert detect_lora_format(tmp_path) == "peft"
    pm = peft.PeftModel.from_pretrained(base()[0], str(tmp_path))
    assert_matches(run_ospfn(ad), run_diffusers(pm), run_ospfn())


def test_peft_save_pretrained_loads_in_ospfn(tmp_path):
    cfg = dict(r=4, lora_alpha=6, target_modules=["to_v", "to_out.0"], rank_pattern={"attn2.to_v": 2},
               alpha_pattern={"blocks.1.attn1.to_out.0": 12}, use_rslora=True, init_lora_weights="gaussian")  # fmt: skip
    pm = peft.get_peft_model(base()[0], peft.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, prm in pm.named_parameters():
            if ".lora_" in name:
                prm.add_(0.2 * torch.randn(prm.shape, generator=g))
    want = run_diffusers(pm)
    pm.save_pretrained(str(tmp_path))
    ad = load_lora(tmp_path / "adapter_model.safetensors", base()[1])  # the weights file: its config is found beside it
    assert ad.config.targets == ("self_attn.v", "self_attn.o", "cross_attn.v", "cross_attn.o")
    assert ad.config.scale == pytest.approx(6 / 2)  # rsLoRA: alpha / sqrt(r)
    assert_matches(run_ospfn(ad), want, run_ospfn())


# ------------------------------------------------------------------------------------------------ Wan / musubi


def _alpha_of(i, name):
    """Per-module alphas of the test files (rank 4): mostly 2 (scale 0.5), some 8, one module without alpha."""
    return {("self_attn.k", 0): 8.0, ("ffn.2", 1): 8.0, ("cross_attn.v", 1): None}.get((name, i), 2.0)


def wan_file(ad, style):
    """An original-Wan state dict describing exactly ``ad``'s deltas, by the test's own key table."""
    down, up = ("lora_down", "lora_up") if style == "down_up" else ("lora_A", "lora_B")
    sd = {}
    for mod in ad.modules():
        _, i, name = mod.split(".", 2)
        alpha = _alpha_of(int(i), name)
        file_scale = 1.0 if alpha is None else alpha / ad.config.rank
        key = f"diffusion_model.blocks.{i}.{name}"
        sd[f"{key}.{down}.weight"] = ad.weights[mod + ".lora_A"].clone()
        sd[f"{key}.{up}.weight"] = ad.weights[mod + ".lora_B"] * (ad.scale / file_scale)
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
        if mod + ".lora_bias" in ad.weights:
            sd[f"{key}.diff_b"] = ad.weights[mod + ".lora_bias"].clone()
    sd["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(48)  # zero norm deltas, as Wan files carry them
    sd["diffusion_model.blocks.0.norm3.diff_b"] = torch.zeros(48)
    return sd


def musubi_file(ad):
    sd = {}
    for mod in ad.modules():
        _, i, name = mod.split(".", 2)
        alpha = _alpha_of(int(i), name) or 4.0  # musubi always writes alpha
        key = f"lora_unet_blocks_{i}_{MUSUBI[name]}"
        sd[f"{key}.lora_down.weight"] = ad.weights[mod + ".lora_A"].clone()
        sd[f"{key}.lora_up.weight"] = ad.weights[mod + ".lora_B"] * (ad.scale / (alpha / ad.config.rank))
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


@pytest.mark.parametrize("kind", ["wan_down_up", "wan_A_B", "musubi"])
def test_wan_and_musubi_files(tmp_path, kind):
    with_bias = kind != "musubi"  # musubi-tuner writes no bias deltas
    ad = trained(bias=("blocks.0.self_attn.o", "blocks.1.ffn.2") if with_bias else ())
    sd = musubi_file(ad) if kind == "musubi" else wan_file(ad, kind[4:])
    file = tmp_path / "lora.safetensors"
    save_file(sd, str(file))
    assert detect_lora_format(file) == ("musubi" if kind == "musubi" else "wan")
    got = load_lora(file, base()[1])
    assert got.config.rank == 4 and got.scale == 0.5  # the most common alpha (2) over the rank
    assert ("blocks.0.self_attn.o.lora_bias" in got.weights) == with_bias
    want = run_ospfn(ad)
    assert_matches(run_ospfn(got), want, run_ospfn())
    # diffusers' own converter of the same file is a second, independent reading
    m = base()[0]
    converted = diffusers.WanPipeline.lora_state_dict(str(file))
    m.load_lora_adapter(converted, prefix="transformer")
    assert_matches(run_ospfn(got), run_diffusers(m), run_ospfn())


def test_wan_names_without_prefix_and_bias_only_module(tmp_path):
    ad = trained(targets=("self_attn.q", "ffn.0"), bias=())
    sd = {}
    for mod in ad.modules():
        sd[mod + ".lora_A.weight"] = ad.weights[mod + ".lora_A"]
        sd[mod + ".lora_B.weight"] = ad.weights[mod + ".lora_B"] * ad.scale  # no alpha: scale 1
    bias = torch.randn(96)
    sd["blocks.1.ffn.0.diff_b"] = bias  # a bias delta without factors
    assert detect_lora_format(sd) == "wan"
    save_file(sd, str(tmp_path / "w.safetensors"))
    got = load_lora(tmp_path / "w.safetensors", base()[1])
    assert torch.equal(got.weights["blocks.1.ffn.0.lora_bias"], bias)
    assert got.config.rank == 4 and got.scale == 1.0
    # the bias-only module: zero factors of the right shapes
    want_b = {**ad.weights, "blocks.1.ffn.0.lora_bias": bias}
    assert_matches(run_ospfn(got), run_ospfn(LoraAdapter(ad.config, want_b)), run_ospfn())


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", ["diffusers", "peft", "peft-wan-names"])
def test_round_trip_is_bit_exact(tmp_path, fmt, dtype):
    ad = LoraAdapter(LoraConfig(rank=4, alpha=8.0, targets=ALL, init="kaiming"), trained(dtype=dtype).weights)  # scale 2
    kw = dict(format="peft", module_names="wan") if fmt == "peft-wan-names" else dict(format=fmt)
    save_lora(tmp_path, ad, metadata={"note": "run 7"}, **kw)
    back = load_lora(tmp_path, base()[1])
    assert back.config == ad.config
    assert list(back.weights) == list(ad.weights)
    assert all(back.weights[k].dtype == dtype and torch.equal(back.weights[k], v) for k, v in ad.weights.items())
    assert read_lora_metadata(tmp_path)["note"] == "run 7"
    if fmt == "peft-wan-names":
        assert "base_model.model.blocks.0.self_attn.q.lora_A.weight" in load_file(tmp_path / "adapter_model.safetensors")


def test_peft_bin_with_wan_names(tmp_path):
    """OSP-Next's RL saves PEFT adapters as adapter_model.bin with Wan's module names."""
    ad = trained(rank=4, alpha=8.0, targets=ALL[:8], bias=())
    save_lora(tmp_path, ad, format="peft", module_names="wan")
    sd = load_file(tmp_path / "adapter_model.safetensors")
    torch.save(sd, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    assert detect_lora_format(tmp_path) == "peft"
    back = load_lora(tmp_path, base()[1], dtype=torch.bfloat16)
    assert all(back.weights[k].dtype == torch.bfloat16 and torch.equal(back.weights[k], v.bfloat16()) for k, v in ad.weights.items())


def test_bias_round_trip_with_a_scale_not_a_power_of_two(tmp_path):
    ad = trained(rank=3, alpha=1.0)  # PEFT scales lora_B.bias: written / 3, read * 3, each rounded once
    save_lora(tmp_path, ad)
    back = load_lora(tmp_path)
    for k, v in ad.weights.items():
        if k.endswith("lora_bias"):
            assert torch.allclose(back.weights[k], v, rtol=2**-22, atol=0)
        else:
            assert torch.equal(back.weights[k], v)


def test_overwrite_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    save_lora(tmp_path, trained(seed=1))
    before = (tmp_path / "pytorch_lora_weights.safetensors").read_bytes()

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_lora(tmp_path, trained(seed=2))
    assert (tmp_path / "pytorch_lora_weights.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytorch_lora_weights.safetensors"]  # no temporary left


# ------------------------------------------------------------------------------------------------ errors


def test_not_a_lora(tmp_path):
    _, cfg, params, _ = base()
    M.save_checkpoint(params, tmp_path / "model.safetensors")
    with pytest.raises(LoraFileError, match=r"model\.safetensors: not a LoRA file: none of its \d+ key\(s\)"):
        load_lora(tmp_path / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(LoraFileError, match=r"junk\.safetensors.*not a safetensors file"):
        load_lora(tmp_path / "junk.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraFileError, match=r"empty is not a LoRA directory"):
        load_lora(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_lora(tmp_path / "nope")
    with pytest.raises(LoraFileError, match="not a LoRA file"):
        detect_lora_format({"blocks.0.self_attn.q.weight": torch.zeros(1)})


def test_foreign_keys_are_listed_or_skipped(tmp_path):
    save_lora(tmp_path, trained(bias=()))
    file = tmp_path / "pytorch_lora_weights.safetensors"
    sd = load_file(file)
    sd["transformer.proj_out.lora_A.weight"] = torch.randn(4, 48)  # LoRA on the head: outside the blocks
    sd["transformer.proj_out.lora_B.weight"] = torch.randn(64, 4)
    sd["transformer.blocks.0.attn2.add_k_proj.lora_A.weight"] = torch.randn(4, 48)  # Wan I2V image projections
    save_file(sd, str(file))
    with pytest.raises(LoraFileError, match=r"pytorch_lora_weights\.safetensors: 3 key\(s\) cannot be held.*strict=False") as e:
        load_lora(tmp_path)
    for key in ("transformer.proj_out.lora_A.weight", "transformer.proj_out.lora_B.weight", "transformer.blocks.0.attn2.add_k_proj.lora_A.weight"):
        assert repr(key) in str(e.value)
    with pytest.warns(UserWarning, match=r"skipped \(strict=False\)"):
        got = load_lora(tmp_path, strict=False)
    assert len(got.modules()) == LAYERS * len(ALL)

    wan = wan_file(trained(bias=()), "down_up")
    wan["diffusion_model.blocks.0.norm3.diff"] = torch.ones(48)  # a non-zero norm delta cannot be a LoRA
    wan["diffusion_model.head.head.lora_down.weight"] = torch.randn(4, 48)
    save_file(wan, str(tmp_path / "wan.safetensors"))
    with pytest.raises(LoraFileError, match=r"2 key\(s\).*'diffusion_model\.blocks\.0\.norm3\.diff'.*head\.head"):
        load_lora(tmp_path / "wan.safetensors")


def test_shape_and_consistency_errors(tmp_path):
    save_lora(tmp_path / "a", trained())
    small = M.DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=LAYERS, in_dim=16, out_dim=16, text_dim=32, freq_dim=32)
    with pytest.raises(LoraFileError, match=r"a/pytorch_lora_weights\.safetensors does not fit model_cfg: .*blocks\.0\.self_attn\.q is a Linear 32 -> 32"):
        load_lora(tmp_path / "a", small)
    one = M.DiTConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=1, in_dim=16, out_dim=16, text_dim=32, freq_dim=32)
    with pytest.raises(LoraFileError, match=r"block indices \[1\] but the model has num_layers = 1"):
        load_lora(tmp_path / "a", one)

    sd = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    del sd["transformer.blocks.0.attn1.to_q.lora_B.weight"]
    save_file(sd, str(tmp_path / "half.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoraFileError, match=r"'transformer\.blocks\.0\.attn1\.to_q\.lora_A\.weight' has no matching up / B factor"):
        load_lora(tmp_path / "half.safetensors")
    sd = load_file(tmp_path / "a" / "pytorch_lora_weights.safetensors")
    sd["transformer.blocks.0.attn1.to_q.lora_B.weight"] = torch.zeros(48, 3)
    save_file(sd, str(tmp_path / "ranks.safetensors"))
    with pytest.raises(LoraFileError, match=r"blocks\.0\.self_attn\.q: .*\(4, 48\).*\(48, 3\) are not a LoRA pair"):
        load_lora(tmp_path / "ranks.safetensors")

    save_lora(tmp_path / "p", trained(), format="peft")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(LoraFileError, match=r"the LoraConfig says rank 8 for 'blocks\.0\.attn1\.to_q' but .* has rank 4"):
        load_lora(tmp_path / "p")
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoraFileError, match="DoRA adapters are not supported"):
        load_lora(tmp_path / "p")
    (tmp_path / "p" / "adapter_config.json").unlink()
    with pytest.raises(LoraFileError, match=r"PEFT weights need their adapter_config\.json"):
        load_lora(tmp_path / "p" / "adapter_model.safetensors")


def test_argument_errors(tmp_path):
    ad = trained()
    with pytest.raises(ValueError, match=r"format must be one of \('diffusers', 'peft'\), got 'wan'"):
        save_lora(tmp_path, ad, format="wan")
    with pytest.raises(TypeError, match="adapter must be an ospfn.lora.LoraAdapter, got dict"):
        save_lora(tmp_path, dict(ad.weights))
    with pytest.raises(TypeError, match=r"metadata must be a dict of str -> str"):
        save_lora(tmp_path, ad, metadata={"step": 3})
    with pytest.raises(ValueError, match=r"metadata keys \['lora_adapter_metadata'\] are reserved"):
        save_lora(tmp_path, ad, metadata={"lora_adapter_metadata": "{}"})
    with pytest.raises(ValueError, match="module_names must be 'diffusers' or 'wan'"):
        save_lora(tmp_path, ad, format="peft", module_names="musubi")
    assert not any(tmp_path.iterdir())  # nothing written by a refused call
    save_lora(tmp_path, ad)
    with pytest.raises(ValueError, match=r"format must be None \(detect\) or one of .*got 'kohya'"):
        load_lora(tmp_path, format="kohya")
    with pytest.raises(TypeError, match="model_cfg must be None or an ospfn.model.DiTConfig"):
        load_lora(tmp_path, {"dim": 48})


def test_docs_example_runs(tmp_path, monkeypatch):
    """The python example of docs/lora_files.md, run as written (in a scratch directory)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "lora_files.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for code in blocks:
            exec(compile(code, "docs/lora_files.md", "exec"), {})
