"""The Mix-GRPO recipe in its FSDP2 mode (``parallel.fsdp: true``) on 2 gloo ranks: one iteration equals one
process on the same global batch (data parallel, with one replica running zero-weighted micro-batches; and
Skiparse SP), 1 + DCP save + resume + 1 iterations equal 2 bit for bit, and the export is the gathered EMA.

One pair of spawned ranks runs every distributed check (starting them is most of the time)."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks

from ospfn.rl.config import RLConfig
from ospfn.train.config import ConfigError, load_config

BASE = {
    "lora": {"rank": 4, "alpha": 4.0},
    "prompts": {"num_prompts": 32, "frames": 3, "size": [16, 16]},  # 48 tokens: the bundled model at a small size
    "rollout": {"steps": 5, "shift": 3.0, "guidance": 3.0, "prompts_per_iter": 4, "k": 2,
                "window": {"strategy": "sliding", "size": 2, "iters_per_window": 1}},
    "rewards": [{"name": "fidelity", "weight": 1.0}],
    "grpo": {"micro_batch": 2, "clip_range": 1.0e-3},
    "optim": {"lr": 1.0e-3, "ema_decay": 0.5},
    "train": {"iterations": 2, "ckpt_every": 1},
}  # fmt: skip
ZEROED = slice(6, 8)  # the last prompt group (on replica 1 of 2): its advantages are set to 0


def config(out_dir, **parallel) -> RLConfig:
    d = copy.deepcopy(BASE)
    d["out_dir"] = str(out_dir)
    d["parallel"] = parallel
    return load_config(d, RLConfig)


def _zero_last_group() -> None:
    """Patch the trainer's advantages: the last group takes no part in the update, so replica 1 of 2 keeps
    2 samples (one micro-batch per trained step) while replica 0 keeps 4 (two): replica 1 must pad."""
    import ospfn.rl.trainer as T

    combine = T.combine_rewards

    def patched(*args, **kwargs):
        adv = combine(*args, **kwargs).clone()
        adv[ZEROED] = 0
        return adv

    T.combine_rewards = patched


def _local_state(tr) -> dict:
    """This rank's shards: adapter, EMA, optimizer state (for bitwise comparisons on the same sharding)."""
    local = lambda t: (t.to_local() if hasattr(t, "to_local") else t).detach().clone()  # noqa: E731
    opt = {k: {n: local(v) for n, v in tr.opt.state[p].items()} for k, p in tr.named.items()}
    return {"adapter": {k: local(v) for k, v in tr.named.items()}, "ema": dict(tr.ema.shadow), "opt": opt}


def _differ(a: dict, b: dict, prefix="") -> list[str]:
    out = []
    for k in a:
        if isinstance(a[k], dict):
            out += _differ(a[k], b[k], f"{prefix}{k}.")
        elif not torch.equal(a[k], b[k]):
            out.append(prefix + k)
    return out


def _recipe():
    spec = importlib.util.spec_from_file_location("train_rl", Path(__file__).resolve().parents[1] / "recipes" / "train_rl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _yaml(out_dir) -> str:
    import yaml

    path = Path(f"{out_dir}.yaml")
    path.write_text(yaml.safe_dump(json.loads(json.dumps(config(out_dir, fsdp=True).to_dict()))))
    return str(path)


def _ranks(rank, world, tmp, single_ckpt):
    from ospfn.lora import load_lora
    from ospfn.model.checkpoint import read_dcp_metadata
    from ospfn.rl.trainer import make_rl_trainer
    from ospfn.train.build import TrainError

    _zero_last_group()
    out = {}
    run = f"{tmp}/dp"
    # data parallel: 2 replicas of 2 prompt groups each
    tr = make_rl_trainer(config(run, fsdp=True), run)
    out["sharded"] = all(hasattr(p, "full_tensor") for p in tr.named.values()) and tr.params is None
    out["rec1"] = tr.iterate()
    out["after1"] = tr.adapter_weights()
    tr.save(run)  # DCP checkpoint of iteration 1
    out["rec2"] = tr.iterate()
    whole = _local_state(tr)
    ema = tr.ema.full()
    tr.export(f"{run}/final")
    if rank == 0:
        exported = load_lora(f"{run}/final").weights
        out["export_diff"] = [k for k in ema if not torch.equal(exported[k], ema[k])] + sorted(set(exported) ^ set(ema))
        keys = list(read_dcp_metadata(f"{run}/ckpt-00000001").state_dict_metadata)
        out["base_in_ckpt"] = [k for k in keys if k.startswith("model.") and not k.endswith(("lora_A", "lora_B", "lora_bias"))]
    # resume from iteration 1: the same second iteration, bit for bit
    res = make_rl_trainer(config(run, fsdp=True), run, resume="latest")
    out["resumed_at"] = res.iteration
    out["rec2_resumed"] = res.iterate()
    out["resume_diff"] = _differ(whole, _local_state(res))
    # a single-file checkpoint (one process) cannot be resumed by the FSDP2 mode: the error says what to do
    try:
        make_rl_trainer(config(run, fsdp=True), run, resume=single_ckpt)
        out["wrong_format"] = None
    except TrainError as e:
        out["wrong_format"] = str(e)
    # the recipe's loop (log on rank 0, a DCP checkpoint per iteration, the export at the end): the same run
    out["recipe_rc"] = _recipe().main(["--config", _yaml(f"{tmp}/recipe"), "--no-progress"])
    if rank == 0:
        exported = load_lora(f"{tmp}/recipe/final").weights
        out["recipe_export_diff"] = [k for k in ema if not torch.equal(exported[k], ema[k])]
        out["recipe_log"] = (Path(tmp) / "recipe" / "log.jsonl").read_text().splitlines()
        out["recipe_ckpts"] = sorted(x.name for x in (Path(tmp) / "recipe").glob("ckpt-*"))
    # Skiparse SP: one replica whose SP group of 2 shares the samples
    sp = make_rl_trainer(config(f"{tmp}/sp", fsdp=True, skiparse_sp=2), f"{tmp}/sp")
    out["rec_sp"] = sp.iterate()
    out["after_sp"] = sp.adapter_weights()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (the reference) and the 2-rank run of every check."""
    import ospfn.rl.trainer as T
    from ospfn.rl.trainer import make_rl_trainer

    tmp = tmp_path_factory.mktemp("rl_dist")
    combine = T.combine_rewards
    _zero_last_group()
    try:
        single = make_rl_trainer(config(tmp / "one"), tmp / "one")
        rec = single.iterate()
        ckpt = single.save(tmp / "one")
    finally:
        T.combine_rewards = combine
    ranks = run_ranks(_ranks, 2, str(tmp), str(ckpt), timeout=300)
    return {"rec": rec, "weights": single.adapter_weights(), "ranks": ranks, "tmp": tmp}


def _assert_matches(weights, rec, ref_weights, ref_rec):
    assert rec["samples"] == ref_rec["samples"] == 8 and rec["kept"] == ref_rec["kept"] == 6
    assert rec["reward_fidelity_mean"] == pytest.approx(ref_rec["reward_fidelity_mean"], rel=1e-5)
    assert rec["loss"] == pytest.approx(ref_rec["loss"], abs=1e-6)  # ratio 1: the loss is -mean(A) (~0) up to rounding
    assert rec["grad_norm"] == pytest.approx(ref_rec["grad_norm"], rel=1e-4)
    assert rec["kl"] == ref_rec["kl"] == 0.0
    assert weights.keys() == ref_weights.keys()
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-7)
    assert any(v.abs().max() > 0 for k, v in ref_weights.items() if k.endswith("lora_B"))  # an adapter that moved


def test_fsdp_data_parallel_iteration_equals_one_process(runs):
    """2 replicas, replica 1 with half the kept samples (it pads with zero-weighted micro-batches)."""
    for r in runs["ranks"]:
        assert r["sharded"]
        _assert_matches(r["after1"], r["rec1"], runs["weights"], runs["rec"])


def test_fsdp_skiparse_sp_iteration_equals_one_process(runs):
    for r in runs["ranks"]:
        _assert_matches(r["after_sp"], r["rec_sp"], runs["weights"], runs["rec"])


def test_dcp_resume_is_exact(runs):
    """2 iterations, and 1 + DCP checkpoint + resume + 1: the same adapter, EMA and optimizer shards and the
    same log record, bit for bit; the checkpoint holds the adapter, not the frozen base model."""
    for r in runs["ranks"]:
        assert r["resumed_at"] == 1 and r["resume_diff"] == []
        a, b = dict(r["rec2"]), dict(r["rec2_resumed"])
        for rec in (a, b):
            for key in ("rollout_time", "update_time", "step_time"):
                rec.pop(key)
        assert a == b
        assert a["kl"] > 0  # the second iteration samples with a moved adapter
    assert runs["ranks"][0]["base_in_ckpt"] == []


def test_export_is_the_gathered_ema(runs):
    assert runs["ranks"][0]["export_diff"] == []


def test_the_recipe_runs_fsdp(runs):
    """recipes/train_rl.py on 2 ranks: rank 0 logs, every iteration leaves a DCP checkpoint, and the exported
    adapter is the EMA the trainer reached in the same two iterations."""
    r0 = runs["ranks"][0]
    assert [r["recipe_rc"] for r in runs["ranks"]] == [0, 0]
    assert [json.loads(x)["step"] for x in r0["recipe_log"]] == [1, 2]
    assert r0["recipe_ckpts"] == ["ckpt-00000001", "ckpt-00000002"] and r0["recipe_export_diff"] == []


def test_checkpoint_formats_are_not_mixed(runs):
    """The FSDP2 mode refuses a single-file checkpoint, one process a DCP directory; both name parallel.fsdp."""
    from ospfn.rl.trainer import make_rl_trainer
    from ospfn.train.build import TrainError

    for r in runs["ranks"]:
        assert "is a single-file checkpoint" in r["wrong_format"] and "parallel.fsdp: false" in r["wrong_format"]
    run = runs["tmp"] / "dp"
    with pytest.raises(TrainError, match=r"torch.distributed.checkpoint directory of an FSDP2 run .*parallel.fsdp: true"):
        make_rl_trainer(config(run), run, resume="latest")


def test_config_errors_name_parallel_fsdp(tmp_path):
    from ospfn.rl.config import RLParallelSection

    with pytest.raises(ConfigError, match=r"parallel\.fsdp: expected true/false, got str 'yes'"):
        config(tmp_path, fsdp="yes")
    with pytest.raises(ValueError, match=r"parallel\.fsdp must be true \(FSDP2.*\) or false \(.*\), got 1"):
        RLParallelSection(fsdp=1)
    assert config(tmp_path).parallel.fsdp is False  # the default: the replicated mode
