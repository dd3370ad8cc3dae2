"""Image-to-stylised-video plumbing: the style library, ``Pipeline.generate(style=)``, ``recipes/sample.py --style``
and style labels in the corpus format (meta JSON -> ClipEntry -> filter -> latent cache)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ospfn.styles import STYLE_TEMPLATES, STYLES, style_id, style_name, style_prompt

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a small red circle moving left on a navy background"
PAPER_STYLES = ["Ghibli", "3D rendering", "Cyberpunk", "Ink painting", "Oil painting", "Pixel art", "Vaporwave", "Disney",
                "Fairy tale", "Gotham noir", "Lego", "Chibi"]  # fmt: skip


# -- the library -------------------------------------------------------------------------------------------


def test_the_twelve_styles_of_the_paper_in_order():
    assert list(STYLES) == PAPER_STYLES
    assert set(STYLE_TEMPLATES) == set(PAPER_STYLES)
    assert len({t.format(prompt="x") for t in STYLE_TEMPLATES.values()}) == 12  # no two templates alike


@pytest.mark.parametrize("spelling, name", [("pixel art", "Pixel art"), ("PIXEL_ART", "Pixel art"), ("pixel-art", "Pixel art"),
                                            ("3d rendering", "3D rendering"), ("gothamnoir", "Gotham noir"), (11, "Chibi")])  # fmt: skip
def test_style_spellings(spelling, name):
    assert style_name(spelling) == name
    if isinstance(spelling, str):
        assert style_id(spelling) == PAPER_STYLES.index(name)


@pytest.mark.parametrize("bad", ["watercolour", "", "pixel art style", 12, -1])
def test_unknown_styles_list_the_twelve(bad):
    with pytest.raises(ValueError) as e:
        style_name(bad)
    assert "Ghibli" in str(e.value) and "Chibi" in str(e.value)


def test_style_prompt_keeps_the_caption_first():
    for name in STYLES:
        p = style_prompt(PROMPT, name)
        assert p.startswith(PROMPT + ", in ") and name.lower().split()[0] in p.lower()
    assert style_prompt(PROMPT, None) == PROMPT
    with pytest.raises(TypeError, match="prompt must be a str"):
        style_prompt(None, "Lego")


# -- the pipeline -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    from ospfn.pipeline import load_pipeline

    return load_pipeline()


@pytest.fixture(scope="module")
def image():
    from ospfn.io import read_image
    from ospfn.pipeline import BUNDLED

    return read_image(str(BUNDLED / "example.png"))


def test_generate_style_is_the_templated_prompt(pipe, image):
    kw = {"steps": 2, "seed": 3}
    got = pipe.generate(PROMPT, image, style="pixel_art", **kw)
    assert pipe.last_info["styles"] == ["Pixel art"]
    want = pipe.generate(STYLE_TEMPLATES["Pixel art"].format(prompt=PROMPT), image, **kw)
    assert torch.equal(got, want)
    plain = pipe.generate(PROMPT, image, **kw)
    assert not torch.equal(got, plain)  # the template reaches the model
    batch = pipe.generate([PROMPT, PROMPT], image, style=["Pixel art", None], **kw)
    assert torch.equal(batch, pipe.generate([STYLE_TEMPLATES["Pixel art"].format(prompt=PROMPT), PROMPT], image, **kw))


@pytest.mark.parametrize(
    "style, err, message",
    [
        ("watercolour", ValueError, "unknown style 'watercolour'; the 12 styles are: Ghibli"),
        (["Lego"], ValueError, "a list of 2 (one per prompt), got 1"),
        (5, TypeError, "style must be a style name"),
        (["Lego", 3], TypeError, "style entries must be style names or None"),
    ],
)
def test_generate_style_errors(pipe, image, style, err, message):
    with pytest.raises(err, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipe.generate([PROMPT, PROMPT], image, style=style, steps=1)


def _sample():
    spec = importlib.util.spec_from_file_location("recipe_sample_i2sv", ROOT / "recipes" / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sample_style_argument(tmp_path, capsys):
    mod = _sample()
    with pytest.raises(SystemExit) as e:
        mod.parse_args(["--style", "watercolour"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown style 'watercolour'" in err and "Gotham noir" in err
    assert mod.parse_args(["--style", "gotham_noir"]).style == "Gotham noir"
    cfg = tmp_path / "s.yaml"
    cfg.write_text("style: nope\n")
    with pytest.raises(SystemExit):
        mod.apply_config(mod.parse_args([]), str(cfg))
    assert "style: unknown style 'nope'" in capsys.readouterr().err


def test_sample_style_with_a_checkpoint_templates_the_prompt(tmp_path, capsys):
    """--style with an explicit checkpoint (here the bundled I2V model) samples the templated prompt."""
    from ospfn.pipeline import BUNDLED

    mod = _sample()
    calls = []
    real = mod.__dict__.get("load_pipeline")
    assert real is None  # imported inside main: spy on the Pipeline class instead
    from ospfn.pipeline import Pipeline

    orig = Pipeline.generate

    def spy(self, prompt, image=None, **kw):
        calls.append((prompt, kw.get("style")))
        return orig(self, prompt, image, **kw)

    Pipeline.generate = spy
    try:
        rc = mod.main(["--checkpoint", str(BUNDLED), "--style", "Lego", "--steps", "1", "--out", str(tmp_path / "v.mp4"), "--scale", "1"])
    finally:
        Pipeline.generate = orig
    assert rc == 0 and (tmp_path / "v.mp4").exists() and (tmp_path / "v_frames.png").exists()
    assert calls == [((BUNDLED / "example.txt").read_text().strip(), "Lego")]
    info = json.loads(capsys.readouterr().out.splitlines()[0])
    assert info["style"] == "Lego"


def test_sample_style_without_the_bundled_i2sv_model_says_so(tmp_path, capsys, monkeypatch):
    import ospfn.pipeline

    monkeypatch.setattr(ospfn.pipeline, "BUNDLED_I2SV", tmp_path / "missing")
    with pytest.raises(SystemExit) as e:
        _sample().main(["--style", "Lego", "--out", str(tmp_path / "v")])
    assert e.value.code == 2
    assert "--style: the bundled image-to-stylised-video model is missing" in capsys.readouterr().err


# -- the corpus format ------------------------------------------------------------------------------------


def _index(tmp_path, entries) -> Path:
    (tmp_path / "meta.json").write_text(json.dumps(entries))
    (tmp_path / "index.txt").write_text(f"{tmp_path},meta.json\n")
    return tmp_path / "index.txt"


def test_meta_style_labels_parse_filter_and_count(tmp_path):
    from ospfn.data.index import ClipEntry, filter_clips, load_index

    base = {"resolution": {"height": 480, "width": 832}, "fps": 24, "num_frames": 200}
    entries = [
        {"path": "a.mp4", "cap": "a", "style": "pixel art", **base},
        {"path": "b.mp4", "cap": "b", "style": 3, **base},  # an id: Ink painting
        {"path": "c.mp4", "cap": "c", **base},  # no label
        {"path": "d.mp4", "cap": "d", "style": "Lego", **base},
        {"path": "e.mp4", "cap": "e", "style": None, **base},  # null counts as absent
    ]
    es = load_index(_index(tmp_path, entries))
    assert [e.style for e in es] == ["Pixel art", "Ink painting", None, "Lego", None]
    assert all("style" not in e.extra for e in es)
    kept, report = filter_clips(es)  # no style filter: everything kept, the labelled ones counted
    assert len(kept) == 5 and report["styles"] == {"Ink painting": 1, "Pixel art": 1, "Lego": 1}
    kept, report = filter_clips(es, styles=["pixel_art", "Ink painting", "Ghibli"])
    assert [e.path.rsplit("/", 1)[-1] for e in kept] == ["a.mp4", "b.mp4"]
    assert report["missing_style"] == 2 and report["style"] == 1 and report["kept"] == 2
    assert report["styles"] == {"Ghibli": 0, "Ink painting": 1, "Pixel art": 1}
    with pytest.raises(ValueError, match="styles holds 'Watercolour'"):
        filter_clips(es, styles=["Watercolour"])
    with pytest.raises(ValueError, match="not one str"):
        filter_clips(es, styles="Lego")
    with pytest.raises(ValueError, match="style must be None or one of the 12 styles"):
        ClipEntry("/v/a.mp4", ("a",), style="Watercolour")


def test_meta_bad_style_names_the_entry(tmp_path):
    from ospfn.data.index import load_index

    with pytest.raises(ValueError, match=r"entry 0 of meta file .*key 'style' must be one of the 12 styles"):
        load_index(_index(tmp_path, [{"path": "a.mp4", "cap": "a", "style": "Watercolour"}]))


def test_latent_cache_encodes_the_templated_caption(tmp_path):
    """prepare_cache stores, for a style-labelled item, the features of the caption in its style's template."""
    from ospfn.data.latents import LatentDataset, prepare_cache
    from ospfn.model.text import TinyTextEncoder
    from ospfn.model.vae import PixelVAE

    text = TinyTextEncoder.create(text_dim=16, text_len=32, vocab=128, seed=0)
    g = torch.Generator().manual_seed(0)
    items = [{"video": torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, "caption": "a cat walks", "style": "Chibi"},
             {"video": torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, "caption": "a cat walks"}]  # fmt: skip
    prepare_cache(items, tmp_path / "cache", text=text, vae=PixelVAE(2), cond=True, progress=False,
                  text_spec={"kind": "tiny", "text_dim": 16, "text_len": 32}, vae_spec={"kind": "pixel", "latent_channels": 12})  # fmt: skip
    data = LatentDataset(tmp_path / "cache")
    feats, lengths = text.encode([STYLE_TEMPLATES["Chibi"].format(prompt="a cat walks"), "a cat walks"])
    for i in range(2):
        n = int(lengths[i])
        torch.testing.assert_close(data[i]["context"][:n], feats[i, :n].float(), rtol=0, atol=0)
    assert not torch.equal(data[0]["context"], data[1]["context"])


# -- the evaluation recipe ----------------------------------------------------------------------------------


def _eval_i2sv():
    spec = importlib.util.spec_from_file_location("recipe_eval_i2sv", ROOT / "recipes" / "eval_i2sv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_eval_i2sv_runs_and_a_plain_model_does_not_pass(tmp_path, capsys):
    """The plain bundled I2V model ignores the styles: the evaluator must not credit it (its frames are plain)."""
    from PIL import Image

    from ospfn.data import SyntheticMotion
    from ospfn.pipeline import BUNDLED

    out, strip = tmp_path / "r.json", tmp_path / "s.png"
    rc = _eval_i2sv().main(["--checkpoint", str(BUNDLED), "--num", "3", "--steps", "4", "--json", str(out), "--strip", str(strip), "--check"])
    assert rc == 1  # --check: the bar is not met
    res = json.loads(out.read_text())
    s = res["summary"]
    assert s["examples"] == 3 and s["style_accuracy"] < 0.8 and not s["meets_bar"]
    want = [SyntheticMotion(3, frames=5, size=(32, 32), split="eval", seed=0, styles="all")[i]["style"] for i in range(3)]
    assert [r["style"] for r in res["examples"]] == want
    img = Image.open(strip)
    assert img.size == (10 * 32 * 4, len(set(want)) * 32 * 4)  # condition image + 5 generated + 4 true frames; a row per style


@pytest.mark.parametrize("argv, message", [(["--num", "0"], "--num"), (["--strip", "/nonexistent/dir/x.png"], "--strip: the directory")])
def test_eval_i2sv_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) if argv[0] == "--num" else _nullcontext():
        rc = _eval_i2sv().main(argv)
        assert rc == 2
    assert message in capsys.readouterr().err


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()
