"""Bad inputs to the recipes and to their configs: each is rejected before any work, with its exit status (2)
or exception type and a message naming the flag / key / file and what is allowed; nothing is left behind.

Tables:

* ``SUBPROCESS``: the recipes as a user runs them (``python recipes/X.py ...``); every case fails at argument or
  config validation, so each costs one interpreter start.
* ``IN_PROCESS``: more command lines, through each recipe's ``main(argv)`` (same code path, no interpreter start).
* ``CONFIG``: SFT config values ``load_config(..., SFTConfig)`` must reject with the key path.

Then: YAML files (syntax errors with file and line), the launch checks of the ``parallel`` section, the device
selection (CUDA / NPU availability monkeypatched; the real CUDA runs are marked ``cuda``), ``--out name.mp4``,
and the small truths (every shipped config loads, every config the launchers name exists, the recipes' README
lists exactly the scripts and flags that exist).
"""

import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import config_with

from ospfn.train.config import ArgValueError, ConfigError, float_arg, int_arg, load_config, resolve_device, size_arg
from ospfn.train.sft import SFTConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

# a tiny run (never trained here: every case fails before work)
TINY = {
    "model": {"preset": "tiny", "overrides": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "num_full_blocks": 0, "text_dim": 16, "freq_dim": 16}},
    "text": {"text_len": 12, "vocab": 128},
    "vae": {"kind": "pixel", "spatial": 4},
    "data": {"kind": "synthetic", "num_samples": 24, "frames": 3, "size": [16, 16], "seed": 0},
    "optim": {"lr": 1.0e-3, "warmup_steps": 2, "ema_decay": 0.9},
    "train": {"task": "flashi2v", "steps": 2, "batch_size": 2, "log_every": 1, "ckpt_every": 2, "seed": 3},
    "sample": {"steps": 2},
}

_MODULES: dict = {}


def recipe(name: str):
    if name not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"recipe_bad_{name}", RECIPES / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _MODULES[name] = mod
    return _MODULES[name]


def _materialise(tmp_path: Path, argv: list, files: dict) -> list[str]:
    """``{tmp}`` in the arguments -> tmp_path; ``files`` (name -> text, or a dict of train-config changes) are
    written under tmp_path first."""
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            content = yaml.safe_dump(config_with(TINY, tmp_path / "run", **content))
        (tmp_path / name).write_text(content)
    return [a.replace("{tmp}", str(tmp_path)) for a in argv]


def _left_behind(tmp_path: Path, files: dict) -> list[str]:
    given = {Path(name).parts[0] for name in files}
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in given)


# ---------------------------------------------------------------------------------------------------------------
# command lines, via a subprocess: (script, argv, files to write first, pattern the stderr must match)

SUBPROCESS = [
    ("sample", ["--steps", "0"], {}, r"argument --steps: must be an int in \[1, 10000\], got '0'"),
    ("sample", ["--frames", "-2"], {}, r"argument --frames: must be an int in \[1, 100000\], got '-2'"),
    ("sample", ["--guidance", "nan"], {}, r"argument --guidance: must be a finite number >= 0, got 'nan'"),
    ("sample", ["--size", "0x32"], {}, r"argument --size: must be HxW with two ints in \[1, 16384\] \(e\.g\. 32x32\), got '0x32'"),
    ("sample", ["--device", "tpu"], {}, r"argument --device: unknown device 'tpu'; allowed: auto, cpu, cuda, cuda:N"),
    ("sample", ["--out", "{tmp}/clip.avi"], {}, r"--out: '.*clip\.avi' names a \.avi file, but this writes an \.mp4"),
    ("sample", ["--config", "{tmp}/s.yaml"], {"s.yaml": "steps: 0\n"}, r"s\.yaml: steps must be an int in \[1, 10000\], got 0"),
    ("sample", ["--config", "{tmp}/s.yaml"], {"s.yaml": "seed: 1\nsteps: [2\n"}, r"s\.yaml: invalid YAML at line 3, column 1"),
    ("train", ["--config", "{tmp}/c.yaml", "--stop-after", "-1"], {"c.yaml": {}}, r"argument --stop-after: must be an int >= 1, got '-1'"),
    ("train", ["--config", "{tmp}/c.yaml"], {"c.yaml": {"optim.lr": 0.0}}, r"c\.yaml: optim\.lr must be a finite number > 0, got 0\.0"),
    ("train", ["--config", "{tmp}/c.yaml"], {"c.yaml": {"parallel.skiparse_sp": 2}},
     r"parallel\.skiparse_sp \* parallel\.ulysses_sp = 2 \* 1 = 2 does not divide the launch: one process"),
    ("train", ["--config", "{tmp}/c.yaml"], {"c.yaml": "out_dir: x\ntrain:\n  steps: 2\n batch_size: 3\n"},
     r"c\.yaml: invalid YAML at line 4, column 2"),
    ("export", ["--run", "{tmp}", "--out", "{tmp}/o", "--fourier-ratio", "1.0"], {}, r"argument --fourier-ratio: must be a number in \[0, 1\), got '1\.0'"),
    ("eval_tiny", ["--num", "0"], {}, r"argument --num: must be an int in \[1, 100000\], got '0'"),
]


@pytest.mark.parametrize("script,argv,files,pattern", SUBPROCESS, ids=[f"{c[0]}-{i}" for i, c in enumerate(SUBPROCESS)])
def test_recipe_command_lines_fail_before_work(tmp_path, script, argv, files, pattern):
    args = _materialise(tmp_path, argv, files)
    r = subprocess.run([sys.executable, str(RECIPES / f"{script}.py"), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert re.search(pattern, r.stderr), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert _left_behind(tmp_path, files) == []


# ---------------------------------------------------------------------------------------------------------------
# more command lines, through main(argv)

IN_PROCESS = [
    ("sample", ["--shift", "0"], {}, r"argument --shift: must be a finite number > 0, got '0'"),
    ("sample", ["--scale", "0"], {}, r"argument --scale: must be an int in \[1, 64\], got '0'"),
    ("sample", ["--config", "{tmp}/s.yaml"], {"s.yaml": "guidance: .nan\n"}, r"s\.yaml: guidance must be a finite number >= 0, got nan"),
    ("train", ["--config", "{tmp}/c.yaml", "--threads", "0"], {"c.yaml": {}}, r"argument --threads: must be an int in \[1, 4096\], got '0'"),
    ("sample", ["--steps", "-1"], {}, r"argument --steps: must be an int in \[1, 10000\], got '-1'"),
    ("sample", ["--frames", "0"], {}, r"argument --frames: must be an int in \[1, 100000\], got '0'"),
    ("sample", ["--guidance", "inf"], {}, r"argument --guidance: must be a finite number >= 0, got 'inf'"),
    ("sample", ["--shift", "-2"], {}, r"argument --shift: must be a finite number > 0, got '-2'"),
    ("sample", ["--size", "32"], {}, r"argument --size: must be HxW .*got '32'"),
    ("sample", ["--seed", "1.5"], {}, r"argument --seed: must be an int in .*got '1\.5'"),
    ("sample", ["--dtype", "fp16"], {}, r"argument --dtype: invalid choice: 'fp16' \(choose from .*fp32.*bf16"),
    ("sample", ["--out", ""], {}, r"argument --out: must be a non-empty string, got ''"),
    ("sample", ["--size", "30x32", "--out", "{tmp}/v"], {}, r"--size: 30x32 must be a multiple of 4x4 \(VAE stride x patch\) in each dimension"),
    ("sample", ["--frames", "100000", "--size", "1024x1024", "--out", "{tmp}/v"], {}, r"--frames / --size: 100000 frames of 1024x1024 make a .* GiB video; at most 16 GiB"),
    ("sample", ["--scale", "64", "--size", "512x512", "--out", "{tmp}/v"], {}, r"--scale: 64 makes 32768x32768 frames; each side at most 16384"),
    ("sample", ["--out", "{tmp}/d.mp4"], {"d.mp4/x": ""}, r"--out: .*/d\.mp4 is a directory; give name\.mp4 or a prefix"),
    ("sample", ["--config", "{tmp}/s.yaml"], {"s.yaml": "size: [0, 32]\n"}, r"s\.yaml: size must be HxW .*got \[0, 32\]"),
    ("sample", ["--config", "{tmp}/s.yaml"], {"s.yaml": "scale: 0\n"}, r"s\.yaml: scale must be an int in \[1, 64\], got 0"),
    ("sample", ["--config", "{tmp}/s.yaml"], {"s.yaml": "shift: -1.0\n"}, r"s\.yaml: shift must be a finite number > 0, got -1\.0"),
    ("sample", ["--config", "{tmp}/s.yaml"], {"s.yaml": "frames: 2.5\n"}, r"s\.yaml: frames must be an int in \[1, 100000\], got 2\.5"),
    ("sample", ["--config", "{tmp}/s.yaml"], {"s.yaml": "dtype: fp8\n"}, r"s\.yaml: dtype must be one of \['fp32', 'bf16'\], got 'fp8'"),
    ("sample", ["--config", "{tmp}/s.yaml"], {"s.yaml": "device: gpu\n"}, r"s\.yaml: device: unknown device 'gpu'; allowed: auto, cpu, cuda"),
    ("sample", ["--config", "{tmp}/s.yaml"], {"s.yaml": "- steps\n"}, r"s\.yaml: the top level must be a mapping of argument names, got list"),
    ("sample", ["--config", "{tmp}/none.yaml"], {}, r"--config: no such file: .*none\.yaml"),
    ("train", ["--config", "{tmp}/c.yaml", "--stop-after", "0"], {"c.yaml": {}}, r"argument --stop-after: must be an int >= 1, got '0'"),
    ("train", ["--config", "{tmp}/c.yaml", "--out-dir", ""], {"c.yaml": {}}, r"argument --out-dir: must be a non-empty path, got ''"),
    ("train", ["--config", "{tmp}/c.yaml", "--device", "cuda:x"], {"c.yaml": {}}, r"argument --device: unknown device 'cuda:x'; allowed"),
    ("train", ["--config", "{tmp}/c.yaml"], {"c.yaml": {"model.overrides": {"bogus": 1}}},
     r"c\.yaml: model\.overrides\.bogus is not a DiTConfig field; allowed: \[.*'dim'"),
    ("train", ["--config", "{tmp}/c.yaml"], {"c.yaml": {"data.num_samples": 10**12}}, r"data\.num_samples must be an int in \[1, 100000000\], got 1000000000000"),
    ("train", ["--config", "{tmp}/c.yaml"], {"c.yaml": {"train.ratio_range": [0.5, 1.5]}}, r"train\.ratio_range\[1\] must be a number in \[0, 1\], got 1\.5"),
    ("train", ["--config", "{tmp}/c.yaml"], {"c.yaml": {"parallel.skiparse_sp": 0}}, r"parallel\.skiparse_sp must be an int >= 1, got 0"),
    ("train", ["--config", "{tmp}/missing.yaml"], {}, r"--config: config file not found: .*missing\.yaml"),
    ("train", ["--config", "{tmp}/c.yaml", "--out-dir", "{tmp}/f"], {"c.yaml": {}, "f": "a file\n"}, r"--out-dir: .*/f exists and is not a directory"),
    ("export", ["--run", "{tmp}", "--out", "{tmp}/o", "--fourier-ratio", "-0.1"], {}, r"argument --fourier-ratio: must be a number in \[0, 1\), got '-0\.1'"),
    ("export", ["--run", "{tmp}", "--out", "{tmp}/o", "--steps", "0"], {}, r"argument --steps: must be an int in \[1, 10000\], got '0'"),
    ("export", ["--run", "{tmp}", "--out", "{tmp}/o", "--shift", "inf"], {}, r"argument --shift: must be a finite number > 0, got 'inf'"),
    ("export", ["--run", "{tmp}", "--out", "{tmp}/o", "--guidance", "-1"], {}, r"argument --guidance: must be a finite number >= 0, got '-1'"),
    ("export", ["--run", "{tmp}/nope", "--out", "{tmp}/o"], {}, r"--run: no such directory: .*nope"),
    ("export", ["--run", "{tmp}", "--out", "{tmp}/o"], {}, r"--run: load_train_state: no checkpoint in"),
    ("eval_tiny", ["--steps", "0"], {}, r"argument --steps: must be an int in \[1, 10000\], got '0'"),
    ("eval_tiny", ["--shift", "nan"], {}, r"argument --shift: must be a finite number > 0, got 'nan'"),
    ("eval_tiny", ["--num", "-3"], {}, r"argument --num: must be an int in \[1, 100000\], got '-3'"),
    ("eval_tiny", ["--json", "{tmp}/missing/r.json"], {}, r"--json: the directory .*missing does not exist"),
    ("eval_tiny", ["--checkpoint", "{tmp}"], {}, r"--checkpoint: .* is not a pipeline directory"),
]


def run_main(script: str, argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = recipe(script).main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("script,argv,files,pattern", IN_PROCESS, ids=[f"{c[0]}-{i}" for i, c in enumerate(IN_PROCESS)])
def test_recipe_mains_fail_before_work(tmp_path, capsys, monkeypatch, script, argv, files, pattern):
    monkeypatch.chdir(tmp_path)  # a default output path (out/sample) would land here, and be seen as left behind
    rc, err = run_main(script, _materialise(tmp_path, argv, files), capsys)
    assert rc == 2, (rc, err[-2000:])
    assert re.search(pattern, err), err[-2000:]
    assert _left_behind(tmp_path, files) == []


# ---------------------------------------------------------------------------------------------------------------
# SFT config values: ConfigError naming the key path, at load time

CONFIG = [
    ({"optim.lr": 0.0}, r"optim\.lr must be a finite number > 0, got 0\.0"),
    ({"optim.lr": -1.0e-3}, r"optim\.lr must be a finite number > 0, got -0\.001"),
    ({"optim.lr": float("nan")}, r"optim\.lr: expected a finite number, got nan"),
    ({"optim.lr": "1e-3"}, r"optim\.lr: expected a number, got str '1e-3' \(YAML reads 1e-3 as a string: write 1\.0e-3\)"),
    ({"optim.betas": [0.9, 1.0]}, r"optim\.betas\[1\] must be a number in \[0, 1\), got 1\.0"),
    ({"optim.betas": [-0.1, 0.999]}, r"optim\.betas\[0\] must be a number in \[0, 1\), got -0\.1"),
    ({"optim.betas": [0.9]}, r"optim\.betas: expected 2 items, got 1"),
    ({"optim.weight_decay": -0.01}, r"optim\.weight_decay must be a finite number >= 0, got -0\.01"),
    ({"optim.eps": 0.0}, r"optim\.eps must be a finite number > 0, got 0\.0"),
    ({"optim.ema_decay": 1.0}, r"optim\.ema_decay must be a number in \[0, 1\), got 1\.0"),
    ({"optim.clip_decay": 1.5}, r"optim\.clip_decay must be a number in \[0, 1\), got 1\.5"),
    ({"optim.clip_initial": 0.0}, r"optim\.clip_initial must be a finite number > 0, got 0\.0"),
    ({"optim.warmup_steps": -1}, r"optim\.warmup_steps must be an int >= 0, got -1"),
    ({"optim.branch_lr_mult": -2.0}, r"optim\.branch_lr_mult must be a finite number >= 0, got -2\.0"),
    ({"data.num_samples": 0}, r"data\.num_samples must be an int in \[1, 100000000\], got 0"),
    ({"data.num_samples": 10**12}, r"data\.num_samples must be an int in \[1, 100000000\], got 1000000000000"),
    ({"data.size": [0, 16]}, r"data\.size\[0\] must be an int in \[1, 16384\], got 0"),
    ({"data.size": [16, 10**6]}, r"data\.size\[1\] must be an int in \[1, 16384\], got 1000000"),
    ({"data.size": [20, 16]}, r"data\.size \[20, 16\] must be a multiple of vae\.spatial x patch = 8 x 8"),
    ({"data.frames": 0}, r"data\.frames must be an int in \[1, 100000\], got 0"),
    ({"data.frames": 1000, "data.size": [4096, 4096]}, r"data\.frames x data\.size make one fp32 video of 188 GiB \(1000 frames\); at most 16 GiB"),
    ({"data.kind": "video"}, r"data\.index must name the OSP-Next index file when data\.kind is 'video', got None"),
    ({"data.kind": "video", "data.index": "i.txt", "data.buckets": []}, r"data\.buckets must be a non-empty list of \[H, W\] pairs, got \[\]"),
    ({"data.kind": "video", "data.index": "i.txt", "data.buckets": [[480]]}, r"data\.buckets\[0\] must be an \[H, W\] pair"),
    ({"data.seed": -1}, r"data\.seed must be an int in \[0, 4294967295\], got -1"),
    ({"data.num_workers": -1}, r"data\.num_workers must be an int in \[0, 1024\], got -1"),
    ({"train.steps": 0}, r"train\.steps must be an int >= 1, got 0"),
    ({"train.batch_size": 0}, r"train\.batch_size must be an int >= 1, got 0"),
    ({"train.batch_size": 10**6, "data.size": [1024, 1024]}, r"train\.batch_size 1000000 x one .* GiB video makes a .* GiB micro-batch; at most 64 GiB"),
    ({"train.grad_accum": 0}, r"train\.grad_accum must be an int >= 1, got 0"),
    ({"train.ckpt_every": 0}, r"train\.ckpt_every must be an int >= 1, got 0"),
    ({"train.log_every": -5}, r"train\.log_every must be an int >= 1, got -5"),
    ({"train.keep": 0}, r"train\.keep must be an int >= 1, got 0"),
    ({"train.ratio_range": [-0.1, 0.5]}, r"train\.ratio_range\[0\] must be a number in \[0, 1\], got -0\.1"),
    ({"train.ratio_range": [0.9, 0.1]}, r"train\.ratio_range must be \[lo, hi\] with lo <= hi, got \[0\.9, 0\.1\]"),
    ({"train.text_drop": 1.5}, r"train\.text_drop must be a number in \[0, 1\], got 1\.5"),
    ({"train.shift": 0.0}, r"train\.shift must be a finite number > 0, got 0\.0"),
    ({"train.shift": "fixed"}, r"train\.shift must be a number, 'dynamic' or null, got 'fixed'"),
    ({"train.precision": "fp16"}, r"train\.precision: expected one of \['fp32', 'bf16'\], got 'fp16'"),
    ({"train.attn_backend": "flash"}, r"train\.attn_backend must be null \(automatic\) or one of \['ref', 'cpp', 'triton', 'npu', 'torch'\], got 'flash'"),
    ({"train.seed": 2**40}, r"train\.seed must be an int in \[-4294967296, 4294967295\], got 1099511627776"),
    ({"parallel.skiparse_sp": 0}, r"parallel\.skiparse_sp must be an int >= 1, got 0"),
    ({"parallel.ulysses_sp": -1}, r"parallel\.ulysses_sp must be an int >= 1, got -1"),
    ({"parallel.skiparse_sp": 3}, r"parallel\.skiparse_sp / parallel\.ulysses_sp cannot apply to this model and data: skiparse_sp = 3 must divide sparse_ratio\^2 = 4"),
    ({"model.overrides": {"bogus": 1}}, r"model\.overrides\.bogus is not a DiTConfig field; allowed: \[.*'num_heads'"),
    ({"model.overrides": {"in_dim": 3}}, r"model\.overrides\.in_dim is derived \(VAE channels / train\.task / text\.text_len\); remove it"),
    ({"model.overrides": {"dim": 30}}, r"model\.overrides \(on preset 'tiny'\): DiTConfig: dim \(30\) must be divisible by num_heads \(4\)"),
    ({"model.overrides": [1, 2]}, r"model\.overrides: expected a mapping, got list"),
    ({"model.preset": "huge"}, r"model\.preset must be one of \[.*'osp-next-1\.3b'.*\], got 'huge'"),
    ({"model.checkpoint": ""}, r"model\.checkpoint must be a path or null, got ''"),
    ({"text.vocab": 1}, r"text\.vocab must be an int in \[2, 16777216\], got 1"),
    ({"text.heads": 3}, r"text\.heads / model text_dim: TinyTextConfig: text_dim \(16\) must be divisible by heads \(3\)"),
    ({"text.text_len": 0}, r"text\.text_len must be an int in \[1, 65536\], got 0"),
    ({"vae.spatial": 0}, r"vae\.spatial must be an int in \[1, 64\], got 0"),
    ({"sample.steps": 0}, r"sample\.steps must be an int in \[1, 10000\], got 0"),
    ({"sample.guidance": -1.0}, r"sample\.guidance must be a finite number >= 0, got -1\.0"),
    ({"sample.shift": 0.0}, r"sample\.shift must be a finite number > 0, got 0\.0"),
    ({"sample.fourier_ratio": 1.0}, r"sample\.fourier_ratio must be a number in \[0, 1\), got 1\.0"),
    ({"sample.fps": 0}, r"sample\.fps must be an int in \[1, 1000\], got 0"),
    ({"out_dir": ""}, r"out_dir must be a non-empty path, got ''"),
]


@pytest.mark.parametrize("changes,pattern", CONFIG, ids=[",".join(c[0]) for c in CONFIG])
def test_sft_config_values_fail_at_load_with_the_key(tmp_path, changes, pattern):
    changes = dict(changes)
    cfg = config_with(TINY, changes.pop("out_dir", tmp_path / "run"), **changes)
    with pytest.raises(ConfigError, match=pattern):
        load_config(cfg, SFTConfig)
    # and from a file: the file is named first
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ": " + pattern):
        load_config(path, SFTConfig)


def test_the_tiny_config_itself_loads(tmp_path):
    cfg = load_config(config_with(TINY, tmp_path / "run"), SFTConfig)
    assert cfg.optim.lr == 1.0e-3 and cfg.train.steps == 2


# ---------------------------------------------------------------------------------------------------------------
# YAML files


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("out_dir: x\noptim:\n  lr: [1\n", r"invalid YAML at line 4, column 1: "),
        ("out_dir: x\ntrain: {steps: 2\n", r"invalid YAML at line 3, column 1: "),
        ("out_dir: x\n\ttrain: 1\n", r"invalid YAML at line 2, column 1: found character '\\t'"),
        ("- a\n- b\n", r"the top level must be a mapping of sections, got list"),
        ("", r"missing required key out_dir"),
    ],
)
def test_yaml_files_name_the_file_and_line(tmp_path, text, pattern):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ": " + pattern):
        load_config(path, SFTConfig)


def test_unreadable_config_files(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"out_dir: \xff\xfe\n")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "bin.yaml")) + r": cannot read the file: .*utf-8"):
        load_config(tmp_path / "bin.yaml", SFTConfig)
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path)) + r": is a directory, not a YAML file"):
        load_config(tmp_path, SFTConfig)
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml", SFTConfig)
    with pytest.raises(ConfigError, match=r"load_config: source must be a YAML path or a dict, got list"):
        load_config([1], SFTConfig)


# ---------------------------------------------------------------------------------------------------------------
# the reusable argument checks


@pytest.mark.parametrize(
    "check,text,pattern",
    [
        (int_arg(1), "0", r"must be an int >= 1, got '0'"),
        (int_arg(1), "1.0", r"must be an int >= 1, got '1\.0'"),
        (int_arg(1), "", r"must be an int >= 1, got ''"),
        (int_arg(0, 10), "11", r"must be an int in \[0, 10\], got '11'"),
        (float_arg(0, lo_open=True), "-inf", r"must be a finite number > 0, got '-inf'"),
        (float_arg(0), "nan", r"must be a finite number >= 0, got 'nan'"),
        (float_arg(0, 1, hi_open=True), "1", r"must be a number in \[0, 1\), got '1'"),
        (float_arg(0, 1), "x", r"must be a number in \[0, 1\], got 'x'"),
        (size_arg, "32x", r"must be HxW with two ints in \[1, 16384\] \(e\.g\. 32x32\), got '32x'"),
        (size_arg, "-32x32", r"must be HxW .*got '-32x32'"),
        (size_arg, [32, True], r"must be HxW .*got \[32, True\]"),
    ],
)
def test_argument_checks(check, text, pattern):
    with pytest.raises(ArgValueError, match=pattern):
        check(text)


def test_argument_checks_accept_their_range():
    assert int_arg(1)(" 3 ") == 3 and float_arg(0, 1, hi_open=True)("0") == 0.0 and size_arg("16X48") == (16, 48)
    assert int_arg(1).check(3, "x") == 3 and size_arg([8, 8]) == (8, 8)
    with pytest.raises(ValueError, match=r"steps must be an int >= 1, got True"):
        int_arg(1).check(True, "steps")  # a YAML bool is not a number
    with pytest.raises(ValueError, match=r"steps must be an int >= 1, got '3'"):
        int_arg(1).check("3", "steps")  # nor is a YAML string


# ---------------------------------------------------------------------------------------------------------------
# the parallel section against the launch


def test_parallel_section_needs_a_launch_that_carries_it(tmp_path, monkeypatch):
    from ospfn.train.build import TrainError, local_trainer, make_trainer

    cfg = load_config(config_with(TINY, tmp_path / "run", **{"parallel.skiparse_sp": 2}), SFTConfig)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(TrainError, match=r"parallel\.skiparse_sp \* parallel\.ulysses_sp = 2 \* 1 = 2 does not divide the launch: one process"):
        make_trainer(cfg, tmp_path / "run")
    with pytest.raises(TrainError, match=r"parallel\.skiparse_sp \* parallel\.ulysses_sp = 2 \* 1 = 2 does not divide the launch: one process"):
        local_trainer(cfg, tmp_path / "run")
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before any process group is created
    with pytest.raises(TrainError, match=r"= 2 does not divide the launch: 3 processes; launch a multiple of 2 processes"):
        make_trainer(cfg, tmp_path / "run")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(TrainError, match=r"WORLD_SIZE must be a positive int \(set by torchrun\), got 'two'"):
        make_trainer(cfg, tmp_path / "run")
    assert not torch.distributed.is_initialized() and not (tmp_path / "run").exists()


def test_init_parallel_checks_the_world_before_the_rendezvous(monkeypatch):
    import torch.distributed as dist

    from ospfn.parallel import ParallelConfig, init_parallel

    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"init_parallel: world size 3 is not a multiple of skiparse_sp \* ulysses_sp = 2 \* 1 = 2"):
        init_parallel(ParallelConfig(skiparse_sp=2))
    monkeypatch.setenv("WORLD_SIZE", "0")
    with pytest.raises(ValueError, match=r"init_parallel: WORLD_SIZE must be a positive int \(set by torchrun\), got '0'"):
        init_parallel(ParallelConfig())
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"init_parallel: device 'cuda' requested but CUDA is not available here"):
        init_parallel(ParallelConfig(), device="cuda")
    with pytest.raises(ValueError, match=r"init_parallel: device must be one of \['cpu', 'cuda', 'npu'\] \(a device type\), got 'tpu'"):
        init_parallel(ParallelConfig(), device="tpu")
    assert not dist.is_initialized()


# ---------------------------------------------------------------------------------------------------------------
# devices


def _fake_cuda(monkeypatch, available: bool, count: int = 0):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_recipe_device_selection(monkeypatch):
    _fake_cuda(monkeypatch, False)
    assert resolve_device(None) == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ArgValueError, match=r"device 'cuda' requested but CUDA is not available here \(torch\.cuda\.is_available\(\) is False\); use cpu"):
        resolve_device("cuda")
    _fake_cuda(monkeypatch, True, 2)
    assert resolve_device(None) == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ArgValueError, match=r"device 'cuda:2' does not exist: this machine has 2 CUDA device\(s\) \(cuda:0 \.\. cuda:1\)"):
        resolve_device("cuda:2")
    with pytest.raises(ArgValueError, match=r"device 'meta' is not supported by the recipes; allowed: auto, cpu, cuda, cuda:N"):
        resolve_device("meta")
    with pytest.raises(ArgValueError, match=r"unknown device 'gpu0'; allowed: auto, cpu, cuda, cuda:N"):
        resolve_device("gpu0")


def test_recipes_refuse_cuda_without_cuda(tmp_path, monkeypatch, capsys):
    _fake_cuda(monkeypatch, False)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config_with(TINY, tmp_path / "run")))
    for script, argv in (("train", ["--config", str(tmp_path / "c.yaml"), "--device", "cuda"]), ("sample", ["--device", "cuda:0"])):
        rc, err = run_main(script, argv, capsys)
        assert rc == 2 and re.search(r"argument --device: device 'cuda(:0)?' requested but CUDA is not available here", err), err
    assert not (tmp_path / "run").exists()


def test_launch_device_follows_the_machine(monkeypatch):
    from ospfn.parallel.mesh import launch_device

    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    _fake_cuda(monkeypatch, True, 1)
    assert launch_device() == ("cuda", "nccl")
    _fake_cuda(monkeypatch, False)
    assert launch_device() == ("cpu", "gloo") and launch_device("cpu") == ("cpu", "gloo")
    with pytest.raises(ValueError, match=r"device 'npu' requested but no NPU is available"):
        launch_device("npu")
    # an Ascend machine: torch_npu imports and registers torch.npu
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 8), raising=False)
    assert launch_device() == ("npu", "hccl")
    _fake_cuda(monkeypatch, True, 1)
    assert launch_device() == ("cuda", "nccl")  # CUDA first


def test_single_process_training_uses_the_given_device(tmp_path):
    from ospfn.train.build import TrainError, local_trainer

    cfg = load_config(config_with(TINY, tmp_path / "run", **{"train.precision": "bf16"}), SFTConfig)
    trainer = local_trainer(cfg, tmp_path / "run", device="cpu")
    assert trainer.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in trainer.named.values())
    ac = trainer.autocast()
    assert isinstance(ac, torch.autocast) and ac.device == "cpu" and ac.fast_dtype == torch.bfloat16
    with pytest.raises(TrainError, match=r"device: unknown device 'gpu'; allowed: auto, cpu, cuda, cuda:N"):
        local_trainer(cfg, tmp_path / "run", device="gpu")


@pytest.mark.cuda
def test_training_and_sampling_run_on_cuda(tmp_path, capsys):
    """The recipes on a CUDA device: the model, the batches and the bf16 autocast on the GPU, checkpoints and
    the exported pipeline as usual, and sampling in bf16 there."""
    from ospfn.train.build import local_trainer

    out = tmp_path / "run"
    cfg_dict = config_with(TINY, out, **{"train.precision": "bf16"})
    trainer = local_trainer(load_config(cfg_dict, SFTConfig), out, device="cuda")
    assert all(p.device.type == "cuda" for p in trainer.named.values()) and trainer.autocast().device == "cuda"
    rec = trainer.train_step()
    assert rec["loss"] == rec["loss"] and rec["loss"] > 0  # finite
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg_dict))
    assert recipe("train").main(["--config", str(tmp_path / "c.yaml"), "--no-progress", "--device", "cuda"]) == 0
    assert (out / "final" / "pipeline.json").exists()
    r = subprocess.run([sys.executable, str(RECIPES / "sample.py"), "--device", "cuda", "--dtype", "bf16", "--steps", "2",
                        "--out", str(tmp_path / "clip.mp4"), "--scale", "1"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"device": "cuda' in r.stdout and (tmp_path / "clip.mp4").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------------
# --out name.mp4


def test_out_name_mp4_is_the_file_written(tmp_path):
    r = subprocess.run([sys.executable, str(RECIPES / "sample.py"), "--device", "cpu", "--steps", "1", "--scale", "1",
                        "--out", str(tmp_path / "sub" / "clip.MP4")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["clip.MP4", "clip_frames.png"]
    assert f"wrote {tmp_path / 'sub' / 'clip.MP4'}\n" in r.stdout and f"wrote {tmp_path / 'sub' / 'clip_frames.png'}" in r.stdout


def test_out_paths():
    out = recipe("sample").output_paths
    assert out("a/b.mp4") == (Path("a/b.mp4"), Path("a/b_frames.png"))
    assert out("a/b") == (Path("a/b.mp4"), Path("a/b_frames.png"))  # a prefix, as before
    assert out("a/run.v2") == (Path("a/run.v2.mp4"), Path("a/run.v2_frames.png"))


# ---------------------------------------------------------------------------------------------------------------
# small truths


def test_every_shipped_config_loads():
    files = sorted((RECIPES / "configs").glob("*.yaml"))
    assert {f.name for f in files} >= {"tiny_flashi2v.yaml", "tiny_flashi2v_ssp.yaml", "osp_next_1_3b.yaml"}
    for f in files:  # RL configs (*_rl.yaml) are RLConfig files
        if f.stem.endswith("_rl"):
            from ospfn.rl.config import RLConfig

            load_config(f, RLConfig)
        else:
            load_config(f, SFTConfig)
    big = load_config(RECIPES / "configs" / "osp_next_1_3b.yaml", SFTConfig)
    assert big.model.preset == "osp-next-1.3b" and big.model.overrides.get("skiparse_model_type", "dual_end") == "dual_end"
    from ospfn.train.sft import derive_configs

    dit, _, _ = derive_configs(big)
    assert dit.skiparse_model_type == "dual_end" and (dit.dim, dit.num_layers) == (1536, 30)


def test_every_config_the_launchers_name_exists():
    named = []
    for script in sorted((RECIPES / "launch").iterdir()):
        named += re.findall(r"recipes/configs/[\w.-]+\.yaml", script.read_text())
    assert named
    for rel in named:
        assert (ROOT / rel).is_file(), f"{rel} is named in recipes/launch/ but does not exist"
        load_config(ROOT / rel, SFTConfig)


def test_recipes_readme_lists_the_recipes_and_their_flags(capsys):
    text = (RECIPES / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([\w.]+\.py)` \|[^|]*\|([^|]*)\|", text, flags=re.M))
    assert set(rows) == {p.name for p in RECIPES.glob("*.py")}
    for name, flags in rows.items():
        with pytest.raises(SystemExit) as exc:
            recipe(name[:-3]).parse_args(["--help"])
        assert exc.value.code == 0
        helptext = re.split(r"(?m)^(?:options|optional arguments):$", capsys.readouterr().out, maxsplit=1)[-1]  # not the description
        listed = re.findall(r"--[a-z][\w-]*", flags)
        assert listed, name
        for flag in listed:
            assert re.search(rf"{flag}\b", helptext), f"recipes/README.md lists {flag} for {name}, which has no such flag"
        have = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", helptext)) - {"--help"}
        assert have <= set(listed), f"{name} flags missing from recipes/README.md: {sorted(have - set(listed))}"
    for entry in ("launch/", "configs/"):
        assert f"`{entry}`" in text
