"""Distributed failures speak on every rank: a failure only one rank sees (rank 0 cannot create out_dir or
write ``latest``; one rank's view of a checkpoint shard is missing, truncated or garbage; one rank's data
index is missing; a NaN on one rank) ends the run on every rank with the same message naming the rank and
the file or step -- never gloo's "Connection closed by peer" on the others, never a hang.

Each launch runs several cases on 2 gloo ranks (``dist_harness.run_ranks``, under a timeout); a case is a
call of ``recipes/train.py``'s ``main`` whose exit code and stderr every rank reports back.
"""

import contextlib
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from dist_harness import run_ranks
from safetensors.torch import load_file

from conftest import config_with

ROOT = Path(__file__).resolve().parents[1]

CFG = {
    "model": {"preset": "tiny", "overrides": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "num_full_blocks": 0, "text_dim": 16, "freq_dim": 16}},
    "text": {"text_len": 12, "vocab": 128},
    "vae": {"kind": "pixel", "spatial": 2},
    "data": {"kind": "synthetic", "num_samples": 16, "frames": 3, "size": [16, 16], "seed": 0},
    "optim": {"lr": 1.0e-3, "warmup_steps": 1, "ema_decay": 0.9},
    "train": {"task": "flashi2v", "steps": 2, "batch_size": 2, "log_every": 1, "ckpt_every": 2, "seed": 5},
    "sample": {"steps": 2},
}


def _cfg(tmp: Path, out, name: str, **changes) -> str:
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(config_with(CFG, out, **changes)))
    return str(p)


def _train_main(argv):
    spec = importlib.util.spec_from_file_location("recipe_train", ROOT / "recipes" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def _inject(rank: int, kind: str | None):
    """On rank 1 only: a NaN loss ("loss") or a NaN gradient with a finite loss ("grad") at step 2.
    Returns the undo function."""
    from ospfn.train.step import Trainer

    if kind is None or rank != 1:
        return lambda: None
    micro_loss = Trainer.micro_loss

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return torch.full_like(g, float("nan"))

    def bad(self, micro):
        loss = micro_loss(self, micro)
        if self.step + 1 == 2:
            return loss * float("nan") if kind == "loss" else NanGrad.apply(loss)
        return loss

    Trainer.micro_loss = bad
    return lambda: setattr(Trainer, "micro_loss", micro_loss)


def _ranks_cases(rank, world, cases):
    """Run each case (name, argv, per-rank cwd or None, NaN injection or None); {name: (exit code, stderr)}."""
    results = {}
    for name, argv, cwds, nan in cases:
        if cwds is not None:
            os.chdir(cwds[rank])
        undo = _inject(rank, nan)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    rc = _train_main(argv + ["--no-progress", "--device", "cpu"])
                except SystemExit as e:
                    rc = e.code
        finally:
            undo()
        results[name] = (rc, err.getvalue())
    return results


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _every_rank_says(results: list[dict], name: str, rc: int, message: str) -> None:
    """Every rank exits ``rc`` with one error line, the same on every rank, containing ``message``."""
    per_rank = [r[name] for r in results]
    for rank, (code, err) in enumerate(per_rank):
        assert code == rc and message in err, f"{name}, rank {rank}: exit {code}, stderr:\n{err[-3000:]}"
        assert "Connection closed" not in err and "Traceback" not in err, f"{name}, rank {rank}:\n{err[-3000:]}"
    lines = [_errors(err) for _, err in per_rank]
    assert all(len(x) == 1 for x in lines) and len({x[0] for x in lines}) == 1, f"{name}: {lines}"


def _ranks_agree(rank, world):
    from ospfn.parallel import agree

    out = []
    for oks in ([True, True], [True, False], [False, False]):
        try:
            agree(oks[rank], f"disk full on node {rank}", error=ValueError)
            out.append("ok")
        except ValueError as e:
            out.append(str(e))
    return out


def test_agree_raises_the_first_failing_ranks_message_on_every_rank():
    from ospfn.parallel import agree

    assert run_ranks(_ranks_agree, 2, timeout=120) == [["ok", "rank 1: disk full on node 1", "rank 0: disk full on node 0 (and 1 more rank)"]] * 2
    agree(True, "unused")  # no process group: this process's own verdict
    with pytest.raises(OSError, match="^no space left$"):
        agree(False, "no space left", error=OSError)


def test_failures_of_a_fresh_run_are_reported_on_every_rank(tmp_path):
    (tmp_path / "a_file").write_text("")
    no_dir = tmp_path / "a_file" / "run"  # only rank 0 creates out_dir
    blocked = tmp_path / "blocked"
    (blocked / "latest").mkdir(parents=True)  # rank 0 cannot write the 'latest' pointer of the first checkpoint
    cases = [
        ("out_dir", ["--config", _cfg(tmp_path, no_dir, "out_dir")], None, None),
        ("latest", ["--config", _cfg(tmp_path, blocked, "latest")], None, None),
        ("nan_stop", ["--config", _cfg(tmp_path, tmp_path / "nan_stop", "nan_stop")], None, "loss"),
        ("nan_grad_skip", ["--config", _cfg(tmp_path, tmp_path / "skip", "skip", **{"train.steps": 3, "train.nonfinite": "skip"})],
         None, "grad"),
    ]  # fmt: skip
    results = run_ranks(_ranks_cases, 2, cases, timeout=240)
    _every_rank_says(results, "out_dir", 2, f"error: rank 0: out_dir {no_dir}: cannot create or write it: Not a directory")
    _every_rank_says(results, "latest", 1, f"error: rank 0: step 2: cannot write the checkpoint {blocked / 'ckpt-00000002'}: "
                                           f"Is a directory: {blocked / 'latest'}")  # fmt: skip
    # a NaN loss on rank 1 only: both ranks stop at step 2, nothing of it written
    _every_rank_says(results, "nan_stop", 1, "error: step 2: non-finite loss (nan) and gradient norm (nan); stopping without applying")
    assert not list((tmp_path / "nan_stop").glob("ckpt-*")) and not (tmp_path / "nan_stop" / "final").exists()
    # a NaN gradient on rank 1 only (finite losses): both ranks skip step 2 and go on
    assert [r["nan_grad_skip"][0] for r in results] == [0, 0], [r["nan_grad_skip"][1][-2000:] for r in results]
    log = [json.loads(x) for x in (tmp_path / "skip" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("skipped", False), r["skipped_nonfinite"]) for r in log] == [(1, False, 0), (2, True, 1), (3, False, 1)]
    assert log[1]["grad_norm"] == "nan" and isinstance(log[1]["loss"], float)
    weights = load_file(tmp_path / "skip" / "final" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert json.loads((tmp_path / "skip" / "ckpt-00000003" / "train_state.json").read_text())["skipped_nonfinite"] == 1
    assert sorted(p.name for p in (tmp_path / "skip").iterdir()) == ["ckpt-00000002", "ckpt-00000003", "final", "latest", "log.jsonl"]


def test_damaged_checkpoint_shards_are_reported_on_every_rank(tmp_path):
    base = tmp_path / "base"
    run_ranks(_ranks_cases, 2, [("make", ["--config", _cfg(tmp_path, base, "base")], None, None)], timeout=240)
    ck = base / "ckpt-00000002"
    assert sorted(p.name for p in ck.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.json"]

    def damaged(name):
        run = tmp_path / name
        shutil.copytree(base, run)
        return run, run / "ckpt-00000002"

    truncated, tck = damaged("truncated")
    size = (tck / "__1_0.distcp").stat().st_size
    with open(tck / "__1_0.distcp", "r+b") as f:
        f.truncate(size // 2)
    missing, mck = damaged("missing")
    (mck / "__0_0.distcp").unlink()
    garbage, gck = damaged("garbage")
    (gck / "__1_0.distcp").write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    state, sck = damaged("bad_state")
    (sck / "train_state.json").write_text('{"step": 2, "data_pos"')
    # rank 1 alone sees a damaged copy: ``--resume ckpt`` is relative to each rank's working directory
    views = [tmp_path / "view0", tmp_path / "view1"]
    for v in views:
        shutil.copytree(ck, v / "ckpt")
    with open(views[1] / "ckpt" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    longer = {"train.steps": 4}
    cases = [
        ("truncated", ["--config", _cfg(tmp_path, truncated, "t", **longer), "--resume"], None, None),
        ("missing", ["--config", _cfg(tmp_path, missing, "m", **longer), "--resume"], None, None),
        ("garbage", ["--config", _cfg(tmp_path, garbage, "g", **longer), "--resume"], None, None),
        ("bad_state", ["--config", _cfg(tmp_path, state, "s", **longer), "--resume"], None, None),
        ("rank1_view", ["--config", _cfg(tmp_path, tmp_path / "views_out", "v", **longer), "--resume", "ckpt"], [str(v) for v in views], None),
    ]  # fmt: skip
    results = run_ranks(_ranks_cases, 2, cases, timeout=300)
    _every_rank_says(results, "truncated", 2, f"error: rank 0: --resume: {tck / '__1_0.distcp'}: truncated ({size // 2} bytes, "
                                              "the checkpoint's .metadata needs ")  # fmt: skip
    _every_rank_says(results, "missing", 2, f"error: rank 0: --resume: {mck / '__0_0.distcp'}: missing (the checkpoint's .metadata lists it)")
    _every_rank_says(results, "garbage", 2, f"error: --resume: cannot read the checkpoint {gck}: rank ")
    _every_rank_says(results, "garbage", 2, f"{gck / '__1_0.distcp'}: unreadable, corrupt")
    _every_rank_says(results, "bad_state", 2, f"error: rank 0: --resume: {sck / 'train_state.json'}: unreadable (JSONDecodeError: ")
    _every_rank_says(results, "rank1_view", 2, f"error: rank 1: --resume: {views[1] / 'ckpt' / '__0_0.distcp'}: truncated (100 bytes, ")
    for run in (truncated, missing, garbage, state):
        assert sorted(p.name for p in run.iterdir()) == ["ckpt-00000002", "final", "latest", "log.jsonl"]  # nothing written
    # and the undamaged checkpoint still resumes
    results = run_ranks(_ranks_cases, 2, [("resume", ["--config", _cfg(tmp_path, base, "b4", **longer), "--resume"], None, None)], timeout=240)
    assert [r["resume"][0] for r in results] == [0, 0]
    assert (base / "latest").read_text().strip() == "ckpt-00000004"


def test_one_ranks_missing_data_index_is_reported_on_every_rank(tmp_path):
    meta = [{"path": "a.mp4", "cap": "a clip", "resolution": {"height": 480, "width": 640}, "fps": 30, "num_frames": 300}]
    views = [tmp_path / "view0", tmp_path / "view1"]
    for v in views:
        v.mkdir()
    (views[0] / "meta.json").write_text(json.dumps(meta))
    (views[0] / "index.txt").write_text("videos,meta.json\n")  # rank 1's working directory has no index.txt
    data = {"data.kind": "video", "data.index": "index.txt", "data.frames": 3, "data.buckets": [[16, 16]]}
    cases = [("index", ["--config", _cfg(tmp_path, tmp_path / "out", "idx", **data)], [str(v) for v in views], None)]
    results = run_ranks(_ranks_cases, 2, cases, timeout=180)
    _every_rank_says(results, "index", 2, "error: rank 1: data.index: no such file: index.txt")
