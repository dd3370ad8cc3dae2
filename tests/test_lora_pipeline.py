"""LoRA in the pipeline: ``Pipeline.generate(..., lora=)`` and ``recipes/sample.py --lora PATH[:WEIGHT]`` on the
bundled tiny model, against the same pipeline with the adapter's delta added to the weights by the test."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ospfn.lora import LoraConfig, init_lora, save_lora
from ospfn.pipeline import BUNDLED, load_pipeline

PROMPT = "a small red circle moving left on a navy background"
KW = {"steps": 3, "seed": 5}


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.fixture(scope="module")
def image(pipe):
    from ospfn.io import read_image

    return read_image(str(BUNDLED / "example.png"))


def adapter_of(pipe, seed=0, rank=4, alpha=8.0):
    a = init_lora(pipe.cfg, LoraConfig(rank=rank, alpha=alpha), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for k, v in a.weights.items():
        if k.endswith("lora_B"):
            v.copy_(torch.randn(v.shape, generator=g) * 0.05)
    return a


def with_delta(pipe, adapter, weight):
    """The pipeline whose DiT weights hold W + weight * alpha / r * B @ A, computed here in float64."""
    params = dict(pipe.params)
    scale = adapter.config.alpha / adapter.config.rank
    for key in adapter.weights:
        if key.endswith(".lora_A"):
            mod = key[: -len(".lora_A")]
            delta = adapter.weights[mod + ".lora_B"].double() @ adapter.weights[key].double()
            params[mod + ".weight"] = (params[mod + ".weight"].double() + weight * scale * delta).float()
    return dataclasses.replace(pipe, params=params)


def test_generate_with_an_adapter_equals_the_weights_with_its_delta(pipe, image):
    a = adapter_of(pipe)
    base = pipe.generate(PROMPT, image, **KW)
    for weight in (1.0, 0.5):
        got = pipe.generate(PROMPT, image, lora=(a, weight), **KW)
        want = with_delta(pipe, a, weight).generate(PROMPT, image, **KW)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
        assert float((got - base).abs().max()) > 50 * 2e-4  # the adapter matters far beyond the tolerance
    assert pipe.last_info["lora"] == [{"rank": 4, "alpha": 8.0, "weight": 0.5}]
    assert torch.equal(pipe.generate(PROMPT, image, lora=(a, 0.0), **KW), base)
    # two adapters add up
    b = adapter_of(pipe, seed=1)
    both = pipe.generate(PROMPT, image, lora=[a, (b, 0.5)], **KW)
    want = with_delta(with_delta(pipe, a, 1.0), b, 0.5).generate(PROMPT, image, **KW)
    torch.testing.assert_close(both, want, rtol=0, atol=2e-4)


def test_generate_reads_adapter_files_and_refuses_what_does_not_fit(pipe, image, tmp_path):
    a = adapter_of(pipe)
    save_lora(tmp_path / "a", a)
    assert torch.equal(pipe.generate(PROMPT, image, lora=str(tmp_path / "a"), **KW), pipe.generate(PROMPT, image, lora=a, **KW))
    wide = init_lora(dataclasses.replace(pipe.cfg, dim=2 * pipe.cfg.dim, ffn_dim=2 * pipe.cfg.ffn_dim), LoraConfig(rank=2, alpha=2.0))
    with pytest.raises(ValueError, match="Pipeline.generate: lora does not fit this pipeline's DiT"):
        pipe.generate(PROMPT, image, lora=wide, **KW)
    with pytest.raises(TypeError, match=r"Pipeline.generate: lora\[0\] must be a LoraAdapter or a \(LoraAdapter, weight\) pair"):
        pipe.generate(PROMPT, image, lora=[3], **KW)


def _sample_recipe():
    spec = importlib.util.spec_from_file_location("sample_recipe", Path(__file__).resolve().parents[1] / "recipes" / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sample_recipe_lora_flag(pipe, tmp_path, capsys):
    rec = _sample_recipe()
    assert rec.lora_arg("runs/x/final") == ("runs/x/final", 1.0)
    assert rec.lora_arg("runs/x/final:0.25") == ("runs/x/final", 0.25)
    assert rec.lora_arg("C:/x/lora") == ("C:/x/lora", 1.0)
    save_lora(tmp_path / "a", adapter_of(pipe))
    args = ["--device", "cpu", "--steps", "2", "--scale", "1", "--out", str(tmp_path / "v")]
    assert rec.main(args + ["--lora", f"{tmp_path / 'a'}:0.5", "--lora", str(tmp_path / "a")]) == 0
    info = json.loads(capsys.readouterr().out.splitlines()[0])
    assert info["lora"] == [[str(tmp_path / "a"), 0.5], [str(tmp_path / "a"), 1.0]]
    with pytest.raises(SystemExit) as e:
        rec.main(args + ["--lora", str(tmp_path / "missing")])
    assert e.value.code == 2 and "--lora: " in capsys.readouterr().err
