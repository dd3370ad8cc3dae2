"""The training and sampling recipes end to end on tiny configs: exact resume, bad configs, determinism."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def load_recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY = {
    "model": {"preset": "tiny", "overrides": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "num_full_blocks": 0, "text_dim": 16, "freq_dim": 16}},
    "text": {"text_len": 12, "vocab": 128},
    "vae": {"kind": "pixel", "spatial": 4},
    "data": {"kind": "synthetic", "num_samples": 24, "frames": 3, "size": [16, 16], "seed": 0},
    "optim": {"lr": 1.0e-3, "warmup_steps": 2, "ema_decay": 0.9},
    "train": {"task": "flashi2v", "steps": 4, "batch_size": 4, "grad_accum": 2, "log_every": 1, "ckpt_every": 2, "seed": 3},
    "sample": {"steps": 3},
}


def write_cfg(tmp_path, out, **changes):
    cfg = json.loads(json.dumps(TINY))
    cfg["out_dir"] = str(out)
    for path, value in changes.items():
        node = cfg
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    p = tmp_path / f"cfg-{abs(hash(str(out)))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_resume_is_exact(tmp_path):
    train = load_recipe("train")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(["--config", str(write_cfg(tmp_path, straight)), "--no-progress", "--device", "cpu"]) == 0
    cfg_split = write_cfg(tmp_path, split)
    assert train.main(["--config", str(cfg_split), "--no-progress", "--device", "cpu", "--stop-after", "2"]) == 0
    assert not (split / "final").exists()  # stopped early: no export yet
    assert train.main(["--config", str(cfg_split), "--no-progress", "--device", "cpu", "--resume"]) == 0
    a, b = straight / "ckpt-00000004", split / "ckpt-00000004"
    for name in ("model.safetensors", "ema.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    sa, sb = torch.load(a / "state.pt", weights_only=True), torch.load(b / "state.pt", weights_only=True)
    assert sa["data_pos"] == sb["data_pos"] == 4 * 4 * 2
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    assert sa["clip"] == sb["clip"]
    # and training did something
    first = load_file(split.parent / "straight" / "ckpt-00000004" / "model.safetensors")
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
    assert (straight / "final" / "pipeline.json").exists() and first


def test_resume_may_extend_steps_but_not_change_training(tmp_path, capsys):
    train = load_recipe("train")
    straight, short = tmp_path / "straight", tmp_path / "short"
    assert train.main(["--config", str(write_cfg(tmp_path, straight)), "--no-progress", "--device", "cpu"]) == 0
    assert train.main(["--config", str(write_cfg(tmp_path, short, **{"train.steps": 2})), "--no-progress", "--device", "cpu"]) == 0
    changed = write_cfg(tmp_path, short, **{"optim.lr": 2.0e-3, "data.seed": 1})
    with pytest.raises(SystemExit) as exc:
        train.main(["--config", str(changed), "--no-progress", "--device", "cpu", "--resume"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "data.seed, optim.lr" in err and "train.steps" not in err
    longer = write_cfg(tmp_path, short, **{"train.steps": 4, "train.log_every": 2, "sample.steps": 5})
    assert train.main(["--config", str(longer), "--no-progress", "--device", "cpu", "--resume"]) == 0
    ta = load_file(straight / "ckpt-00000004" / "model.safetensors")
    tb = load_file(short / "ckpt-00000004" / "model.safetensors")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_without_a_checkpoint_fails_before_work(tmp_path, capsys):
    train = load_recipe("train")
    out = tmp_path / "never_ran"
    with pytest.raises(SystemExit) as exc:
        train.main(["--config", str(write_cfg(tmp_path, out)), "--no-progress", "--device", "cpu", "--resume"])
    assert exc.value.code == 2
    assert f"error: --resume: no checkpoint found in {out}" in capsys.readouterr().err
    assert not out.exists()


def test_exported_pipeline_samples_deterministically(tmp_path):
    train = load_recipe("train")
    out = tmp_path / "run"
    assert train.main(["--config", str(write_cfg(tmp_path, out)), "--no-progress", "--device", "cpu"]) == 0
    from ospfn.data import SyntheticMotion
    from ospfn.pipeline import load_pipeline

    pipe = load_pipeline(out / "final")
    img = SyntheticMotion(1, frames=3, size=(16, 16), split="eval")[0]["video"][:, 0]
    a = pipe.generate("a small red circle moving left on a blue background", image=img, seed=5)
    b = pipe.generate("a small red circle moving left on a blue background", image=img, seed=5)
    c = pipe.generate("a small red circle moving left on a blue background", image=img, seed=6)
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    # the CLI: writes an mp4 and a PNG strip, says where
    png = tmp_path / "first.png"
    from PIL import Image

    Image.fromarray(((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(png)
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "sample.py"), "--checkpoint", str(out / "final"), "--image", str(png),
                        "--prompt", "a red circle moving left", "--out", str(tmp_path / "vid"), "--seed", "5", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "vid.mp4").stat().st_size > 0 and (tmp_path / "vid_frames.png").exists()
    assert f"wrote {tmp_path / 'vid.mp4'}" in r.stdout
    with Image.open(tmp_path / "vid_frames.png") as im:
        assert im.size == (3 * 16 * 8, 16 * 8)  # 3 frames side by side, upscaled 8x


@pytest.mark.parametrize(
    "change,message",
    [
        ({"train.bogus": 1}, r"unknown key train.bogus"),
        ({"optim.lr": "fast"}, r"optim.lr: expected a number, got str 'fast'"),
        ({"train.batch_size": 2.5}, r"train.batch_size: expected int"),
        ({"model.checkpoint": "/nonexistent/model.safetensors"}, r"model.checkpoint: no such file or directory: /nonexistent"),
        ({"model.overrides": {"in_dim": 3}}, r"model.overrides.in_dim is derived"),
        ({"train.task": "t2i"}, r"train.task: expected one of \['t2v', 'flashi2v'\]"),
        ({"model.overrides": {"dim": 30}}, r"dim \(30\) must be divisible by num_heads"),
        ({"train.compile": "yes"}, r"train.compile: expected true/false, got str 'yes'"),
    ],
)
def test_bad_train_configs_fail_before_work(tmp_path, change, message):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), "--config", str(write_cfg(tmp_path, out, **change)), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2
    import re

    assert re.search(message, r.stderr), r.stderr
    assert not out.exists()


def test_bad_sample_arguments(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 16)).save(tmp_path / "wrong.png")
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "recipes" / "sample.py"), "--device", "cpu", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)  # fmt: skip
    r = run("--image", str(tmp_path / "wrong.png"), "--prompt", "x", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and f"image {tmp_path / 'wrong.png'} is 16x20" in r.stderr
    r = run("--checkpoint", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2 and "is not a pipeline directory" in r.stderr
    (tmp_path / "s.yaml").write_text("stepz: 3\n")
    r = run("--config", str(tmp_path / "s.yaml"))
    assert r.returncode == 2 and "unknown key 'stepz'" in r.stderr
    r = run("--image", str(tmp_path / "nope.png"), "--prompt", "x")
    assert r.returncode == 2 and "image not found" in r.stderr
