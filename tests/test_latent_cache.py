"""The latent cache: prepare a video corpus once, train from it, export, sample (docs/training.md#latent-cache).

A small corpus of mp4 clips (PyAV) in the OSP-Next index layout is encoded (a) with the pixel VAE and the tiny
text encoder and (b) with a tiny random Wan2.1 VAE (diffusers ``AutoencoderKLWan``) and a tiny random UMT5
(transformers), both saved in the diffusers layout.  The references are computed here, independently of the
cache code: the encoders run on the ``VideoDataset`` items the video path trains on.
"""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from video_clips import write_mp4

from ospfn.data import VideoDataset, filter_clips, load_index
from ospfn.data.latents import LatentCacheError, LatentDataset, prepare_cache
from ospfn.model.text import TinyTextConfig, TinyTextEncoder, init_tiny_text_params
from ospfn.model.vae import PixelVAE
from ospfn.train.build import TrainError, make_trainer
from ospfn.train.config import ConfigError, load_config
from ospfn.train.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red square moving right", "a blue disc falling", "green stripes", "a yellow dot", "", "two grey boxes"]


def recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """An OSP-Next index of six 64x48 clips of 12 frames at 16 fps (a moving square on a coloured ground)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    clips = []
    for k, cap in enumerate(CAPTIONS):
        frames = np.zeros((12, 48, 64, 3), np.uint8)
        frames[:] = rng.integers(0, 256, 3, dtype=np.uint8)
        for i in range(12):
            x, y = 4 + 3 * i + k, 8 + k * 4
            frames[i, y : y + 12, x : x + 12] = rng.integers(0, 256, 3, dtype=np.uint8)
        write_mp4(root / f"c{k}.mp4", frames, fps=16)
        clips.append({"path": f"c{k}.mp4", "cap": cap, "resolution": {"height": 48, "width": 64}, "fps": 16.0, "num_frames": 12})
    (root / "meta.json").write_text(json.dumps(clips))
    (root / "index.txt").write_text(f"{root},{root / 'meta.json'}\n")
    return root / "index.txt"


def tiny_cfg(tmp_path, corpus, **changes) -> dict:
    cfg = {
        "out_dir": str(tmp_path / "run"),
        "model": {"preset": "tiny", "overrides": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "num_full_blocks": 0,
                                                  "text_dim": 16, "freq_dim": 16}},
        "text": {"text_len": 12, "vocab": 128, "train": False},
        "vae": {"kind": "pixel", "spatial": 4},
        "data": {"kind": "latents", "cache": str(tmp_path / "cache"), "index": str(corpus), "frames": 5, "train_fps": 16,
                 "buckets": [[32, 32]], "seed": 0},
        "optim": {"lr": 1.0e-3, "warmup_steps": 1, "ema_decay": 0.9},
        "train": {"task": "flashi2v", "steps": 3, "batch_size": 2, "log_every": 1, "ckpt_every": 2, "seed": 3},
        "sample": {"steps": 2, "guidance": 1.0},
    }  # fmt: skip
    for path, value in changes.items():
        node = cfg
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return cfg


def write(tmp_path, cfg: dict, name="cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def video_items(cfg: SFTConfig):
    kept, _ = filter_clips(load_index(cfg.data.index), train_fps=cfg.data.train_fps, sample_num_frames=cfg.data.frames)
    return VideoDataset(kept, num_frames=cfg.data.frames, train_fps=cfg.data.train_fps, buckets=[tuple(b) for b in cfg.data.buckets],
                        seed=cfg.data.seed)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# pixel VAE + tiny text encoder: the cache is exact, training from it equals training from the videos


def test_prepare_train_export_sample_with_the_tiny_encoders(tmp_path, corpus):
    cfg_dict = tiny_cfg(tmp_path, corpus)
    path = write(tmp_path, cfg_dict)
    assert recipe("prepare_data").main(["--config", str(path), "--device", "cpu", "--no-progress", "--shard-size", "4"]) == 0
    cfg = load_config(path, SFTConfig)
    ds = LatentDataset(cfg.data.cache)
    assert len(ds) == len(CAPTIONS) and [s["count"] for s in ds.index["shards"]] == [4, 2] and ds.cond

    # the reference: the pixel VAE and the seeded tiny encoder a run from videos starts with, on the same items
    videos = video_items(cfg)
    tcfg = TinyTextConfig(text_dim=16, text_len=12, vocab=128, heads=2)
    enc = TinyTextEncoder(init_tiny_text_params(tcfg, seed=cfg.train.seed + 1), tcfg)
    vae = PixelVAE(4)
    for i in range(len(ds)):
        it, ref = ds[i], videos[i]
        assert torch.equal(it["latent"], vae.encode(ref["video"][None])[0])
        assert torch.equal(it["cond"], vae.encode(ref["video"][None, :, :1])[0])
        feats, lengths = enc.encode([ref["caption"]])
        assert it["caption"] == ref["caption"] and it["length"] == int(lengths[0])
        assert torch.equal(it["context"], feats[0]) and it["source_index"] == i
    assert torch.equal(ds.empty_context, enc.encode([""])[0])

    # train from the cache, export, sample from the exported pipeline
    assert recipe("train").main(["--config", str(path), "--no-progress", "--device", "cpu"]) == 0
    from ospfn.pipeline import load_pipeline

    pipe = load_pipeline(tmp_path / "run" / "final")
    assert pipe.cfg.i2v == "flashi2v" and pipe.defaults["size"] == [32, 32] and pipe.defaults["frames"] == 5
    for k, v in enc.params.items():  # the frozen encoder the cache was made with travels with the model
        assert torch.equal(pipe.text.params[k], v), k
    video = pipe.generate("a red square moving right", image=videos[0]["video"][:, 0], seed=1)
    assert video.shape == (3, 5, 32, 32) and bool(torch.isfinite(video).all())


def test_training_from_the_cache_equals_training_from_the_videos(tmp_path, corpus):
    cache_cfg = load_config(tiny_cfg(tmp_path, corpus), SFTConfig)
    video_cfg = load_config(tiny_cfg(tmp_path, corpus, **{"data.kind": "video", "data.cache": None}), SFTConfig)
    prepare_data = recipe("prepare_data")
    assert prepare_data.main(["--config", str(write(tmp_path, tiny_cfg(tmp_path, corpus))), "--device", "cpu", "--no-progress"]) == 0
    runs = {}
    for name, cfg in (("cache", cache_cfg), ("video", video_cfg)):
        tr = make_trainer(cfg, tmp_path / name, device="cpu")
        runs[name] = ([tr.train_step()["loss"] for _ in range(2)], {k: v.detach().clone() for k, v in tr.named.items()})
    (loss_c, w_c), (loss_v, w_v) = runs["cache"], runs["video"]
    assert loss_c[0] == pytest.approx(loss_v[0], rel=1e-6) and loss_c[1] == pytest.approx(loss_v[1], rel=1e-5)
    assert set(w_c) == set(w_v)
    for k in w_c:
        torch.testing.assert_close(w_c[k], w_v[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# the real encoders (tiny random diffusers / transformers models in the diffusers layout)


@pytest.fixture(scope="module")
def real_encoders(tmp_path_factory):
    from diffusers import AutoencoderKLWan
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("wan_parts")
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]).save_pretrained(root / "vae")
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0))
    umt5.save_pretrained(root / "text_encoder")
    ByT5Tokenizer().save_pretrained(root / "tokenizer")
    return root


def real_cfg(tmp_path, corpus, parts) -> dict:
    over = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "num_full_blocks": 0, "text_dim": 32, "freq_dim": 16}
    return tiny_cfg(tmp_path, corpus, **{"text": {"kind": "umt5", "path": str(parts), "text_len": 16, "train": False},
                                         "vae": {"kind": "wan", "path": str(parts)}, "model.overrides": over})


def test_prepare_train_export_sample_with_the_real_encoders(tmp_path, corpus, real_encoders):
    from ospfn.model.checkpoint import load_checkpoint
    from ospfn.model.umt5 import UMT5TextEncoder
    from ospfn.model.wan_vae import WanVAE
    from ospfn.pipeline import DEFAULTS, WAN_NEGATIVE_PROMPT, Pipeline, load_pipeline

    path = write(tmp_path, real_cfg(tmp_path, corpus, real_encoders))
    assert recipe("prepare_data").main(["--config", str(path), "--device", "cpu", "--no-progress"]) == 0
    cfg = load_config(path, SFTConfig)
    ds = LatentDataset(cfg.data.cache)
    assert ds.spec["vae"]["kind"] == "wan" and ds.spec["text"]["kind"] == "umt5" and (ds.text_dim, ds.text_len) == (32, 16)

    # reference: the library encoders loaded here from the same files, run on the video path's items
    text = UMT5TextEncoder.from_pretrained(real_encoders, text_len=16)
    vae = WanVAE.from_pretrained(real_encoders)
    videos = video_items(cfg)
    for i in (0, len(ds) - 1):
        it, ref = ds[i], videos[i]
        z = vae.encode(ref["video"][None])[0]
        assert it["latent"].shape == (16, 2, 4, 4) and torch.equal(it["latent"], z)
        assert torch.equal(it["cond"], vae.encode(ref["video"][None, :, :1])[0])
        feats, lengths = text.encode([ref["caption"]])
        assert it["length"] == int(lengths[0]) == min(len(ref["caption"].encode()) + 1, 16)  # ByT5: a token per byte, </s>
        assert torch.equal(it["context"], feats[0])
    assert torch.equal(ds.empty_context, text.encode([""])[0])

    assert recipe("train").main(["--config", str(path), "--no-progress", "--device", "cpu"]) == 0
    final = tmp_path / "run" / "final"
    meta = json.loads((final / "ospfn_export.json").read_text())
    assert meta["model_type"] == "flashi2v" and meta["vae"] == {"kind": "wan", "path": str(real_encoders)}
    assert meta["text_encoder"]["kind"] == "umt5" and meta["text_encoder"]["path"] == str(real_encoders)
    params = load_checkpoint(final)  # config.json + diffusion_pytorch_model.safetensors
    from ospfn.model.checkpoint import load_config as load_dit_config

    dit_cfg = load_dit_config(final)
    assert (dit_cfg.in_dim, dit_cfg.text_dim, dit_cfg.text_len, dit_cfg.i2v) == (16, 32, 16, "flashi2v")
    pipe = Pipeline(dit_cfg, params, text, vae, {"kind": "wan"}, {**DEFAULTS, "negative_prompt": WAN_NEGATIVE_PROMPT, **meta["defaults"]})
    video = pipe.generate("a red square moving right", image=videos[0]["video"][:, 0], seed=0)
    assert video.shape == (3, 5, 32, 32) and bool(torch.isfinite(video).all()) and float(video.abs().max()) <= 1

    # the export directory is a pipeline: load_pipeline reads the encoders its ospfn_export.json names
    loaded = load_pipeline(final)
    assert loaded.model_type == "flashi2v" and loaded.info["layout"] == "export" and loaded.defaults == pipe.defaults
    assert isinstance(loaded.text, UMT5TextEncoder) and isinstance(loaded.vae, WanVAE)
    assert torch.equal(loaded.generate("a red square moving right", image=videos[0]["video"][:, 0], seed=0), video)


def test_export_layout_names_what_is_missing(tmp_path):
    """An export whose encoders are not on this machine: the error names the file and the way out (the Wan2.1
    pipeline with the DiT on top); a malformed ospfn_export.json is refused with the key."""
    from ospfn.model import DiTConfig, init_params
    from ospfn.model.checkpoint import CheckpointError, CheckpointMissingError, save_checkpoint
    from ospfn.pipeline import detect_layout, load_pipeline

    cfg = DiTConfig.preset("tiny").replace(in_dim=16, out_dim=16, text_dim=32)
    save_checkpoint(init_params(cfg, seed=0), tmp_path, cfg=cfg)
    meta = {"model_type": "osp-next", "text_encoder": {"kind": "umt5", "path": str(tmp_path / "gone"), "tokenizer": None, "text_len": 16},
            "vae": {"kind": "wan", "path": str(tmp_path / "gone")}, "defaults": {"steps": 7}, "info": {}}  # fmt: skip
    (tmp_path / "ospfn_export.json").write_text(json.dumps(meta))
    assert detect_layout(tmp_path) == "export"
    with pytest.raises(CheckpointMissingError, match=r"text_encoder named by .*ospfn_export.json is not here: .*gone .*load_pipeline\(<Wan2.1 dir>, dit="):
        load_pipeline(tmp_path)
    (tmp_path / "ospfn_export.json").write_text(json.dumps({**meta, "vae": {"kind": "sd"}}))
    with pytest.raises(CheckpointError, match=r"vae must be an object with kind 'pixel' or 'wan', got \{'kind': 'sd'\}"):
        load_pipeline(tmp_path)
    (tmp_path / "ospfn_export.json").write_text(json.dumps({**meta, "defaults": {"steps": 0}}))
    with pytest.raises(CheckpointError, match=r"defaults.steps must be an int in \[1, 1000000\], got 0"):
        load_pipeline(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# resuming, and refusing what does not fit


class Interrupting:
    """The video dataset, interrupted (as by Ctrl-C) when item ``at`` is read."""

    def __init__(self, ds, at):
        self.ds, self.at, self.entries = ds, at, ds.entries

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if i == self.at:
            raise KeyboardInterrupt
        return self.ds[i]


def _prepare(ds, out, **kw):
    tcfg = TinyTextConfig(text_dim=16, text_len=12, vocab=128, heads=2)
    w = init_tiny_text_params(tcfg, seed=7)
    args = dict(text=TinyTextEncoder(w, tcfg), vae=PixelVAE(4), text_spec={"kind": "tiny", "text_dim": 16, "text_len": 12},
                vae_spec={"kind": "pixel", "latent_channels": 48}, cond=True, text_weights=w, shard_size=2, progress=False)  # fmt: skip
    return prepare_cache(ds, out, **{**args, **kw})


def _contents(path):
    ds = LatentDataset(path)
    return [{k: v for k, v in ds[i].items()} for i in range(len(ds))]


def test_prepare_continues_after_an_interruption(tmp_path, corpus):
    videos = video_items(load_config(tiny_cfg(tmp_path, corpus), SFTConfig))
    whole = _prepare(videos, tmp_path / "whole")
    assert whole["complete"] and whole["num_samples"] == 6 and len(whole["shards"]) == 3

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        _prepare(Interrupting(videos, 3), out)
    index = json.loads((out / "index.json").read_text())
    assert (index["next"], index["num_samples"], index["complete"]) == (2, 2, False)  # shard 0 done, shard 1 not written
    with pytest.raises(LatentCacheError, match=r"incomplete: 2 of 6 source items prepared; run recipes/prepare_data.py again"):
        LatentDataset(out)
    stale = out / ".shard-00001.safetensors.tmp-999999999.abcdefgh.tmp"  # what a writer killed mid-file leaves
    stale.write_bytes(b"partial")
    logs = []
    again = _prepare(videos, out, log=logs.append)
    assert again["complete"] and not stale.exists() and any("continuing" in s and "2 of 6" in s for s in logs)
    a, b = _contents(tmp_path / "whole"), _contents(out)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k], k
    # a complete cache is left alone; other settings are refused, naming them
    assert _prepare(videos, out)["complete"]
    with pytest.raises(LatentCacheError, match=r"prepared with different settings: dtype \('float32' then, 'bfloat16' now\)"):
        _prepare(videos, out, dtype=torch.bfloat16)
    with pytest.raises(LatentCacheError, match=r"other text encoder weights"):
        tcfg = TinyTextConfig(text_dim=16, text_len=12, vocab=128, heads=2)
        _prepare(videos, out, text_weights=init_tiny_text_params(tcfg, seed=8))
    with pytest.raises(LatentCacheError, match=r"not empty and holds no index.json"):
        _prepare(videos, tmp_path / "whole" / "..")
    # a shard damaged after the fact is named when it is read
    shard = tmp_path / "whole" / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    ds = LatentDataset(tmp_path / "whole")
    assert torch.equal(ds[0]["latent"], a[0]["latent"])
    with pytest.raises(LatentCacheError, match=r"shard-00002\.safetensors: tensor .* the file is truncated"):
        ds[5]


def test_the_recipe_stops_and_continues(tmp_path, corpus, capsys):
    path = write(tmp_path, tiny_cfg(tmp_path, corpus))
    prep = recipe("prepare_data")
    assert prep.main(["--config", str(path), "--no-progress", "--device", "cpu", "--shard-size", "2", "--stop-after", "3"]) == 0
    assert "4 of 6 clips done; run again to continue" in capsys.readouterr().out  # rounded up to whole shards
    with pytest.raises(SystemExit) as e:  # training refuses the unfinished cache before any work
        recipe("train").main(["--config", str(path), "--no-progress", "--device", "cpu"])
    assert e.value.code == 2 and "incomplete: 4 of 6 source items prepared" in capsys.readouterr().err
    assert prep.main(["--config", str(path), "--no-progress", "--device", "cpu", "--shard-size", "2"]) == 0
    assert "6 samples in 3 shard(s), complete" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        prep.main(["--config", str(path), "--no-progress", "--device", "cpu", "--shard-size", "3"])
    assert e.value.code == 2 and "shard_size (2 then, 3 now)" in capsys.readouterr().err


def test_a_broken_clip_is_named_or_skipped(tmp_path, corpus):
    broken = tmp_path / "corpus"
    broken.mkdir()
    meta = json.loads((corpus.parent / "meta.json").read_text())
    for m in meta:
        os.symlink(corpus.parent / m["path"], broken / m["path"])
    (broken / "c2.mp4").unlink()
    (broken / "c2.mp4").write_bytes(b"not a video")
    (broken / "meta.json").write_text(json.dumps(meta))
    (broken / "index.txt").write_text(f"{broken},{broken / 'meta.json'}\n")
    path = write(tmp_path, tiny_cfg(tmp_path, broken / "index.txt"))
    from ospfn.train.build import prepare_from_config
    from ospfn.data.latents import CacheItemError

    cfg = load_config(path, SFTConfig)
    with pytest.raises(CacheItemError, match=r"source item 2 \(.*c2\.mp4\): .*--skip-bad"):
        prepare_from_config(cfg, progress=False)
    index = prepare_from_config(cfg, skip_bad=True, progress=False)
    assert index["complete"] and index["num_samples"] == 5 and [s["source_index"] for s in index["skipped"]] == [2]
    ds = LatentDataset(cfg.data.cache)
    assert [ds[i]["source_index"] for i in range(len(ds))] == [0, 1, 3, 4, 5]


@pytest.mark.parametrize(
    "change,message",
    [
        ({"text": {"kind": "umt5", "text_len": 16, "train": False}, "data.kind": "video", "data.cache": None},
         r"text\.kind 'umt5' is read through a latent cache: set data\.kind: latents"),
        ({"vae": {"kind": "wan"}, "data.kind": "synthetic", "data.cache": None, "data.index": None},
         r"vae\.kind 'wan' is read through a latent cache"),
        ({"text.train": True}, r"text\.train must be false with data\.kind 'latents'"),
        ({"data.cache": None}, r"data\.cache must name the latent cache directory"),
        ({"data.kind": "video"}, r"data\.cache applies to data\.kind 'latents' only"),
        ({"vae": {"kind": "wan", "spatial": 4}}, r"vae\.spatial is fixed at 8 for vae\.kind 'wan'"),
        ({"vae": {"kind": "wan"}, "data.frames": 6}, r"data\.frames must be 4k \+ 1 for vae\.kind 'wan'"),
        ({"vae": {"kind": "pixel", "path": "x"}}, r"vae\.path applies to vae\.kind 'wan' only"),
        ({"text.tokenizer": "x"}, r"text\.tokenizer applies to text\.kind 'umt5' only"),
        ({"data.kind": "frames"}, r"data\.kind: expected one of \['synthetic', 'video', 'latents'\]"),
    ],
)
def test_bad_latent_configs_fail_on_load(tmp_path, corpus, change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny_cfg(tmp_path, corpus, **change), SFTConfig)


def test_a_cache_that_does_not_fit_the_config_is_refused(tmp_path, corpus):
    path = write(tmp_path, tiny_cfg(tmp_path, corpus, **{"train.task": "t2v"}))
    assert recipe("prepare_data").main(["--config", str(path), "--no-progress", "--device", "cpu"]) == 0
    cfg = load_config(tiny_cfg(tmp_path, corpus, **{"data.frames": 9, "text.text_len": 10}), SFTConfig)
    with pytest.raises(TrainError, match=r"does not match this config: text\.text_len is 10, the cache's is 12; .*first-frame latents.*"
                                         r"data\.frames is 9, the cache was prepared with 5"):
        make_trainer(cfg, tmp_path / "r", device="cpu")
    with pytest.raises(TrainError, match=r"data\.cache: latent cache .*nowhere: no such directory"):
        make_trainer(load_config(tiny_cfg(tmp_path, corpus, **{"data.cache": str(tmp_path / "nowhere")}), SFTConfig), tmp_path / "r")


def test_the_shipped_flashi2v_config():
    from ospfn.train.sft import derive_configs

    cfg = load_config(ROOT / "recipes" / "configs" / "flashi2v_1_3b.yaml", SFTConfig)
    dit, text_cfg, vae = derive_configs(cfg)
    assert cfg.model.preset == "flashi2v-1.3b" and dit.i2v == "flashi2v" and (dit.dim, dit.num_layers) == (1536, 30)
    assert (dit.in_dim, dit.text_dim, dit.text_len) == (16, 4096, 512) and text_cfg is None and vae == {"kind": "wan"}
    assert (cfg.data.kind, cfg.text.kind, cfg.vae.kind, cfg.train.task) == ("latents", "umt5", "wan", "flashi2v")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.ema_decay, cfg.train.batch_size) == (2e-5, 1e-2, 0.9999, 1)
    assert (cfg.train.text_drop, tuple(cfg.train.ratio_range), cfg.train.shift, cfg.train.logit_normal) == (0.1, (0.05, 0.95), "dynamic", True)
    assert (cfg.sample.steps, cfg.sample.guidance, cfg.sample.shift, cfg.sample.fourier_ratio) == (50, 5.0, 7.0, 0.1)
    assert (cfg.data.frames - 1) % 4 == 0 and cfg.model.checkpoint
