"""Adapter-only SFT (the config's ``lora`` section) and style-labelled training data (``data.styles``).

* Only the LoRA trains: the base DiT and the text encoder stay bit-identical, the checkpoints hold the adapter
  only, ``final/`` is a diffusers-format LoRA that ``load_lora`` reads back.
* N + resume + N steps equal 2N steps bit for bit.
* A style-labelled synthetic run hands the text encoder each caption wrapped in its style's template.
"""

import contextlib
import importlib.util
import io
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_SFT, config_with

ROOT = Path(__file__).resolve().parents[1]

TINY = config_with(TINY_SFT, "runs/unused", **{"train.steps": 2})


def _recipe():
    spec = importlib.util.spec_from_file_location("recipe_train_sft_lora", ROOT / "recipes" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(tmp_path, cfg: dict) -> Path:
    p = tmp_path / f"cfg-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _run(cfg: Path, *extra) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = _recipe().main(["--config", str(cfg), "--no-progress", "--device", "cpu", *extra])
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny FlashI2V pipeline (2 SFT steps): the base an adapter run fine-tunes."""
    tmp = tmp_path_factory.mktemp("base")
    rc, err = _run(_write(tmp, config_with(TINY, tmp / "run")))
    assert rc == 0, err
    return tmp / "run" / "final"


def _lora_cfg(base: Path, out: Path, **changes) -> dict:
    return config_with(TINY, out, **{"model.checkpoint": str(base), "text.path": str(base), "text.train": False,
                                     "lora": {"rank": 4, "alpha": 4.0, "targets": ["self_attn.q", "self_attn.v", "ffn.0"], "seed": 1},
                                     "train.steps": 4, **changes})  # fmt: skip


def test_adapter_run_trains_only_the_adapter(base, tmp_path):
    from ospfn.lora import load_lora
    from ospfn.model.checkpoint import read_safetensors
    from ospfn.train.build import make_trainer
    from ospfn.train.config import load_config
    from ospfn.train.sft import SFTConfig

    cfg = load_config(_write(tmp_path, _lora_cfg(base, tmp_path / "run")), SFTConfig)
    trainer = make_trainer(cfg, tmp_path / "run")
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    text_before = {k: v.detach().clone() for k, v in trainer.text.params().items()}
    assert set(trainer.named) and all(k.startswith("lora.") for k in trainer.named)
    lora_ids = {id(p) for _, p in trainer.model.named_lora_parameters()}
    assert {id(p) for p in trainer.trainable} == lora_ids
    for _ in range(3):
        trainer.train_step()
    after = dict(trainer.model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k].detach())}
    assert changed and all(k.endswith((".lora_A", ".lora_B")) for k in changed), sorted(changed)[:5]
    assert any(k.endswith(".lora_B") for k in changed)  # B starts at 0: it must have moved
    assert all(torch.equal(v, trainer.text.params()[k].detach()) for k, v in text_before.items())
    # the base the run started from is the exported pipeline's DiT, unchanged
    disk = read_safetensors(base / "diffusion_pytorch_model.safetensors")
    from ospfn.model.checkpoint import load_checkpoint

    base_w = load_checkpoint(base, trainer.parts.dit_cfg)
    for k, v in base_w.items():
        assert torch.equal(v, after[k].detach()), k
    assert disk  # the file was read

    # the recipe end to end: adapter-only checkpoints and a diffusers LoRA in final/
    rc, err = _run(_write(tmp_path, _lora_cfg(base, tmp_path / "run2")))
    assert rc == 0, err
    ckpt = read_safetensors(next((tmp_path / "run2").glob("ckpt-*/model.safetensors")))
    assert ckpt and all(k.startswith("lora.") for k in ckpt)
    adapter = load_lora(tmp_path / "run2" / "final")
    assert adapter.config.rank == 4 and adapter.config.alpha == 4.0
    assert set(adapter.config.targets) == {"self_attn.q", "self_attn.v", "ffn.0"}
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in adapter.weights.items())


def test_adapter_run_resumes_exactly(base, tmp_path):
    from ospfn.model.checkpoint import read_safetensors

    rc, err = _run(_write(tmp_path, _lora_cfg(base, tmp_path / "straight")))
    assert rc == 0, err
    rc, err = _run(_write(tmp_path, _lora_cfg(base, tmp_path / "split")), "--stop-after", "2")
    assert rc == 0, err
    assert not (tmp_path / "split" / "final").exists()
    rc, err = _run(_write(tmp_path, _lora_cfg(base, tmp_path / "split")), "--resume")
    assert rc == 0, err
    a = read_safetensors(tmp_path / "straight" / "final" / "pytorch_lora_weights.safetensors")
    b = read_safetensors(tmp_path / "split" / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"text.train": True}, "text.train must be false with a lora section"),
        ({"model.checkpoint": None}, "model.checkpoint must name the base DiT"),
        ({"lora": {"rank": 0}}, "lora.rank"),
        ({"lora": {"targets": ["self_attn.x"]}}, "lora.targets"),
    ],
)
def test_adapter_config_errors(base, tmp_path, changes, message):
    rc, err = _run(_write(tmp_path, _lora_cfg(base, tmp_path / "bad", **changes)))
    assert rc == 2 and message in err, err


def test_style_labelled_data_wraps_captions(tmp_path):
    from ospfn.styles import STYLE_TEMPLATES
    from ospfn.train.build import make_trainer
    from ospfn.train.config import load_config
    from ospfn.train.sft import SFTConfig

    cfg = load_config(_write(tmp_path, config_with(TINY, tmp_path / "run", **{"data.styles": ["Pixel art", "ink-painting"]})), SFTConfig)
    trainer = make_trainer(cfg, tmp_path / "run")
    seen = []
    encode = trainer.encode_text

    def spy(captions):
        seen.extend(captions)
        return encode(captions)

    trainer.encode_text = spy
    trainer.train_step()
    assert len(seen) == 2
    heads = {t.split("{prompt}")[1] for name, t in STYLE_TEMPLATES.items() if name in ("Pixel art", "Ink painting")}
    for caption in seen:
        assert caption.startswith("a ") and any(caption.endswith(h) for h in heads), caption


@pytest.mark.parametrize(
    "styles, message",
    [
        ("pixel", "data.styles must be null, 'all' or a non-empty list"),
        ([], "data.styles must be null, 'all' or a non-empty list"),
        (["Pixel art", "Watercolour"], "data.styles[1]: unknown style 'Watercolour'"),
        (["Pixel art", "pixel_art"], "names a style twice"),
    ],
)
def test_style_config_errors(tmp_path, styles, message):
    rc, err = _run(_write(tmp_path, config_with(TINY, tmp_path / "run", **{"data.styles": styles})))
    assert rc == 2 and message in err, err


def test_sample_teacache_goes_into_the_exported_defaults(tmp_path):
    from ospfn.pipeline import load_pipeline

    rc, err = _run(_write(tmp_path, config_with(TINY, tmp_path / "run", **{"train.steps": 1, "sample.teacache": 0.1, "sample.teacache_warmup": 3})))
    assert rc == 0, err
    pipe = load_pipeline(tmp_path / "run" / "final")
    assert pipe.defaults["teacache"] == {"threshold": 0.1, "warmup_steps": 3}
    rc, err = _run(_write(tmp_path, config_with(TINY, tmp_path / "bad", **{"sample.teacache": -1.0})))
    assert rc == 2 and "sample.teacache" in err, err
