"""The Mix-GRPO recipe (ospfn.rl.trainer, recipes/train_rl.py) on the bundled tiny FlashI2V model: the update
recomputes exactly the policy that sampled, the KL is zero while the adapter is zero, N + resume + N iterations
equal 2N bit for bit, and data / sequence parallel runs on 2 gloo ranks equal one process."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ospfn.rl.config import RLConfig
from ospfn.rl.trainer import make_rl_trainer
from ospfn.train.config import ConfigError, load_config
from dist_harness import run_ranks

BASE = {
    "lora": {"rank": 4, "alpha": 4.0},
    "prompts": {"num_prompts": 32, "frames": 3, "size": [16, 16]},  # 48 tokens: the bundled model at a small size
    "rollout": {"steps": 5, "shift": 3.0, "guidance": 1.0, "prompts_per_iter": 2, "k": 2,
                "window": {"strategy": "sliding", "size": 2, "iters_per_window": 1}},
    "rewards": [{"name": "fidelity", "weight": 1.0}],
    "grpo": {"micro_batch": 4, "clip_range": 1.0e-3},
    "optim": {"lr": 1.0e-3, "ema_decay": 0.5},
    "train": {"iterations": 2, "ckpt_every": 1},
}  # fmt: skip


def config(out_dir, **over) -> RLConfig:
    d = copy.deepcopy(BASE)
    d["out_dir"] = str(out_dir)
    for key, value in over.items():
        sec, _, name = key.partition(".")
        if name:
            d.setdefault(sec, {})[name] = value
        else:
            d[sec] = value
    return load_config(d, RLConfig)


def adapter_state(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.named.items()}


def test_the_update_recomputes_the_sampling_policy(tmp_path):
    """Iteration 1: the adapter is zero, so the KL to the adapter-disabled model is exactly 0; the update's
    log-probabilities equal the rollout's bit for bit (ratio 1, approximate KL 0).  The step moves the adapter;
    iteration 2 samples with it, so its KL is positive, and its ratio is again exactly 1."""
    torch.manual_seed(0)
    tr = make_rl_trainer(config(tmp_path), tmp_path)
    before = adapter_state(tr)
    r1 = tr.iterate()
    assert (r1["kl"], r1["approx_kl"], r1["ratio_mean"], r1["clip_frac"]) == (0.0, 0.0, 1.0, 0.0)
    assert r1["kept"] == 4 and r1["samples"] == 4 and r1["window"] == [0, 2] and r1["trained_steps"] == 2
    after = adapter_state(tr)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("lora_B"))
    r2 = tr.iterate()
    assert r2["window"] == [1, 3] and r2["kl"] > 0
    assert (r2["approx_kl"], r2["ratio_mean"]) == (0.0, 1.0)


def test_resume_is_exact(tmp_path):
    """2 iterations, and 1 + resume + 1: the same adapter, EMA, optimizer state and logged rewards, bit for bit."""
    whole = make_rl_trainer(config(tmp_path / "a"), tmp_path / "a")
    recs = [whole.iterate(), whole.iterate()]
    cut = make_rl_trainer(config(tmp_path / "b"), tmp_path / "b")
    first = cut.iterate()
    cut.save(tmp_path / "b")
    resumed = make_rl_trainer(config(tmp_path / "b"), tmp_path / "b", resume="latest")
    assert resumed.iteration == 1
    second = resumed.iterate()
    for k in whole.named:
        assert torch.equal(whole.named[k], resumed.named[k]), k
        assert torch.equal(whole.ema.shadow[k], resumed.ema.shadow[k]), k
    sa, sb = whole.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert [r["reward_fidelity_mean"] for r in recs] == [first["reward_fidelity_mean"], second["reward_fidelity_mean"]]


def _rank_run(rank, world, cfg_dict, out):
    from ospfn.rl.config import RLConfig
    from ospfn.rl.trainer import make_rl_trainer
    from ospfn.train.config import load_config

    tr = make_rl_trainer(load_config(cfg_dict, RLConfig), out)
    rec = tr.iterate()
    return {k: v.detach().clone() for k, v in tr.named.items()}, rec


@pytest.mark.parametrize("parallel", [{"skiparse_sp": 1}, {"skiparse_sp": 2}], ids=["data-parallel", "skiparse-sp"])
def test_two_ranks_equal_one_process(tmp_path, parallel):
    """One iteration on 2 gloo ranks (2 data-parallel replicas of one prompt group each, or one replica whose
    Skiparse SP group of 2 shares the samples) gives the one-process adapter and rewards."""
    cfg = config(tmp_path / "one", parallel=parallel)
    single = make_rl_trainer(config(tmp_path / "one"), tmp_path / "one")
    rec = single.iterate()
    d = cfg.to_dict()
    d["out_dir"] = str(tmp_path / "dist")
    results = run_ranks(_rank_run, 2, d, str(tmp_path / "dist"), timeout=300)
    for weights, r in results:
        assert r["samples"] == rec["samples"] and r["reward_fidelity_mean"] == pytest.approx(rec["reward_fidelity_mean"], rel=1e-5)
        assert r["loss"] == pytest.approx(rec["loss"], abs=1e-6)  # ratio 1: the loss is -mean(A) (~0) up to rounding
        assert r["grad_norm"] == pytest.approx(rec["grad_norm"], rel=1e-4)  # the summed gradient is the one-process one
        assert r["kl"] == rec["kl"] == 0.0 and r["approx_kl"] == rec["approx_kl"] == 0.0
        for k, v in single.named.items():
            torch.testing.assert_close(weights[k], v.detach(), rtol=1e-4, atol=1e-7)
    moved = [k for k, v in single.named.items() if k.endswith("lora_B") and v.abs().max() > 0]
    assert moved  # the comparison is of an adapter that moved


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout.k must be an int >= 2, got 1"):
        config(tmp_path, **{"rollout.k": 1})
    with pytest.raises(ConfigError, match=r"unknown reward 'beauty'; known: \['fidelity', 'first_frame', 'motion', 'sharpness'\]"):
        config(tmp_path, rewards=[{"name": "beauty"}])
    with pytest.raises(ConfigError, match=r"lora.targets must be a non-empty list of distinct names"):
        config(tmp_path, **{"lora.targets": ["self_attn.qq"]})
    with pytest.raises(ConfigError, match=r"rollout.window: .*size"):
        config(tmp_path, **{"rollout.window": {"strategy": "fixed", "size": 9}})
    with pytest.raises(ConfigError, match=r"unknown key grpo.clip"):
        config(tmp_path, **{"grpo.clip": 0.1})


def _recipe():
    spec = importlib.util.spec_from_file_location("train_rl", Path(__file__).resolve().parents[1] / "recipes" / "train_rl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_writes_checkpoints_log_and_the_ema_adapter(tmp_path, capsys):
    from ospfn.lora import load_lora

    import yaml

    d = json.loads(json.dumps(config(tmp_path / "run").to_dict()))
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(d))
    rec = _recipe()
    assert rec.main(["--config", str(path), "--no-progress", "--device", "cpu"]) == 0
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    for key in ("reward_fidelity_mean", "reward_fidelity_std", "kl", "clip_frac", "approx_kl", "window", "step_time"):
        assert key in lines[0]
    adapter = load_lora(run / "final")
    assert adapter.config.rank == 4 and any(float(v.abs().max()) > 0 for k, v in adapter.weights.items() if k.endswith("lora_B"))
    # a changed config refuses to resume, naming the key
    d["grpo"]["beta"] = 0.5
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(SystemExit) as e:
        rec.main(["--config", str(path), "--no-progress", "--device", "cpu", "--resume"])
    assert e.value.code == 2 and "grpo.beta" in capsys.readouterr().err
