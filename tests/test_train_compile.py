"""``train.compile``: every DiT block compiled with torch.compile (inductor) trains like the eager model.

The blocks are compiled one by one (``block.compile()``, ``ospfn.train.step.compile_blocks``); the model
forward around them -- Skiparse re-layouts, sequence-parallel collectives between blocks, the head -- stays
eager.  Tolerances: inductor fuses and reorders fp32 arithmetic, so compiled and eager agree to fp32
rounding (measured: losses identical to 9 digits, gradients to ~2e-6 relative), not bit for bit.  AdamW
normalises every update to about lr, so a gradient at the level of the rounding noise would still move its
weight by ~lr in either run; the recipe's eps = 1e-15 does that for weights whose exact gradient is 0 (the
text encoder's key bias: softmax ignores it), so these tests use eps = 1e-8, under which rounding noise moves
a weight by <= lr * 1e-4 and the weights must agree to 1e-5 (lr = 1e-3: a hundredth of one step).
"""


import pytest
from conftest import config_with
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from ospfn.train.build import local_trainer
from ospfn.train.config import ConfigError, load_config
from ospfn.train.sft import SFTConfig, TrainSection, resume_conflicts

# the tiny preset as is (8 blocks: 2 full, 4 Skiparse alternating token / group, 2 full) on 2 x 4 x 4 latents
CFG = {
    "model": {"preset": "tiny"},
    "text": {"text_len": 8, "vocab": 64},
    "vae": {"kind": "pixel", "spatial": 4},
    "data": {"kind": "synthetic", "num_samples": 16, "frames": 2, "size": [16, 16], "seed": 0},
    "optim": {"lr": 1.0e-3, "warmup_steps": 1, "ema_decay": 0.9, "eps": 1.0e-8},
    "train": {"task": "flashi2v", "steps": 3, "batch_size": 2, "seed": 1, "log_every": 1, "ckpt_every": 3},
    "sample": {"steps": 2},
}
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


def _cfg(out, **changes) -> dict:
    return config_with(CFG, out, **changes)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compile_key_defaults_off_and_is_validated(tmp_path):
    assert load_config(_cfg(tmp_path), SFTConfig).train.compile is False
    assert load_config(_cfg(tmp_path, **{"train.compile": True}), SFTConfig).train.compile is True
    with pytest.raises(ConfigError, match=r"train\.compile: expected true/false, got str 'yes'"):
        load_config(_cfg(tmp_path, **{"train.compile": "yes"}), SFTConfig)
    with pytest.raises(ConfigError, match=r"train\.compile: expected true/false, got int 1"):
        load_config(_cfg(tmp_path, **{"train.compile": 1}), SFTConfig)
    with pytest.raises(ValueError, match=r"train\.compile must be true or false, got int 1"):
        TrainSection(compile=1)
    # an execution switch, not a hyper-parameter: a run may be resumed with it flipped, and checkpoints
    # written before the key existed resume as before
    saved = load_config(_cfg(tmp_path), SFTConfig).to_dict()
    assert resume_conflicts(saved, load_config(_cfg(tmp_path, **{"train.compile": True}), SFTConfig).to_dict()) == []
    del saved["train"]["compile"]
    assert resume_conflicts(saved, load_config(_cfg(tmp_path), SFTConfig).to_dict()) == []


def _close(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)
    assert worst <= atol, worst
    return worst


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path):
    eager = local_trainer(load_config(_cfg(tmp_path / "eager"), SFTConfig), tmp_path / "eager")
    comp = local_trainer(load_config(_cfg(tmp_path / "comp", **{"train.compile": True}), SFTConfig), tmp_path / "comp")
    blocks = comp.model.blocks_list
    assert comp.compiled_blocks == len(blocks) == 8
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert all(b._compiled_call_impl is None for b in eager.model.blocks_list)
    for _ in range(3):
        a, b = eager.train_step(), comp.train_step()
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    _close(eager.named, comp.named, WEIGHT_ATOL)
    _close(eager.ema.shadow, comp.ema.shadow, WEIGHT_ATOL)
    # the blocks really ran compiled, and only the blocks: the eight blocks share at most one dynamo frame /
    # graph per block layout (full, token, group; after the first shape change dynamo may serve the other
    # layouts with one dynamic-shape graph), without graph breaks; the forward around them was never traced
    frames, graphs = counters["frames"]["ok"], counters["stats"]["unique_graphs"]
    assert 1 <= frames <= 3 and 1 <= graphs <= 3, (dict(counters["frames"]), dict(counters["stats"]))
    assert not dict(counters["graph_break"]), dict(counters["graph_break"])


def _fsdp_steps(rank, world, cfg: dict, steps: int):
    from ospfn.train.build import make_trainer

    counters.clear()
    trainer = make_trainer(load_config(cfg, SFTConfig), cfg["out_dir"])
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in trainer.named.items()}
    compiled = [b._compiled_call_impl is not None for b in trainer.model.blocks_list]
    return {"losses": losses, "weights": weights if rank == 0 else None, "compiled": compiled, "frames": dict(counters["frames"]),
            "breaks": dict(counters["graph_break"])}  # fmt: skip


@pytest.mark.slow
def test_compiled_blocks_under_fsdp(tmp_path):
    """Two data-parallel ranks: blocks compiled after ``fully_shard`` (FSDP's hooks run around the compiled
    block calls) give the eager FSDP run's losses and weights."""
    from dist_harness import run_ranks

    eager = run_ranks(_fsdp_steps, 2, _cfg(tmp_path / "eager"), 2)
    comp = run_ranks(_fsdp_steps, 2, _cfg(tmp_path / "comp", **{"train.compile": True}), 2, timeout=900)
    assert all(r["compiled"] == [True] * 8 and r["frames"].get("ok", 0) >= 3 for r in comp), [(r["compiled"], r["frames"]) for r in comp]
    assert not any(any(r["compiled"]) for r in eager)
    assert comp[0]["losses"] == pytest.approx(eager[0]["losses"], rel=LOSS_RTOL)
    _close(eager[0]["weights"], comp[0]["weights"], WEIGHT_ATOL)
    assert not comp[0]["breaks"], comp[0]["breaks"]  # no graph breaks in the compiled blocks under FSDP2 either
