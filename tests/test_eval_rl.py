"""recipes/eval_rl.py: the before / after comparison of an RL LoRA on held-out synthetic examples.

End to end on a few examples: an adapter whose B is zero changes nothing (difference exactly 0, so ``--check``
fails); a random adapter changes the videos, and the script's "with LoRA" rewards equal those of an independent
route (the adapter merged into the weights).  Plus its statistics, the bar, and the argument errors, all raised
before any sampling.
"""

import dataclasses
import importlib.util
import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def eval_rl():
    spec = importlib.util.spec_from_file_location("recipe_eval_rl", ROOT / "recipes" / "eval_rl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """(pipeline, {"zero": dir, "random": dir, "random_adapter": LoraAdapter}) for the bundled model."""
    from ospfn.lora import LoraAdapter, LoraConfig, init_lora, save_lora
    from ospfn.pipeline import load_pipeline

    pipe = load_pipeline()
    root = tmp_path_factory.mktemp("eval_rl")
    zero = init_lora(pipe.cfg, LoraConfig(rank=4, alpha=8.0), seed=1)  # gaussian A, B = 0
    g = torch.Generator().manual_seed(5)
    rand = LoraAdapter(zero.config, {k: v if k.endswith("lora_A") else 0.05 * torch.randn(v.shape, generator=g) for k, v in zero.weights.items()})
    save_lora(root / "zero", zero)
    save_lora(root / "random", rand, format="peft")
    cfg = LoraConfig(rank=2, alpha=2.0, targets=("self_attn.q",))  # 7 input features: another model's
    other = LoraAdapter(cfg, {"blocks.0.self_attn.q.lora_A": torch.zeros(2, 7), "blocks.0.self_attn.q.lora_B": torch.zeros(7, 2)})
    save_lora(root / "other", other)
    return pipe, {"zero": root / "zero", "random": root / "random", "other": root / "other", "random_adapter": rand}


# ----------------------------------------------------------------------------------------------------------------
# pieces


def test_paired_stats_match_the_statistics_module(eval_rl):
    base = [0.8, 0.7, 0.9, 0.65, 0.75]
    tuned = [0.82, 0.71, 0.95, 0.64, 0.80]
    diff = [t - b for b, t in zip(base, tuned)]
    s = eval_rl.paired_stats(base, tuned)
    se = statistics.stdev(diff) / math.sqrt(len(diff))
    assert s["base"] == pytest.approx(statistics.mean(base)) and s["lora"] == pytest.approx(statistics.mean(tuned))
    assert s["diff"] == pytest.approx(statistics.mean(diff)) and s["se"] == pytest.approx(se)
    assert s["ratio"] == pytest.approx(statistics.mean(diff) / se)
    same = eval_rl.paired_stats([0.5, 0.6], [0.5, 0.6])
    assert (same["diff"], same["se"], same["ratio"]) == (0.0, 0.0, None)
    with pytest.raises(ValueError, match=r"paired_stats: need two lists of the same length >= 2, got 1 and 1"):
        eval_rl.paired_stats([1.0], [1.0])


def _summary(diff, se, psnr_drop, dir_drop):
    return {"reward_name": "fidelity", "reward": {"diff": diff, "se": se}, "psnr_drop_db": psnr_drop, "direction_drop_points": dir_drop}


def test_check_bar(eval_rl):
    assert eval_rl.check_bar(_summary(0.031, 0.01, 0.5, 2.0)) == []
    assert eval_rl.check_bar(_summary(0.03, 0.01, -1.0, -5.0))[0].startswith("fidelity improves by 0.03, not more than 3 SE")
    assert eval_rl.check_bar(_summary(0.0, 0.0, 0.0, 0.0)) == ["fidelity improves by 0, not more than 3 SE = 0"]
    assert eval_rl.check_bar(_summary(1e-6, 0.0, 0.0, 0.0)) == []
    why = eval_rl.check_bar(_summary(0.05, 0.01, 0.51, 2.5))
    assert len(why) == 2 and "PSNR drops by 0.510 dB > 0.5 dB" in why[0] and "direction accuracy drops by 2.50 points > 2.0" in why[1]


@pytest.mark.parametrize(
    "text,want",
    [("runs/lora", ("runs/lora", 1.0)), ("runs/lora:0.5", ("runs/lora", 0.5)), ("a:b/lora", ("a:b/lora", 1.0)),
     ("x.safetensors:-1", ("x.safetensors", -1.0)), ("runs/lora:1e-1", ("runs/lora", 0.1))],
)  # fmt: skip
def test_lora_arg(eval_rl, text, want):
    assert eval_rl.lora_arg(text) == want


# ----------------------------------------------------------------------------------------------------------------
# end to end (--threads 1: sampling a tiny model is faster on one thread, the more so on a busy machine)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_zero_adapter_changes_nothing_and_fails_the_check(eval_rl, adapters, tmp_path, capsys, keep_threads):
    _, paths = adapters
    out = tmp_path / "r.json"
    rc = eval_rl.main(["--lora", str(paths["zero"]), "--num", "3", "--check", "--json", str(out), "--threads", "1"])
    assert rc == 1
    printed = json.loads(capsys.readouterr().out)
    data = json.loads(out.read_text())
    s = data["summary"]
    assert printed == s
    assert s["examples"] == 3 and s["reward_name"] == "fidelity"
    assert s["reward"]["diff"] == 0.0 and s["reward"]["se"] == 0.0 and s["reward"]["ratio"] is None
    assert s["psnr_drop_db"] == 0.0 and s["direction_drop_points"] == 0.0
    assert set(s["other_rewards"]) == {"motion", "sharpness"}
    assert s["meets_bar"] is False and s["misses"] == ["fidelity improves by 0, not more than 3 SE = 0"]
    for row in data["examples"]:
        assert row["base"] == row["lora"]
        assert 0.0 < row["base"]["fidelity"] < 1.0 and math.isfinite(row["base"]["psnr"])


def test_random_adapter_changes_the_videos_as_the_merged_weights_do(eval_rl, adapters, tmp_path, capsys, keep_threads):
    from ospfn.lora import merge_lora
    from ospfn.data import SyntheticMotion
    from ospfn.rl.rewards import make_reward

    pipe, paths = adapters
    out = tmp_path / "r.json"
    rc = eval_rl.main(["--lora", f"{paths['random']}:0.7", "--num", "2", "--reward", "motion", "--json", str(out), "--threads", "1"])
    assert rc == 0
    capsys.readouterr()
    data = json.loads(out.read_text())
    s, rows = data["summary"], data["examples"]
    assert s["reward_name"] == "motion" and s["lora"][0]["weight"] == 0.7
    assert any(r["base"]["fidelity"] != r["lora"]["fidelity"] for r in rows)
    assert any(r["base"]["psnr"] != r["lora"]["psnr"] for r in rows)
    # the independent route: the adapter merged into the weights, the same seed per example
    merged = dataclasses.replace(pipe, params=merge_lora(pipe.params, paths["random_adapter"], 0.7))
    item = SyntheticMotion(2, frames=5, size=(32, 32), split="eval", seed=0)[1]
    image = item["video"][:, 0]
    ref = merged.generate(item["caption"], image=image, seed=1)
    fid = make_reward("fidelity")(ref[None], [item["caption"]], first_frames=image[None]).item()
    assert rows[1]["lora"]["fidelity"] == pytest.approx(fid, abs=2e-3)
    psnr = 10 * math.log10(1.0 / float(((ref[:, 0] - image) / 2).pow(2).mean()))
    assert rows[1]["lora"]["psnr"] == pytest.approx(psnr, abs=0.05)


# ----------------------------------------------------------------------------------------------------------------
# argument errors: exit status 2 before any sampling


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--lora", "{zero}", "--num", "1"], r"argument --num: must be an int in \[2, 100000\], got '1'"),
        (["--num", "4"], r"the following arguments are required: --lora"),
        (["--lora", "{zero}", "--reward", "beauty"], r"argument --reward: invalid choice: 'beauty' \(choose from '?fidelity'?, '?first_frame'?, '?motion'?, '?sharpness'?"),
        (["--lora", "{zero}:nan"], r"argument --lora: the weight in '.*zero:nan' must be a finite number, got 'nan'"),
        (["--lora", "{zero}", "--steps", "0"], r"argument --steps: must be an int in \[1, 10000\], got '0'"),
    ],
)
def test_argparse_errors(eval_rl, adapters, capsys, argv, match):
    _, paths = adapters
    with pytest.raises(SystemExit) as exc:
        eval_rl.main([a.replace("{zero}", str(paths["zero"])) for a in argv])
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv,files,match",
    [
        (["--lora", "{tmp}/missing"], {}, r"--lora: .*missing does not exist"),
        (["--lora", "{tmp}/junk"], {"junk/pytorch_lora_weights.safetensors": b"not a safetensors file"}, r"--lora: cannot load .*junk"),
        (["--lora", "{other}:0.5"], {}, r"--lora: cannot load .*other for this model: .*does not fit"),
        (["--lora", "{zero}", "--json", "{tmp}/nodir/r.json"], {}, r"--json: the directory .*nodir does not exist"),
        (["--lora", "{zero}", "--json", "{tmp}"], {}, r"--json: .* is a directory"),
        (["--lora", "{zero}", "--checkpoint", "{tmp}"], {}, r"--checkpoint: .* is not a pipeline directory"),
    ],
)
def test_bad_paths_exit_2_before_sampling(eval_rl, adapters, tmp_path, capsys, monkeypatch, argv, files, match):
    from ospfn.pipeline import Pipeline

    def no_sampling(*a, **k):
        raise AssertionError("sampled before the arguments were checked")

    monkeypatch.setattr(Pipeline, "generate", no_sampling)
    _, paths = adapters
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{zero}", str(paths["zero"])).replace("{other}", str(paths["other"])) for a in argv]
    assert eval_rl.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
