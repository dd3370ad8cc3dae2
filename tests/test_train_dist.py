"""FSDP2 training on 2 gloo ranks: equals one process on the same global batch; DCP resume is exact."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
from conftest import config_with
import torch
import yaml
from dist_harness import run_ranks
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

CFG = {
    "model": {"preset": "tiny", "overrides": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 4, "num_full_blocks": 0, "text_dim": 16, "freq_dim": 16}},
    "text": {"text_len": 12, "vocab": 128},
    "vae": {"kind": "pixel", "spatial": 2},
    "data": {"kind": "synthetic", "num_samples": 32, "frames": 3, "size": [16, 16], "seed": 0},
    "optim": {"lr": 1.0e-3, "warmup_steps": 1, "ema_decay": 0.9},
    "train": {"task": "flashi2v", "steps": 4, "batch_size": 2, "log_every": 1, "ckpt_every": 2, "seed": 5},
    "sample": {"steps": 2},
}


def _cfg_file(tmp: Path, out: Path, **changes) -> Path:
    cfg = config_with(CFG, out, **changes)
    p = tmp / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _train_main(argv):
    spec = importlib.util.spec_from_file_location("recipe_train", ROOT / "recipes" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def _ranks_train(rank, world, argvs):
    for argv in argvs:
        assert _train_main(argv) == 0
    return True


def _weights(run: Path) -> dict:
    return load_file(run / "final" / "diffusion_pytorch_model.safetensors")


def test_fsdp_data_parallel_equals_one_process(tmp_path):
    one = tmp_path / "one"
    assert _train_main(["--config", str(_cfg_file(tmp_path, one, **{"train.batch_size": 4})), "--no-progress"]) == 0
    two = tmp_path / "two"
    run_ranks(_ranks_train, 2, [["--config", str(_cfg_file(tmp_path, two)), "--no-progress"]])
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 2e-4, worst  # summation order differs (fp32); the lr is 1e-3 per step
    la = [json.loads(x)["loss"] for x in (one / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (two / "log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)


def test_fsdp_with_skiparse_sp_equals_one_process(tmp_path):
    one = tmp_path / "one_sp"
    assert _train_main(["--config", str(_cfg_file(tmp_path, one, **{"train.steps": 2})), "--no-progress"]) == 0
    two = tmp_path / "ssp"
    cfg = _cfg_file(tmp_path, two, **{"train.steps": 2, "parallel.skiparse_sp": 2})
    run_ranks(_ranks_train, 2, [["--config", str(cfg), "--no-progress"]])
    a, b = _weights(one), _weights(two)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 2e-4, worst


def test_dcp_resume_is_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_ranks(_ranks_train, 2, [["--config", str(_cfg_file(tmp_path, straight)), "--no-progress"]])
    cfg = _cfg_file(tmp_path, split)
    run_ranks(_ranks_train, 2, [["--config", str(cfg), "--no-progress", "--stop-after", "2"]])
    # what a run killed after logging step 3, in the middle of writing its step-4 checkpoint, leaves
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is no longer alive
    (split / f".ckpt-00000004.tmp-{dead.pid}").mkdir()
    (split / f".ckpt-00000004.tmp-{dead.pid}" / "__0_0.distcp").write_bytes(b"half")
    with open(split / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    run_ranks(_ranks_train, 2, [["--config", str(cfg), "--no-progress", "--resume"]])
    a, b = _weights(straight), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (split / "ckpt-00000004" / "train_state.json").exists() and (split / "latest").read_text().strip() == "ckpt-00000004"
    assert sorted(p.name for p in split.iterdir()) == ["ckpt-00000002", "ckpt-00000004", "final", "latest", "log.jsonl"]  # swept
    log = [json.loads(x) for x in (split / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # each step once: the killed run's step 3 was dropped
    ref = [json.loads(x)["loss"] for x in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == ref


def test_fsdp_fixed_clip_equals_one_process(tmp_path):
    """``optim.adaptive_clip: false`` clips to ``clip_initial`` under FSDP2 too (sharded gradients, global norm)."""
    clip = {"optim.adaptive_clip": False, "optim.clip_initial": 0.1, "train.steps": 2}  # the norms here are ~0.5
    one = tmp_path / "one_clip"
    assert _train_main(["--config", str(_cfg_file(tmp_path, one, **clip, **{"train.batch_size": 4})), "--no-progress"]) == 0
    two = tmp_path / "two_clip"
    run_ranks(_ranks_train, 2, [["--config", str(_cfg_file(tmp_path, two, **clip)), "--no-progress"]])
    a, b = _weights(one), _weights(two)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 2e-4, worst
    log = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    assert all(r["clip_threshold"] == 0.1 and r["grad_norm"] > 0.1 for r in log)
