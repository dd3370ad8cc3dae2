"""Checkpoint loaders: every format on synthetic files, the error listing, safety, memory bound."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import ospfn.model as M
from ospfn.model.checkpoint import CheckpointError, convert_state_dict, load_checkpoint, load_config, save_checkpoint


@pytest.fixture(scope="module")
def tiny():
    cfg = M.DiTConfig.preset("tiny", i2v="flashi2v")
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(v.shape, generator=g) for k, v in M.init_params(cfg).items()}
    return cfg, params


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_wan_single_file(tmp_path, tiny):
    cfg, params = tiny
    save_file(params, tmp_path / "model.safetensors")
    assert same(load_checkpoint(tmp_path / "model.safetensors", cfg), params)


def test_wan_sharded_with_index_and_config(tmp_path, tiny):
    cfg, params = tiny
    save_checkpoint(params, tmp_path, cfg=cfg, max_shard_bytes=200_000)
    shards = list(tmp_path.glob("*-of-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(params)
    assert load_config(tmp_path) == cfg
    assert same(load_checkpoint(tmp_path), params)  # config.json read when cfg is omitted
    assert same(load_checkpoint(tmp_path / "diffusion_pytorch_model.safetensors.index.json", cfg), params)


def test_dtype_cast(tmp_path, tiny):
    cfg, params = tiny
    save_checkpoint(params, tmp_path / "m.safetensors")
    got = load_checkpoint(tmp_path / "m.safetensors", cfg, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    assert torch.equal(got["head.modulation"], params["head.modulation"].bfloat16())


def test_diffusers_save_pretrained_directory(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency")
    torch.manual_seed(0)
    m = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2,
    )  # fmt: skip
    m.save_pretrained(tmp_path)
    cfg = load_config(tmp_path)  # diffusers' own config.json
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim, cfg.text_dim) == (48, 2, 2, 96, 32)
    got = load_checkpoint(tmp_path)
    want = convert_state_dict(m.state_dict(), "diffusers", "wan")
    assert same(got, {k: v.detach() for k, v in want.items()})


def test_diffusers_norm_out_alias(tmp_path, tiny):
    cfg, params = tiny
    d = convert_state_dict(params, "wan", "diffusers")
    d["norm_out.scale_shift_table"] = d.pop("scale_shift_table")
    save_file(d, tmp_path / "m.safetensors")
    assert same(load_checkpoint(tmp_path / "m.safetensors", cfg), params)


def test_osp_next_fsdp_model_pt(tmp_path, tiny):
    cfg, params = tiny
    wrapped = {}
    for k, v in params.items():
        if k.startswith("blocks."):
            i, rest = k[len("blocks.") :].split(".", 1)
            k = f"blocks.{i}._fsdp_wrapped_module._checkpoint_wrapped_module.{rest}"
        wrapped["module._orig_mod." + k] = v
    torch.save({"model": wrapped, "step": 10}, tmp_path / "model.pt")
    assert same(load_checkpoint(tmp_path / "model.pt", cfg), params)
    assert same(convert_state_dict(wrapped, "osp-next", "wan"), params)


def test_dcp_directory(tmp_path, tiny):
    import torch.distributed.checkpoint as dcp

    cfg, params = tiny
    dcp.save({k: v.clone() for k, v in params.items()}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert same(load_checkpoint(tmp_path / "dcp", cfg), params)


def test_mismatch_error_lists_every_key(tmp_path, tiny):
    cfg, params = tiny
    bad = dict(params)
    del bad["blocks.3.ffn.0.bias"]
    del bad["head.head.weight"]
    bad["blocks.0.img_emb.weight"] = torch.zeros(2)
    bad["blocks.1.self_attn.q.weight"] = torch.zeros(3, 3)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "bad.safetensors", cfg)
    msg = str(e.value)
    for key in ("blocks.3.ffn.0.bias", "head.head.weight", "blocks.0.img_emb.weight", "blocks.1.self_attn.q.weight: checkpoint (3, 3) vs model (64, 64)"):
        assert key in msg
    assert "missing 3" in msg and "unexpected 1" in msg and "mis-shaped 1" in msg


def test_pickled_code_is_never_executed(tmp_path, tiny):
    cfg, _ = tiny
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": {"x": Evil()}}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a torch checkpoint readable with weights_only=True"):
        load_checkpoint(tmp_path / "evil.pt", cfg)
    torch.save({"model": {"x": Evil()}}, tmp_path / "evil_zip.pt")  # the same object inside torch.save's zip
    with pytest.raises(CheckpointError, match=r"evil_zip\.pt: refused to unpickle \(.*GLOBAL posix\.system"):
        load_checkpoint(tmp_path / "evil_zip.pt", cfg)
    assert not marker.exists()


def test_missing_paths(tmp_path, tiny):
    cfg, _ = tiny
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_checkpoint(tmp_path / "nope.safetensors", cfg)
    with pytest.raises(FileNotFoundError, match="holds no"):
        load_checkpoint(tmp_path, cfg)
    with pytest.raises(ValueError, match=r"unknown checkpoint type '.ckpt'"):
        (tmp_path / "x.ckpt").write_text("")
        load_checkpoint(tmp_path / "x.ckpt", cfg)


def test_atomic_write_leaves_no_partial_file(tmp_path, tiny, monkeypatch):
    cfg, params = tiny
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(params, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_peak_memory_of_sharded_load(tmp_path):
    """Peak resident memory while loading a multi-shard checkpoint stays under 1.3x the parameter bytes."""
    cfg = M.DiTConfig.preset("tiny", dim=256, ffn_dim=1024, num_layers=24, num_heads=4, num_full_blocks=8)
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(v.shape, generator=g) for k, v in M.init_params(cfg).items()}
    nbytes = sum(v.numel() * v.element_size() for v in params.values())
    save_checkpoint(params, tmp_path, cfg=cfg, max_shard_bytes=nbytes // 8)
    del params
    code = f"""
        import re, torch, ospfn.model as M
        from ospfn.model.checkpoint import load_checkpoint
        def status(key):
            return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
        open("/proc/self/clear_refs", "w").write("5")   # reset the peak-RSS watermark
        base = status("VmRSS")
        p = load_checkpoint({str(tmp_path)!r})
        peak = status("VmHWM") - base
        print(peak, sum(v.numel() * v.element_size() for v in p.values()))
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    peak, final = map(int, r.stdout.split())
    assert final == nbytes and nbytes > 50e6
    assert peak <= 1.3 * nbytes, f"peak {peak / 1e6:.1f} MB for {nbytes / 1e6:.1f} MB of parameters"
