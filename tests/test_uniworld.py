"""Uniworld-OSP2.0 end to end: a qwen_vl latent cache, adapter-only training (local and FSDP2), the uniworld
export and pipeline, recipes/sample.py's flags and the config checks.

A tiny random Qwen2.5-VL (tests/vlm_tiny.py, no download), a tiny FlashI2V DiT whose text_dim is the adapter's,
the pixel VAE and ``SyntheticMotion`` clips.  References are computed here: ``QwenVLEncoder.encode`` on the same
(frame 0, caption) pairs for the cache, a held-out loss of this test's own (fixed noise and sigmas over
``split="eval"`` clips encoded the same way), and for ``generate`` the composition VLM encode -> ``uniworld_context``
-> ``ospfn.sched.sample`` -> VAE decode on the same noise.
"""

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

import vlm_tiny  # noqa: E402
from conftest import config_with  # noqa: E402

from ospfn.data import SyntheticMotion  # noqa: E402
from ospfn.data.latents import LatentDataset  # noqa: E402
from ospfn.model import DiTConfig, init_params  # noqa: E402
from ospfn.model.checkpoint import CheckpointError, load_checkpoint, read_safetensors, save_checkpoint  # noqa: E402
from ospfn.model.vlm import QwenVLEncoder, VLMAdapterConfig, init_adapter, to_released_adapter, uniworld_context  # noqa: E402
from ospfn.model.vae import PixelVAE  # noqa: E402
from ospfn.styles import STYLES, style_prompt  # noqa: E402
from ospfn.train.build import TrainError, make_trainer, prepare_from_config  # noqa: E402
from ospfn.train.config import ConfigError, load_config  # noqa: E402
from ospfn.train.sft import SFTConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT_LEN, MAX_CAP = 40, 16
OVERRIDES = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "num_full_blocks": 0, "text_dim": 16, "freq_dim": 16}
SIZE, FRAMES = (16, 16), 3
NEG = "bad blurry ugly"


def _dit_cfg():
    return DiTConfig.preset("tiny", **OVERRIDES, in_dim=12, out_dim=12, i2v="flashi2v", text_len=TEXT_LEN)


def _encoder(model, proc):
    return QwenVLEncoder(model, proc, image_size=vlm_tiny.IMAGE_SIZE, max_caption_tokens=MAX_CAP, max_length=TEXT_LEN)


BASE = {
    "model": {"preset": "tiny", "overrides": OVERRIDES, "train": False},
    "text": {"kind": "qwen_vl", "text_len": TEXT_LEN, "image_size": list(vlm_tiny.IMAGE_SIZE), "max_caption_tokens": MAX_CAP,
             "train": False},
    "adapter": {"hidden_dim": 32, "seed": 0},
    "vae": {"kind": "pixel", "spatial": 2},
    "data": {"kind": "latents", "frames": FRAMES, "buckets": [list(SIZE)], "seed": 0},
    "optim": {"lr": 1.0e-2, "warmup_steps": 1, "ema_decay": 0.9},
    "train": {"task": "flashi2v", "steps": 4, "batch_size": 4, "log_every": 1, "ckpt_every": 2, "keep": 10, "seed": 3},
    "sample": {"steps": 2, "shift": 3.0},
}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny VLM (saved to qwen/), a frozen DiT checkpoint, and the qwen_vl caches: train (32 clips), held-out
    eval (16), style-labelled (8)."""
    tmp = tmp_path_factory.mktemp("uniworld")
    model, proc = vlm_tiny.model(), vlm_tiny.processor()
    model.save_pretrained(tmp / "qwen")
    enc = _encoder(model, proc)
    vlm_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dcfg = _dit_cfg()
    params = init_params(dcfg, seed=0)
    g = torch.Generator().manual_seed(5)
    for k, v in params.items():  # Wan's init zeroes the head (and FlashI2V's last layers): make every path carry gradient
        if not v.any():
            params[k] = 0.05 * torch.randn(v.shape, generator=g)
    save_checkpoint(params, tmp / "dit", cfg=dcfg)
    base = config_with(BASE, tmp / "unused", **{"model.checkpoint": str(tmp / "dit"), "text.path": str(tmp / "qwen"),
                                                  "data.cache": str(tmp / "cache")})  # fmt: skip
    cfg = load_config(base, SFTConfig)
    kw = dict(text_encoder=enc, progress=False)
    prepare_from_config(cfg, dataset=SyntheticMotion(32, frames=FRAMES, size=SIZE, seed=0), **kw)
    prepare_from_config(cfg, out=tmp / "eval", dataset=SyntheticMotion(16, frames=FRAMES, size=SIZE, seed=0, split="eval"), **kw)
    prepare_from_config(cfg, out=tmp / "styled", dataset=SyntheticMotion(8, frames=FRAMES, size=SIZE, seed=0, styles="all"), **kw)
    return {"tmp": tmp, "model": model, "proc": proc, "enc": enc, "vlm_before": vlm_before, "dit": params, "dit_cfg": dcfg,
            "base": base}  # fmt: skip


def _cfg(world, out, **changes) -> dict:
    return config_with(world["base"], out, **changes)


def _write(tmp_path, cfg: dict) -> Path:
    p = tmp_path / f"cfg-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}_uniworld", ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(name, argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = _recipe(name).main(argv)
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _train(cfg_path: Path, *extra):
    rc, _, err = _run("train", ["--config", str(cfg_path), "--no-progress", "--device", "cpu", *extra])
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------------------
# the cache


def test_the_cache_holds_the_vlm_features_and_per_sample_empties(world):
    enc = world["enc"]
    ds = LatentDataset(world["tmp"] / "cache")
    t = ds.spec["text"]
    assert (t["kind"], t["vlm_dim"], t["text_dim"], t["text_len"]) == ("qwen_vl", vlm_tiny.HIDDEN, vlm_tiny.HIDDEN, TEXT_LEN)
    assert (t["image_size"], t["text_only"], t["max_caption_tokens"]) == (list(vlm_tiny.IMAGE_SIZE), False, MAX_CAP)
    assert ds.per_sample_empty and ds.empty_context is None and not (world["tmp"] / "cache" / "empty.safetensors").exists()
    src = SyntheticMotion(32, frames=FRAMES, size=SIZE, seed=0)
    for i in (0, 7, 31):
        item, ref = ds[i], src[i]
        frame0 = ref["video"][:, 0][None]
        assert item["caption"] == ref["caption"] and item["length"] == TEXT_LEN
        assert torch.equal(item["context"], enc.encode(frame0, [ref["caption"]])[0])
        assert torch.equal(item["empty_context"], enc.encode(frame0, [""])[0])
        assert not torch.equal(item["empty_context"], ds[i + 1 if i < 31 else 0]["empty_context"])  # it depends on the image
        assert torch.equal(item["latent"], PixelVAE(2).encode(ref["video"][None])[0])
    styled = LatentDataset(world["tmp"] / "styled")
    src = SyntheticMotion(8, frames=FRAMES, size=SIZE, seed=0, styles="all")
    for i in (0, 5):
        item, ref = styled[i], src[i]
        assert item["style"] == ref["style"] in STYLES
        assert torch.equal(item["context"], enc.encode(ref["video"][:, 0][None], [style_prompt(ref["caption"], ref["style"])])[0])
    # the VLM was only read
    assert all(torch.equal(v, world["vlm_before"][k]) for k, v in world["model"].state_dict().items())


def test_flow_matching_loss_takes_per_sample_empty_contexts():
    from ospfn.sched import flow_matching_loss

    cfg = _dit_cfg()
    params = init_params(cfg, seed=1)
    B = 4
    z0, s = torch.randn(B, 12, FRAMES, 8, 8), torch.randn(B, 12, 1, 8, 8)
    ctx, empty = torch.randn(B, 6, 16), torch.randn(B, 6, 16)
    seen = []

    def spy(p, c, x, t, context, image=None, run=None):
        seen.append(context)
        return torch.zeros_like(x)

    kw = dict(cond_image_latent=s, forward_fn=spy, return_parts=True)
    _, parts = flow_matching_loss(params, cfg, z0, ctx, generator=torch.Generator().manual_seed(11), empty_context=empty, text_drop=0.5, **kw)
    drop = parts["drop"]
    assert drop.any() and not drop.all()  # this seed drops some rows, not all
    for b in range(B):
        assert torch.equal(seen[0][b], empty[b] if drop[b] else ctx[b])  # each dropped row gets ITS empty context
    # text_drop 1: the loss of the empties themselves (same sigmas, noise and ratios)
    full = flow_matching_loss(params, cfg, z0, ctx, generator=torch.Generator().manual_seed(2), empty_context=empty, text_drop=1.0, cond_image_latent=s)
    ref = flow_matching_loss(params, cfg, z0, empty, generator=torch.Generator().manual_seed(2), text_drop=0.0, cond_image_latent=s)
    assert torch.equal(full, ref)


# ---------------------------------------------------------------------------------------------------------
# training


def _held_out_loss(world, adapter: dict, acfg) -> float:
    """Flow-matching loss of the held-out clips under ``adapter`` (frozen DiT; fixed sigmas, noise and ratios)."""
    from ospfn.sched import flow_matching_loss

    ev = LatentDataset(world["tmp"] / "eval")
    items = [ev[i] for i in range(len(ev))]
    z0 = torch.stack([it["latent"] for it in items])
    s = torch.stack([it["cond"] for it in items])
    feats = torch.stack([it["context"] for it in items])
    with torch.no_grad():
        ctx = uniworld_context(adapter, acfg, feats)
        loss = flow_matching_loss(world["dit"], world["dit_cfg"], z0, ctx, generator=torch.Generator().manual_seed(0), text_drop=0.0,
                                  cond_image_latent=s, shift=3.0)  # fmt: skip
    return float(loss)


def test_adapter_only_training_lowers_the_held_out_loss(world, tmp_path):
    cfg = load_config(_cfg(world, tmp_path / "run", **{"train.steps": 400}), SFTConfig)
    trainer = make_trainer(cfg, tmp_path / "run")
    acfg = trainer.parts.adapter_cfg
    assert acfg == VLMAdapterConfig(vlm_dim=vlm_tiny.HIDDEN, hidden_dim=32, text_dim=16, latent_channels=12)
    assert sorted(trainer.named) == ["ctx.adapter.0.bias", "ctx.adapter.0.weight", "ctx.adapter.2.bias", "ctx.adapter.2.weight"]
    assert {id(p) for p in trainer.trainable} == {id(p) for p in trainer.ctx.parameters()}
    assert not any(p.requires_grad for p in trainer.model.parameters())
    untrained = init_adapter(acfg, seed=0)
    assert all(torch.equal(trainer.named[f"ctx.{k}"].detach(), v) for k, v in untrained.items())  # adapter.seed
    before = _held_out_loss(world, untrained, acfg)
    for _ in range(400):
        trainer.train_step()
    trained = {k[len("ctx."):]: v.detach().clone() for k, v in trainer.named.items()}
    after = _held_out_loss(world, trained, acfg)
    assert after < 0.97 * before, (before, after)
    # the DiT and the VLM are bit-identical to what they were
    for k, v in dict(trainer.model.named_parameters()).items():
        assert torch.equal(v.detach(), world["dit"][k]), k
    assert all(torch.equal(v, world["vlm_before"][k]) for k, v in world["model"].state_dict().items())


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """recipes/train.py, 4 steps straight and 2 + resume + 2."""
    tmp = tmp_path_factory.mktemp("runs")
    straight, split = tmp / "straight", tmp / "split"
    _train(_write(tmp, _cfg(world, straight)))
    cfg = _write(tmp, _cfg(world, split))
    _train(cfg, "--stop-after", "2")
    assert not (split / "final").exists()
    _train(cfg, "--resume")
    return straight, split


def test_resume_is_exact_and_checkpoints_hold_the_adapter_only(runs):
    straight, split = runs
    a = read_safetensors(straight / "final" / "vlm_adapter.safetensors")
    b = read_safetensors(split / "final" / "vlm_adapter.safetensors")
    assert a.keys() == b.keys() == {"adapter.0.weight", "adapter.0.bias", "adapter.2.weight", "adapter.2.bias"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x)["loss"] for x in (straight / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (split / "log.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 4
    for run in (straight, split):
        for ck in run.glob("ckpt-*"):
            w = read_safetensors(ck / "model.safetensors")
            assert sorted(w) == sorted(f"ctx.{k}" for k in a)


def test_the_export_loads_as_uniworld_and_generate_is_the_composition(world, runs):
    from ospfn.pipeline import load_pipeline
    from ospfn.sched import sample

    final = runs[0] / "final"
    meta = json.loads((final / "ospfn_export.json").read_text())
    assert meta["model_type"] == "uniworld" and meta["text_encoder"]["kind"] == "qwen_vl"
    assert meta["text_encoder"]["path"] == str(world["tmp"] / "qwen") and meta["text_encoder"]["text_len"] == TEXT_LEN
    assert meta["adapter"]["file"] == "vlm_adapter.safetensors" and meta["adapter"]["hidden_dim"] == 32
    assert meta["vae"] == {"kind": "pixel", "spatial": 2} and meta["defaults"]["scheduler"] == "euler"
    enc = world["enc"]
    pipe = load_pipeline(final, vlm=enc)
    assert pipe.model_type == "uniworld" and pipe.text is enc and pipe.adapter_cfg.vlm_dim == vlm_tiny.HIDDEN
    assert all(torch.equal(pipe.params[k], world["dit"][k]) for k in world["dit"])  # the frozen DiT, unchanged
    adapter = read_safetensors(final / "vlm_adapter.safetensors")
    assert all(torch.equal(pipe.adapter[k], adapter[k]) for k in adapter)
    assert not torch.equal(adapter["adapter.2.weight"], init_adapter(pipe.adapter_cfg, seed=0)["adapter.2.weight"])  # trained

    src = SyntheticMotion(2, frames=FRAMES, size=SIZE, seed=4, split="eval")
    images = torch.stack([src[0]["video"][:, 0], src[1]["video"][:, 0]])
    prompts = [src[0]["caption"], src[1]["caption"]]
    video = pipe.generate(prompts, images, negative_prompt=NEG, steps=3, guidance=3.0, seed=7)
    # the reference: one VLM call with the images twice (prompts, then negatives), the adapter, the sampler
    vae = PixelVAE(2)
    feats = enc.encode(torch.cat([images, images]), prompts + [NEG, NEG])
    acfg = VLMAdapterConfig(vlm_dim=vlm_tiny.HIDDEN, hidden_dim=32, text_dim=16, latent_channels=12)
    ctx, neg = uniworld_context(adapter, acfg, feats[:2]), uniworld_context(adapter, acfg, feats[2:])
    cond = vae.encode(images[:, :, None])
    noise = torch.randn((2, 12, FRAMES, 8, 8), generator=torch.Generator().manual_seed(7))
    dit = load_checkpoint(final, world["dit_cfg"])
    z = sample(dit, world["dit_cfg"], noise=noise, context=ctx, neg_context=neg, guidance=3.0, steps=3, shift=3.0, cond_image_latent=cond,
               fourier_ratio=0.1)  # fmt: skip
    torch.testing.assert_close(video, vae.decode(z).clamp(-1, 1), rtol=0, atol=1e-6)
    # the export's VLM path with a processor of ours (transformers needs torchvision to read the processor files)
    with pytest.MonkeyPatch.context() as mp:
        orig = QwenVLEncoder.from_pretrained
        mp.setattr(QwenVLEncoder, "from_pretrained", classmethod(lambda cls, path, **kw: orig(path, processor=world["proc"], **kw)))
        again = load_pipeline(final)
    assert again.info["vlm"] == str(world["tmp"] / "qwen") and again.text.settings == enc.settings
    torch.testing.assert_close(again.generate(prompts, images, negative_prompt=NEG, steps=3, guidance=3.0, seed=7), video, rtol=0, atol=1e-6)


def test_cfg_encodes_the_negative_prompt_with_the_same_image(world, runs):
    from ospfn.pipeline import load_pipeline

    pipe = load_pipeline(runs[0] / "final", vlm=world["enc"])
    calls = []
    encode = pipe.text.encode

    def spy(images, prompts):
        calls.append((images.clone(), list(prompts)))
        return encode(images, prompts)

    src = SyntheticMotion(2, frames=FRAMES, size=SIZE, seed=1)
    images = torch.stack([src[0]["video"][:, 0], src[1]["video"][:, 0]])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipe.text, "encode", spy)
        pipe.generate(["a red circle", "a blue square"], images, negative_prompt=NEG, steps=1, guidance=2.0, style=["Lego", None])
        pipe.generate("a red circle", images[0], steps=1, guidance=1.0)
    (imgs, prompts), (imgs1, prompts1) = calls
    assert prompts == [style_prompt("a red circle", "Lego"), "a blue square", NEG, NEG]
    assert torch.equal(imgs[:2], imgs[2:]) and torch.equal(imgs[:2], images)
    assert prompts1 == ["a red circle"] and torch.equal(imgs1, images[:1])  # no guidance: no negative row


def test_text_offload_moves_or_releases_the_vlm(world, runs):
    from ospfn.pipeline import load_pipeline

    image = SyntheticMotion(1, frames=FRAMES, size=SIZE, seed=2)[0]["video"][:, 0]
    enc = _encoder(world["model"], world["proc"])  # a wrapper of our own: release drops its module
    pipe = load_pipeline(runs[0] / "final", vlm=enc, text_offload="cpu")
    a, b = (pipe.generate("a red circle", image, steps=1) for _ in range(2))
    assert torch.equal(a, b) and pipe._text_home == torch.device("cpu")
    pipe = load_pipeline(runs[0] / "final", vlm=enc, text_offload="release")
    assert torch.equal(pipe.generate("a red circle", image, steps=1), a) and enc.model is None
    with pytest.raises(RuntimeError, match="released"):
        pipe.generate("a red circle", image, steps=1)


def test_generate_with_first_frame_and_style_tokens(world):
    """The adapter's extra tokens in generate: the first-frame latent and the prompts' style ids."""
    from ospfn.pipeline import Pipeline
    from ospfn.sched import sample

    enc, dcfg = world["enc"], world["dit_cfg"]
    acfg = VLMAdapterConfig(vlm_dim=vlm_tiny.HIDDEN, hidden_dim=24, text_dim=16, first_frame_tokens=True, latent_channels=12, style_tokens=2)
    g = torch.Generator().manual_seed(3)
    adapter = {k: 0.2 * torch.randn(v.shape, generator=g) for k, v in init_adapter(acfg).items()}
    vae = PixelVAE(2)
    pipe = Pipeline(cfg=dcfg, params=world["dit"], text=enc, vae=vae, vae_spec={"kind": "pixel", "spatial": 2}, model_type="uniworld",
                    adapter=adapter, adapter_cfg=acfg)  # fmt: skip
    image = SyntheticMotion(1, frames=FRAMES, size=SIZE, seed=2)[0]["video"][:, 0]
    video = pipe.generate("a red circle", image, style="pixel_art", negative_prompt=NEG, steps=2, guidance=2.0, shift=3.0, seed=1, size=SIZE,
                          frames=FRAMES)  # fmt: skip
    prompt = style_prompt("a red circle", "Pixel art")
    feats = enc.encode(torch.stack([image, image]), [prompt, NEG])
    cond = vae.encode(image[None, :, None])
    ctx = uniworld_context(adapter, acfg, feats[:1], first_frame=cond, style=[STYLES.index("Pixel art")])
    neg = uniworld_context(adapter, acfg, feats[1:], first_frame=cond, style=[STYLES.index("Pixel art")])
    assert ctx.shape == (1, TEXT_LEN + 16 + 2, 16)  # 8 x 8 latent -> 16 first-frame tokens, 2 style tokens
    noise = torch.randn((1, 12, FRAMES, 8, 8), generator=torch.Generator().manual_seed(1))
    z = sample(world["dit"], dcfg, noise=noise, context=ctx, neg_context=neg, guidance=2.0, steps=2, shift=3.0, cond_image_latent=cond)
    torch.testing.assert_close(video, vae.decode(z).clamp(-1, 1)[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="every prompt a style or none"):
        pipe.generate(["a", "b"], torch.stack([image, image]), style=["Lego", None], steps=1, size=SIZE, frames=FRAMES)
    with pytest.raises(ValueError, match="adapter vlm_dim 99 != the VLM's width 32"):
        Pipeline(cfg=dcfg, params=world["dit"], text=enc, vae=vae, vae_spec={"kind": "pixel", "spatial": 2}, model_type="uniworld",
                 adapter=init_adapter(VLMAdapterConfig(vlm_dim=99, hidden_dim=8, text_dim=16)),
                 adapter_cfg=VLMAdapterConfig(vlm_dim=99, hidden_dim=8, text_dim=16))  # fmt: skip


def test_load_a_flashi2v_pipeline_as_uniworld(world, tmp_path):
    from ospfn.model.text import TinyTextConfig, init_tiny_text_params
    from ospfn.pipeline import load_pipeline, save_pipeline

    tcfg = TinyTextConfig(text_dim=16, text_len=8, vocab=64)
    save_pipeline(tmp_path / "flashi2v", cfg=world["dit_cfg"], params=world["dit"], text_params=init_tiny_text_params(tcfg), text_cfg=tcfg,
                  vae={"kind": "pixel", "spatial": 2}, defaults={"size": list(SIZE), "frames": FRAMES})  # fmt: skip
    acfg = VLMAdapterConfig(vlm_dim=vlm_tiny.HIDDEN, hidden_dim=32, text_dim=16)
    adapter = init_adapter(acfg, seed=9)
    torch.save({f"module.{k}": v for k, v in to_released_adapter(adapter).items()}, tmp_path / "released.pt")  # the released layout
    pipe = load_pipeline(tmp_path / "flashi2v", model_type="uniworld", vlm=world["enc"], adapter=tmp_path / "released.pt")
    assert pipe.model_type == "uniworld" and pipe.adapter_cfg == VLMAdapterConfig(vlm_dim=vlm_tiny.HIDDEN, hidden_dim=32, text_dim=16,
                                                                                  latent_channels=12)  # fmt: skip
    assert all(torch.equal(pipe.adapter[k], adapter[k]) for k in adapter)
    image = SyntheticMotion(1, frames=FRAMES, size=SIZE, seed=2)[0]["video"][:, 0]
    assert pipe.generate("a red circle", image, steps=1).shape == (3, FRAMES, *SIZE)
    with pytest.raises(ValueError, match=r"needs vlm="):
        load_pipeline(tmp_path / "flashi2v", model_type="uniworld", adapter=tmp_path / "released.pt")
    with pytest.raises(ValueError, match=r"needs adapter="):
        load_pipeline(tmp_path / "flashi2v", model_type="uniworld", vlm=world["enc"])
    with pytest.raises(ValueError, match=r"vlm= / adapter= .*model_type='uniworld'"):
        load_pipeline(tmp_path / "flashi2v", vlm=world["enc"])
    wide = init_adapter(VLMAdapterConfig(vlm_dim=vlm_tiny.HIDDEN, hidden_dim=8, text_dim=24))
    torch.save(to_released_adapter(wide), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"wide\.pt does not fit .*text_dim 24 != 16"):
        load_pipeline(tmp_path / "flashi2v", model_type="uniworld", vlm=world["enc"], adapter=tmp_path / "wide.pt")


def test_lora_with_extra_tokens_trains_both_and_the_export_merges_the_lora(world, tmp_path):
    """A qwen_vl run with a LoRA, first-frame and style tokens on the style-labelled cache (the I2SV recipe's shape)."""
    from ospfn.lora import load_lora
    from ospfn.lora.merge import merge_lora
    from ospfn.pipeline import load_pipeline

    changes = {"data.cache": str(world["tmp"] / "styled"), "model.train": None, "train.steps": 2, "train.batch_size": 2,
               "adapter": {"hidden_dim": 32, "first_frame_tokens": True, "style_tokens": 2, "seed": 1},
               "lora": {"rank": 2, "alpha": 2.0, "targets": ["cross_attn.q", "cross_attn.k"], "seed": 0}}  # fmt: skip
    cfg_dict = _cfg(world, tmp_path / "run", **changes)
    del cfg_dict["model"]["train"]
    cfg = load_config(cfg_dict, SFTConfig)
    trainer = make_trainer(cfg, tmp_path / "run")
    names = set(trainer.named)
    assert {n.split(".", 1)[0] for n in names} == {"ctx", "lora"}
    assert {"ctx.first_frame.2.weight", "ctx.style_tokens"} <= names
    seen = []
    fwd = trainer.model.forward

    def spy(x, t, context, **kw):
        seen.append(context.shape)
        return fwd(x, t, context, **kw)

    trainer.model.forward = spy
    before = {k: v.detach().clone() for k, v in trainer.named.items()}
    for _ in range(2):
        trainer.train_step()
    assert seen[0] == (2, TEXT_LEN + 16 + 2, 16)  # VLM tokens, first-frame tokens, style tokens
    moved = {k for k in names if not torch.equal(before[k], trainer.named[k].detach())}
    assert {"ctx.first_frame.2.weight", "ctx.style_tokens", "ctx.adapter.0.weight"} <= moved and any(k.startswith("lora.") for k in moved)
    for k, v in world["dit"].items():  # the base DiT stays frozen
        assert torch.equal(dict(trainer.model.named_parameters())[k].detach(), v)
    del trainer.model.forward
    final = trainer.export(tmp_path / "final")
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", "ospfn_export.json",
                                                       "pytorch_lora_weights.safetensors", "vlm_adapter.safetensors"]  # fmt: skip
    pipe = load_pipeline(final, vlm=world["enc"])
    assert pipe.adapter_cfg.first_frame_tokens and pipe.adapter_cfg.style_tokens == 2 and pipe.info["lora"]["merged"]
    merged = merge_lora(world["dit"], load_lora(final / "pytorch_lora_weights.safetensors", world["dit_cfg"]))
    assert all(torch.equal(pipe.params[k], merged[k]) for k in merged)
    assert not torch.equal(pipe.params["blocks.0.cross_attn.q.weight"], world["dit"]["blocks.0.cross_attn.q.weight"])


def test_a_frozen_adapter_stays_and_travels_with_the_lora_export(world, tmp_path):
    """adapter.train: false (the released I2SV recipe): only the LoRA trains; the export carries the frozen adapter."""
    from ospfn.pipeline import read_vlm_adapter, save_vlm_adapter

    acfg = VLMAdapterConfig(vlm_dim=vlm_tiny.HIDDEN, hidden_dim=32, text_dim=16, latent_channels=12)
    start = init_adapter(acfg, seed=7)
    save_vlm_adapter(tmp_path / "a.safetensors", start, acfg)
    changes = {"model.train": None, "train.steps": 2, "adapter": {"hidden_dim": 32, "checkpoint": str(tmp_path / "a.safetensors"), "train": False},
               "lora": {"rank": 2, "alpha": 2.0, "seed": 0}}  # fmt: skip
    cfg_dict = _cfg(world, tmp_path / "run", **changes)
    del cfg_dict["model"]["train"]
    trainer = make_trainer(load_config(cfg_dict, SFTConfig), tmp_path / "run")
    assert trainer.named and all(k.startswith("lora.") for k in trainer.named)
    for _ in range(2):
        trainer.train_step()
    assert all(torch.equal(v.detach(), start[k]) for k, v in trainer.ctx.named_parameters())
    final = trainer.export(tmp_path / "final")
    got, _ = read_vlm_adapter(final / "vlm_adapter.safetensors")
    assert got.keys() == start.keys() and all(torch.equal(got[k], start[k]) for k in start)


@pytest.mark.parametrize(
    "adapter, message",
    [({"hidden_dim": 32, "train": False}, r"adapter\.checkpoint must name the adapter to keep frozen"),
     ({"hidden_dim": 32, "train": False, "checkpoint": "a.pt"}, r"adapter\.train is false, and neither a lora section nor model\.train")],
)  # fmt: skip
def test_a_frozen_adapter_needs_weights_and_something_to_train(world, tmp_path, adapter, message):
    cfg = _cfg(world, tmp_path / "r", adapter=adapter)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg, SFTConfig)


def test_a_cache_that_does_not_fit_is_refused(world, tmp_path):
    cfg = load_config(_cfg(world, tmp_path / "r", **{"text.image_size": [28, 28]}), SFTConfig)
    with pytest.raises(TrainError, match=r"text\.image_size is \[28, 28\], the cache's VLM read \[56, 84\]"):
        make_trainer(cfg, tmp_path / "r")
    cfg = load_config(_cfg(world, tmp_path / "r", **{"adapter.style_tokens": 2}), SFTConfig)
    with pytest.raises(TrainError, match=r"adapter\.style_tokens is 2: every sample needs a style label, 32 of 32 have none"):
        make_trainer(cfg, tmp_path / "r")
    cfg = load_config(_cfg(world, tmp_path / "r", **{"text.max_caption_tokens": 8}), SFTConfig)
    with pytest.raises(TrainError, match="text: the VLM encoder does not match the config: text.max_caption_tokens is 8, the encoder's is 16"):
        prepare_from_config(cfg, out=tmp_path / "c", text_encoder=world["enc"], dataset=SyntheticMotion(2, frames=FRAMES, size=SIZE))
    cfg = load_config(_cfg(world, tmp_path / "r", **{"adapter.checkpoint": str(tmp_path / "none.pt")}), SFTConfig)
    with pytest.raises(TrainError, match=r"adapter\.checkpoint: no such file"):
        make_trainer(cfg, tmp_path / "r")
    wrong = init_adapter(VLMAdapterConfig(vlm_dim=vlm_tiny.HIDDEN, hidden_dim=8, text_dim=16))
    torch.save(to_released_adapter(wrong), tmp_path / "wrong.pt")
    cfg = load_config(_cfg(world, tmp_path / "r", **{"adapter.checkpoint": str(tmp_path / "wrong.pt")}), SFTConfig)
    with pytest.raises(TrainError, match=r"adapter\.checkpoint: .*does not fit the adapter \(adapter\.hidden_dim 32"):
        make_trainer(cfg, tmp_path / "r")


def test_the_adapter_checkpoint_is_the_starting_point(world, tmp_path):
    from ospfn.pipeline import save_vlm_adapter

    acfg = VLMAdapterConfig(vlm_dim=vlm_tiny.HIDDEN, hidden_dim=32, text_dim=16, latent_channels=12)
    start = init_adapter(acfg, seed=42)
    save_vlm_adapter(tmp_path / "a.safetensors", start, acfg)
    cfg = load_config(_cfg(world, tmp_path / "r", **{"adapter.checkpoint": str(tmp_path / "a.safetensors")}), SFTConfig)
    trainer = make_trainer(cfg, tmp_path / "r")
    assert all(torch.equal(trainer.named[f"ctx.{k}"].detach(), v) for k, v in start.items())


# ---------------------------------------------------------------------------------------------------------
# sample.py


def test_sample_flags(world, runs, tmp_path):
    from ospfn.io import write_strip_png  # noqa: F401  (the PNG writer sample.py uses)

    final = runs[0] / "final"
    flashi2v = ROOT / "ospfn" / "assets" / "tiny_flashi2v"
    rc, _, err = _run("sample", ["--checkpoint", str(flashi2v), "--model-type", "uniworld", "--adapter", str(final / "vlm_adapter.safetensors"),
                                 "--prompt", "x", "--out", str(tmp_path / "a")])  # fmt: skip
    assert rc == 2 and "--vlm is required with --model-type uniworld" in err, err
    rc, _, err = _run("sample", ["--checkpoint", str(flashi2v), "--model-type", "uniworld", "--vlm", str(world["tmp"] / "qwen"),
                                 "--prompt", "x", "--out", str(tmp_path / "a")])  # fmt: skip
    assert rc == 2 and "--adapter is required with --model-type uniworld" in err, err
    rc, _, err = _run("sample", ["--checkpoint", str(flashi2v), "--vlm", str(world["tmp"] / "qwen"), "--prompt", "x", "--out", str(tmp_path / "a")])
    assert rc == 2 and "--vlm applies to --model-type uniworld" in err, err
    rc, _, err = _run("sample", ["--checkpoint", str(final), "--adapter", str(tmp_path / "nope.pt"), "--prompt", "x", "--out", str(tmp_path / "a")])
    assert rc == 2 and "--adapter: no such file" in err, err
    rc, _, err = _run("sample", ["--checkpoint", str(final), "--vlm", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "a")])
    assert rc == 2 and "--vlm: cannot load the pipeline" in err, err  # no Qwen2.5-VL there
    # a full run on the export, reading the VLM from --vlm (with a processor of ours: no torchvision here)
    img = tmp_path / "first.png"
    from PIL import Image

    frame = SyntheticMotion(1, frames=FRAMES, size=SIZE, seed=3)[0]["video"][:, 0]
    Image.fromarray(((frame + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(img)
    with pytest.MonkeyPatch.context() as mp:
        orig = QwenVLEncoder.from_pretrained
        mp.setattr(QwenVLEncoder, "from_pretrained", classmethod(lambda cls, path, **kw: orig(path, processor=world["proc"], **kw)))
        rc, out, err = _run("sample", ["--checkpoint", str(final), "--vlm", str(world["tmp"] / "qwen"), "--image", str(img), "--prompt",
                                       "a red circle moving left", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "v.mp4")])  # fmt: skip
    assert rc == 0, err
    info = json.loads(out.splitlines()[0])
    assert info["model_type"] == "uniworld" and (tmp_path / "v.mp4").is_file()


# ---------------------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"adapter": None}, r"adapter: text\.kind 'qwen_vl' needs an adapter section"),
        ({"text": {"kind": "tiny", "train": False}}, r"adapter applies to text\.kind 'qwen_vl' only"),
        ({"data": {"kind": "synthetic"}}, r"text\.kind 'qwen_vl' is read through a latent cache"),
        ({"train.task": "t2v"}, r"train\.task must be 'flashi2v' with text\.kind 'qwen_vl'"),
        ({"model.checkpoint": None}, r"model\.checkpoint must name the frozen DiT when model\.train is false"),
        ({"model.train": True, "lora": {"rank": 2}}, r"model\.train must be false \(or unset\) with a lora section"),
        ({"model.train": "no"}, r"model\.train: expected true/false, got str 'no'"),
        ({"text.image_size": [0, 32]}, r"text\.image_size\[0\] must be an int in \[1, 16384\], got 0"),
        ({"text.max_caption_tokens": TEXT_LEN}, r"text\.max_caption_tokens must be < text\.text_len = 40 \(.*\), got 40"),
        ({"text.text_only": 1}, r"text\.text_only: expected true/false, got int 1"),
        ({"adapter.hidden_dim": 0}, r"adapter\.hidden_dim must be an int in \[1, 65536\], got 0"),
        ({"adapter.style_tokens": -1}, r"adapter\.style_tokens must be an int in \[0, 4096\], got -1"),
        ({"adapter.first_frame_tokens": "yes"}, r"adapter\.first_frame_tokens: expected true/false"),
        ({"adapter.extra": 1}, r"unknown key adapter\.extra"),
        ({"sample.scheduler": "ddim"}, r"sample\.scheduler: expected one of \['euler', 'unipc'\], got 'ddim'"),
    ],
)
def test_config_errors(world, tmp_path, changes, message):
    cfg = _cfg(world, tmp_path / "r", **{k: v for k, v in changes.items() if k not in ("adapter", "text", "data") or v is not None})
    for k in ("adapter", "text", "data"):
        if k in changes:
            if changes[k] is None:
                del cfg[k]
            else:
                cfg[k] = changes[k]
    with pytest.raises(ConfigError, match=message):
        load_config(cfg, SFTConfig)


@pytest.mark.parametrize(
    "text, message",
    [
        ({"kind": "tiny", "image_size": [240, 416]}, r"text\.image_size applies to text\.kind 'qwen_vl' only"),
        ({"kind": "umt5", "max_caption_tokens": 512}, r"text\.max_caption_tokens applies to text\.kind 'qwen_vl' only"),
    ],
)
def test_qwen_vl_keys_belong_to_qwen_vl(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"out_dir": str(tmp_path), "text": text}, SFTConfig)


def test_model_train_false_needs_something_to_train(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.train is false .* nothing else would train"):
        load_config({"out_dir": str(tmp_path), "model": {"train": False, "checkpoint": "x"}}, SFTConfig)
    plain = load_config({"out_dir": str(tmp_path)}, SFTConfig)  # the other kinds keep their defaults
    assert plain.text.text_len == 16 and plain.text.image_size is None and plain.model.train is None and plain.adapter is None


def test_the_shipped_uniworld_configs():
    from ospfn.train.sft import derive_configs, dit_trained

    osp2 = load_config(ROOT / "recipes" / "configs" / "uniworld_osp2_14b.yaml", SFTConfig)
    dit, text_cfg, vae = derive_configs(osp2)
    assert osp2.model.preset == "flashi2v-14b" and dit.i2v == "flashi2v" and dit.text_dim == 4096 and text_cfg is None
    assert (osp2.text.kind, osp2.text.text_len, tuple(osp2.text.image_size), osp2.text.max_caption_tokens) == ("qwen_vl", 1024, (240, 416), 512)
    assert osp2.adapter.hidden_dim == 4096 and not dit_trained(osp2) and osp2.lora is None
    assert (osp2.optim.lr, osp2.optim.weight_decay, osp2.optim.ema_decay) == (5e-6, 0.0, 0.9999)
    assert (osp2.train.precision, osp2.train.grad_checkpoint, osp2.train.text_drop, osp2.data.kind) == ("bf16", True, 0.1, "latents")
    i2sv = load_config(ROOT / "recipes" / "configs" / "uniworld_i2sv_14b.yaml", SFTConfig)
    assert (i2sv.lora.rank, i2sv.lora.alpha) == (8, 4.0) and not dit_trained(i2sv)
    assert (i2sv.optim.lr, i2sv.optim.weight_decay, i2sv.optim.eps, i2sv.optim.adaptive_clip, i2sv.optim.clip_initial) == (1e-4, 3e-2, 1e-10, False, 0.05)
    assert (tuple(i2sv.data.buckets[0]), i2sv.data.frames, i2sv.train.batch_size, i2sv.train.seed) == ((512, 512), 49, 1, 42)
    assert (i2sv.sample.scheduler, i2sv.sample.shift) == ("unipc", 3.0) and i2sv.adapter.checkpoint


# ---------------------------------------------------------------------------------------------------------
# FSDP2


def _ranks_train(rank, world_size, argvs):
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    for argv in argvs:
        spec = importlib.util.spec_from_file_location("recipe_train_rank", ROOT / "recipes" / "train.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.main(argv) == 0
    return True


def test_fsdp_adapter_training_equals_one_process_and_resumes_exactly(world, tmp_path):
    from dist_harness import run_ranks

    one = tmp_path / "one"
    _train(_write(tmp_path, _cfg(world, one)))
    straight, split = tmp_path / "straight", tmp_path / "split"
    two = _cfg(world, straight, **{"train.batch_size": 2})
    c_straight, c_split = _write(tmp_path, two), _write(tmp_path, {**two, "out_dir": str(split)})
    base = ["--no-progress", "--device", "cpu"]
    run_ranks(_ranks_train, 2, [["--config", str(c_straight), *base], ["--config", str(c_split), *base, "--stop-after", "2"],
                                ["--config", str(c_split), *base, "--resume"]])  # fmt: skip
    a = read_safetensors(one / "final" / "vlm_adapter.safetensors")
    b = read_safetensors(straight / "final" / "vlm_adapter.safetensors")
    c = read_safetensors(split / "final" / "vlm_adapter.safetensors")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst  # one process on batch 4 vs 2 ranks of 2: summation order only
    assert all(torch.equal(b[k], c[k]) for k in b)  # DCP resume is exact
    from ospfn.model.checkpoint import read_dcp_metadata

    keys = set(read_dcp_metadata(split / "ckpt-00000002").state_dict_metadata)
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys == {f"model.ctx.{k}" for k in a}, sorted(model_keys)[:8]  # the frozen DiT is not checkpointed
    assert any(not torch.equal(a[k], init_adapter(VLMAdapterConfig(vlm_dim=32, hidden_dim=32, text_dim=16, latent_channels=12))[k]) for k in a)
    dit = load_checkpoint(straight / "final", world["dit_cfg"])
    assert all(torch.equal(dit[k], world["dit"][k]) for k in dit)
    la = [json.loads(x)["loss"] for x in (one / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (straight / "log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)
