"""Training never writes garbage and a killed run leaves nothing behind.

* A NaN / inf loss or gradient stops the run naming the step (``train.nonfinite: stop``) or skips the step
  (``skip``, counted in the log); no checkpoint or exported pipeline holds a non-finite value.
* ``log.jsonl`` holds each step once across resumes (``ospfn.train.runlog``).
* SIGKILL at random moments (also in the middle of a checkpoint write), resume each time: the final state is
  bitwise the uninterrupted run's, no temporary checkpoint directory is left, one log record per step.
"""

import contextlib
import importlib.util
import io
import json
import math
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY_SFT as TINY
from conftest import config_with

ROOT = Path(__file__).resolve().parents[1]



def _recipe():
    spec = importlib.util.spec_from_file_location("recipe_train_durability", ROOT / "recipes" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cfg(tmp_path, out, **changes) -> Path:
    p = tmp_path / f"{out.name}-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(config_with(TINY, out, **changes)))
    return p


def _run(cfg: Path, *extra) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``recipes/train.py`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = _recipe().main(["--config", str(cfg), "--no-progress", "--device", "cpu", *extra])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _assert_all_finite(run: Path) -> None:
    """Every tensor of every checkpoint and of the exported pipeline is finite."""
    files = sorted(run.glob("ckpt-*/*.safetensors")) + sorted(run.glob("final/*.safetensors"))
    assert files, f"nothing written under {run}"
    for f in files:
        for k, v in load_file(f).items():
            assert torch.isfinite(v).all(), f"{f}: {k}"
    for f in sorted(run.glob("ckpt-*/state.pt")):
        for p in torch.load(f, weights_only=True)["optimizer"]["state"].values():
            assert all(torch.isfinite(t).all() for t in p.values() if torch.is_tensor(t)), f


def _stale(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob(".ckpt-*"))  # .ckpt-<step>.tmp-<pid> (being written), .old-<pid> (replaced)


@pytest.fixture
def inject(monkeypatch):
    """``inject(kind, steps)``: from now on, the loss of the given (1-based) steps is NaN ("loss"), or its
    gradient is ("grad": the loss stays finite), or a weight turns NaN after the step ("weight")."""
    from ospfn.train.step import Trainer

    def install(kind, steps):
        micro_loss, train_step = Trainer.micro_loss, Trainer.train_step

        class NanGrad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                return torch.full_like(g, float("nan"))

        def bad_loss(self, micro):
            loss = micro_loss(self, micro)
            if self.step + 1 in steps:
                return loss * float("nan") if kind == "loss" else NanGrad.apply(loss)
            return loss

        def bad_weight(self):
            rec = train_step(self)
            if self.step in steps:
                with torch.no_grad():
                    next(p for p in self.named.values() if p.requires_grad).view(-1)[0] = float("nan")
            return rec

        if kind == "weight":
            monkeypatch.setattr(Trainer, "train_step", bad_weight)
        else:
            monkeypatch.setattr(Trainer, "micro_loss", bad_loss)

    return install


# ----------------------------------------------------------------------------------------------------------
# non-finite steps


@pytest.mark.parametrize("kind,what", [("loss", "loss (nan) and gradient norm (nan)"), ("grad", "gradient norm (nan)")])
def test_a_nonfinite_step_stops_the_run_naming_the_step(tmp_path, inject, kind, what):
    out = tmp_path / "run"
    inject(kind, {3})
    rc, _, err = _run(_cfg(tmp_path, out))
    assert rc == 1, err
    assert f"error: step 3: non-finite {what}; stopping without applying the step (train.nonfinite: stop" in err
    if kind == "grad":
        assert "loss (" not in err  # the loss itself was finite
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-00000002"]  # the last good checkpoint only
    assert not (out / "final").exists() and _stale(out) == []
    assert [r["step"] for r in _log(out)] == [1, 2]
    _assert_all_finite(out)


def test_skip_mode_skips_nonfinite_steps_counts_them_and_resumes_the_count(tmp_path, inject):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, out, **{"train.nonfinite": "skip", "train.ckpt_every": 1})
    inject("loss", {2})
    inject("grad", {3})
    rc, stdout, _ = _run(cfg, "--stop-after", "3")
    assert rc == 0
    assert "warning: step 2: non-finite loss (nan)" in stdout and "the step was skipped (train.nonfinite: skip; 1 so far)" in stdout
    assert "warning: step 3: non-finite loss" in stdout and "(train.nonfinite: skip; 2 so far)" in stdout
    rc, _, err = _run(cfg, "--resume")
    assert rc == 0, err
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["skipped_nonfinite"] for r in log] == [0, 1, 2, 2]  # the count survives the resume
    assert [r.get("skipped", False) for r in log] == [False, True, True, False]
    assert log[1]["loss"] == "nan" and math.isnan(float(log[1]["loss"]))  # strict JSON: the string "nan"
    assert isinstance(log[2]["loss"], float) and log[2]["grad_norm"] == "nan"
    # a skipped step changes nothing: weights, EMA, optimizer moments, clip statistics as after step 1
    c = {s: out / f"ckpt-{s:08d}" for s in (1, 2, 3, 4)}
    for name in ("model.safetensors", "ema.safetensors"):
        one, three, four = (load_file(c[s] / name) for s in (1, 3, 4))
        assert all(torch.equal(one[k], three[k]) for k in one), name
        assert any(not torch.equal(one[k], four[k]) for k in one), name  # step 4 trained
    s1, s3 = (torch.load(c[s] / "state.pt", weights_only=True) for s in (1, 3))
    assert s1["clip"] == s3["clip"]
    for a, b in zip(s1["optimizer"]["state"].values(), s3["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"])
    assert s3["skipped_nonfinite"] == 2 and s3["data_pos"] == 3 * 2  # the data moved on
    _assert_all_finite(out)


def test_no_checkpoint_with_a_nonfinite_weight(tmp_path, inject):
    out = tmp_path / "run"
    inject("weight", {1})  # after step 1 a weight is NaN; every later loss is NaN and skipped
    rc, _, err = _run(_cfg(tmp_path, out, **{"train.nonfinite": "skip"}))
    assert rc == 1
    assert f"error: step 2: refusing to write {out / 'ckpt-00000002'}: non-finite values in weight dit." in err
    assert not list(out.glob("ckpt-*")) and not (out / "final").exists() and _stale(out) == []


def test_no_export_with_a_nonfinite_ema(tmp_path):
    from ospfn.train.build import make_trainer
    from ospfn.train.config import load_config
    from ospfn.train.sft import SFTConfig
    from ospfn.train.step import NonFiniteError

    out = tmp_path / "run"
    cfg = load_config(_cfg(tmp_path, out), SFTConfig)
    trainer = make_trainer(cfg, out)
    trainer.start(out)
    trainer.train_step()
    name = sorted(trainer.ema.shadow)[-1]
    trainer.ema.shadow[name].view(-1)[-1] = float("inf")
    with pytest.raises(NonFiniteError, match=re.escape(f"step 1: refusing to write {out / 'final'}: non-finite values in EMA {name}") + "$"):
        trainer.export(out / "final")
    with pytest.raises(NonFiniteError, match=re.escape(f"step 1: refusing to write {out / 'ckpt-00000001'}: non-finite values in EMA {name}") + "$"):
        trainer.save(out)
    assert not (out / "final").exists() and not list(out.glob("ckpt-*")) and _stale(out) == []


def test_nonfinite_config_value_is_checked(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "train.py"), "--config", str(_cfg(tmp_path, tmp_path / "r", **{"train.nonfinite": "ignore"})),
                        "--device", "cpu"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "train.nonfinite" in r.stderr and "'ignore'" in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------------------
# the run log


def test_runlog_start_drops_later_steps_and_a_torn_line(tmp_path):
    from ospfn.train.runlog import RunLog

    p = tmp_path / "log.jsonl"
    p.write_text('{"step": 1, "loss": 1.0}\n{"step": 2}\nnot json, kept\n{"step": 3}\n{"step": 5}\n{"step": 4, "lo')
    log = RunLog(p)
    assert log.start(3) == 2  # step 5 and the torn line
    assert p.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2}\nnot json, kept\n{"step": 3}\n'
    assert log.start(3) == 0 and p.read_text().endswith('{"step": 3}\n')  # nothing to do: untouched
    assert log.append({"step": 4, "loss": float("inf"), "x": [float("-inf")]}) == '{"step": 4, "loss": "inf", "x": ["-inf"]}'
    assert [r["step"] for r in log.records()] == [1, 2, 3, 4]
    assert log.start(0) == 4 and p.read_text() == "not json, kept\n"
    assert RunLog(tmp_path / "none.jsonl").start(7) == 0 and not (tmp_path / "none.jsonl").exists()


def test_resume_after_a_lost_checkpoint_logs_each_step_once(tmp_path, monkeypatch):
    from ospfn.train.step import Trainer

    out = tmp_path / "run"
    cfg = _cfg(tmp_path, out)
    save = Trainer.save

    class Died(Exception):
        pass

    def die_at_4(self, out_dir):  # the run dies after logging step 4, before its checkpoint
        if self.step == 4:
            raise Died
        return save(self, out_dir)

    monkeypatch.setattr(Trainer, "save", die_at_4)
    with pytest.raises(Died):
        _run(cfg, "--stop-after", "4")
    monkeypatch.setattr(Trainer, "save", save)
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # and a torn line, as a SIGKILL mid-write leaves
    rc, stdout, err = _run(cfg, "--resume")
    assert rc == 0, err
    assert f"{out / 'log.jsonl'}: dropped 3 lines after step 2 (re-run now)" in stdout
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]


def test_rank0_cannot_create_out_dir_one_process(tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    rc, _, err = _run(_cfg(tmp_path, out))
    assert rc == 2
    assert f"error: out_dir {out}: cannot create or write it: Not a directory" in err


# ----------------------------------------------------------------------------------------------------------
# SIGKILL at random moments


STEPS = 12  # long enough for six kills: one sets the run back to its last checkpoint, or moves it <= 4 steps on


def _kill_cfg(tmp_path: Path, out: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "recipes" / "configs" / "tiny_flashi2v.yaml").read_text())
    cfg["out_dir"] = str(out)
    cfg["data"].update(num_samples=32)
    cfg["optim"].update(warmup_steps=3)
    cfg["train"].update(steps=STEPS, batch_size=2, log_every=1, ckpt_every=2, keep=2)
    p = tmp_path / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _start(cfg: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "recipes" / "train.py"), "--config", str(cfg), "--no-progress", "--device", "cpu", "--threads", "1"]
    err = open(cfg.with_suffix(".stderr"), "w")  # a file, not a pipe nobody reads while the run goes on
    proc = subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=subprocess.DEVNULL, stderr=err)
    err.close()
    proc.stderr_path = cfg.with_suffix(".stderr")
    return proc


def _stderr(proc) -> str:
    return Path(proc.stderr_path).read_text()


def _records(run: Path) -> int:
    try:
        return (run / "log.jsonl").read_text().count("\n")
    except FileNotFoundError:
        return 0


def _wait_and_kill(proc: subprocess.Popen, run: Path, rng: random.Random, mode: str) -> str | None:
    """Kill ``proc`` as soon as a temporary checkpoint directory appears (mode "ckpt"), or a random moment
    after it logged its n-th new record ("step"); None if it finished first, else what was on disk."""
    old = set(_stale(run))  # left by the previous kill (this run sweeps them on start)
    done = int((run / "latest").read_text().strip()[len("ckpt-"):]) if (run / "latest").exists() else 0
    seen_tmp, n, low = set(), min(rng.randint(1, 4), max(1, STEPS - done)), _records(run)
    want_tmp, delay = rng.randint(1, 2), rng.uniform(0.0, 0.3)
    while proc.poll() is None:
        if mode == "ckpt":
            seen_tmp |= set(_stale(run)) - old
            if len(seen_tmp) >= want_tmp:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.0005)
        else:
            now = _records(run)
            low = min(low, now)  # the log is cut back to the resumed step first
            if now >= low + n:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    proc.wait()
    if proc.returncode == 0:
        return None
    assert proc.returncode == -signal.SIGKILL, _stderr(proc)
    return "mid-checkpoint" if set(_stale(run)) - old else "between files"


def _state(run: Path) -> dict:
    ck = run / f"ckpt-{STEPS:08d}"
    return {"model": load_file(ck / "model.safetensors"), "ema": load_file(ck / "ema.safetensors"),
            "final": load_file(run / "final" / "diffusion_pytorch_model.safetensors"),
            "state": torch.load(ck / "state.pt", weights_only=True)}  # fmt: skip


def _same(a, b, where="") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _start(_kill_cfg(tmp_path, straight), resume=False)
    assert proc.wait(timeout=300) == 0, _stderr(proc)
    cfg = _kill_cfg(tmp_path, killed)
    rng = random.Random(20240611)
    kills = []
    for i in range(6):
        proc = _start(cfg, resume=(killed / "latest").exists())
        landed = _wait_and_kill(proc, killed, rng, "ckpt" if i % 2 == 0 else "step")
        if landed is None:
            break
        kills.append(landed)
    assert len(kills) >= 4 and "mid-checkpoint" in kills, kills
    proc = _start(cfg, resume=(killed / "latest").exists())
    assert proc.wait(timeout=300) == 0, _stderr(proc)
    assert _stale(killed) == [], "temporary checkpoint directories of the killed runs are left"
    a, b = _state(straight), _state(killed)
    # torch's global RNG starts from a different state in every process (training draws nothing from it:
    # all noise comes from per-step generators), so the two runs' saved copies of it differ from the start
    a["state"].pop("torch_rng"), b["state"].pop("torch_rng")
    assert a["state"]["config"].pop("out_dir") != b["state"]["config"].pop("out_dir")
    _same(a, b, "state")
    la, lb = _log(straight), _log(killed)
    assert [r["step"] for r in lb] == list(range(1, STEPS + 1)), [r["step"] for r in lb]
    drop = lambda r: {k: v for k, v in r.items() if k != "step_time"}  # noqa: E731
    assert [drop(r) for r in la] == [drop(r) for r in lb]
    assert sorted(p.name for p in killed.iterdir()) == [f"ckpt-{STEPS - 2:08d}", f"ckpt-{STEPS:08d}", "final", "latest", "log.jsonl"]
