"""UMT5TextEncoder against transformers' own UMT5EncoderModel and diffusers' WanPipeline prompt encoding, on a
tiny random model with a byte-level tokenizer (no download); the Wan original layout through a state dict this
test renames with its own table."""

import html
import re
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ospfn.model.checkpoint import CheckpointError  # noqa: E402
from ospfn.model.umt5 import UMT5TextEncoder, clean_prompt, wan_t5_to_hf  # noqa: E402

TINY = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
            relative_attention_max_distance=128, feed_forward_proj="gated-gelu", dropout_rate=0.0)  # fmt: skip
PROMPTS = ["a red fox jumps", "", "  two\tcats &amp;amp;\n\n dogs  ", "x" * 100]
TEXT_LEN = 24


def _randomise(model, seed=0):
    """Every tensor random (norm gains included), so any swapped name changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "relative_attention_bias" in name else 0.2))
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, tokenizer, diffusers-layout pipeline directory)."""
    root = tmp_path_factory.mktemp("umt5")
    model = _randomise(transformers.UMT5EncoderModel(transformers.UMT5Config(**TINY))).eval()
    tok = transformers.ByT5Tokenizer()
    model.save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    return model, tok, root


# --- this test's own reference: Wan's cleaning, tokenisation, cut-and-pad --------------------------------


def _my_clean(text):
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def _reference(model, tok, prompts, text_len):
    texts = [_my_clean(p) for p in prompts]
    enc = tok(texts, padding="max_length", max_length=text_len, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    out = torch.zeros_like(hidden)
    lengths = []
    for b, text in enumerate(texts):
        n = min(len(text.encode("utf-8")) + 1, text_len)  # ByT5: one token per byte, then </s>
        out[b, :n] = hidden[b, :n]
        lengths.append(n)
    return out, torch.tensor(lengths)


# Wan original T5 names from HF names: this test's own table (regex -> replacement)
_TO_WAN = [
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.embed_tokens\.weight$", None),  # the same tensor as shared.weight: not stored twice by Wan
    (r"^encoder\.final_layer_norm\.weight$", "norm.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", r"blocks.\1.norm1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$", r"blocks.\1.attn.\2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$", r"blocks.\1.pos_embedding.embedding.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", r"blocks.\1.norm2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$", r"blocks.\1.ffn.gate.0.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$", r"blocks.\1.ffn.fc1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$", r"blocks.\1.ffn.fc2.weight"),
]


def _to_wan(hf_sd):
    out = {}
    for key, value in hf_sd.items():
        for pat, rep in _TO_WAN:
            if re.match(pat, key):
                if rep is not None:
                    out[re.sub(pat, rep, key)] = value.clone() if value.device.type != "meta" else value
                break
        else:
            raise AssertionError(f"test table has no rule for {key}")
    return out


@pytest.fixture(scope="module")
def wan_pth(tiny, tmp_path_factory):
    model, _, _ = tiny
    path = tmp_path_factory.mktemp("wan") / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(_to_wan(model.state_dict()), path)
    return path


# --- (a) the diffusers layout equals the model run directly and diffusers' own prompt encoding ------------


def test_encode_equals_the_model_with_cut_and_pad(tiny):
    model, tok, root = tiny
    enc = UMT5TextEncoder.from_pretrained(root, text_len=TEXT_LEN)
    assert (enc.text_dim, enc.text_len) == (32, TEXT_LEN)
    feats, lengths = enc.encode(PROMPTS)
    ref, ref_len = _reference(model, tok, PROMPTS, TEXT_LEN)
    assert feats.shape == (len(PROMPTS), TEXT_LEN, 32) and feats.dtype == torch.float32
    assert lengths.tolist() == ref_len.tolist() == [16, 1, 16, TEXT_LEN]
    torch.testing.assert_close(feats, ref, rtol=1e-6, atol=1e-6)
    for b, n in enumerate(lengths.tolist()):  # zero beyond the length, real features before it
        assert bool((feats[b, n:] == 0).all()) and bool((feats[b, :n].abs().sum(-1) > 0).all())


def test_encode_equals_diffusers_wan_pipeline_prompt_embeds(tiny):
    diffusers_wan = pytest.importorskip("diffusers.pipelines.wan.pipeline_wan")
    model, tok, root = tiny
    enc = UMT5TextEncoder.from_pretrained(root / "text_encoder", tokenizer=root / "tokenizer")  # default 512 tokens
    assert enc.text_len == 512
    fake_pipe = types.SimpleNamespace(tokenizer=tok, text_encoder=model, _execution_device=torch.device("cpu"))
    with torch.no_grad():
        ref = diffusers_wan.WanPipeline._get_t5_prompt_embeds(fake_pipe, prompt=PROMPTS, max_sequence_length=512,
                                                              device=torch.device("cpu"), dtype=torch.float32)
    feats, lengths = enc.encode(PROMPTS)
    assert feats.shape == ref.shape == (len(PROMPTS), 512, 32)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert torch.equal(feats == 0, ref == 0)  # the same zero padding
    assert lengths.tolist() == [16, 1, 16, 101]


def test_clean_prompt_matches_the_wan_rules():
    assert clean_prompt("  two\tcats &amp;amp;\n\n dogs  ") == _my_clean("  two\tcats &amp;amp;\n\n dogs  ") == "two cats & dogs"
    assert clean_prompt("") == ""


# --- (b) the Wan original .pth ---------------------------------------------------------------------------


def test_from_wan_encodes_like_the_diffusers_layout(tiny, wan_pth):
    model, tok, root = tiny
    a = UMT5TextEncoder.from_pretrained(root, text_len=TEXT_LEN)
    b = UMT5TextEncoder.from_wan(wan_pth, root / "tokenizer", text_len=TEXT_LEN)
    cfg = b.model.config
    assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff) == (384, 32, 2, 4, 8, 48)
    assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, cfg.dense_act_fn, cfg.is_gated_act) == (32, 128, "gelu_new", True)
    assert b.model.shared.weight is b.model.encoder.embed_tokens.weight
    fa, la = a.encode(PROMPTS)
    fb, lb = b.encode(PROMPTS)
    assert torch.equal(la, lb)
    torch.testing.assert_close(fb, fa, rtol=1e-6, atol=1e-6)
    ref, _ = _reference(model, tok, PROMPTS, TEXT_LEN)
    torch.testing.assert_close(fb, ref, rtol=1e-6, atol=1e-6)


def test_wan_names_of_the_full_umt5_xxl_convert_and_give_its_config():
    xxl = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = transformers.UMT5EncoderModel(transformers.UMT5Config(**xxl))
    hf = model.state_dict()
    wan = _to_wan(hf)
    assert len(wan) == 2 + 24 * 10
    out, cfg = wan_t5_to_hf(wan)
    assert {k: cfg[k] for k in xxl if k != "feed_forward_proj"} == {k: v for k, v in xxl.items() if k != "feed_forward_proj"}
    assert cfg["relative_attention_num_buckets"] == 32 and cfg["relative_attention_max_distance"] == 128
    assert cfg["feed_forward_proj"] == "gated-gelu"
    assert set(out) == set(hf)
    assert all(tuple(out[k].shape) == tuple(v.shape) for k, v in hf.items())


# --- (c) bf16 ---------------------------------------------------------------------------------------------


def test_bf16_runs_and_stays_close_to_fp32(tiny, wan_pth):
    _, _, root = tiny
    f32, _ = UMT5TextEncoder.from_pretrained(root, text_len=TEXT_LEN).encode(PROMPTS)
    for enc in (UMT5TextEncoder.from_pretrained(root, dtype=torch.bfloat16, text_len=TEXT_LEN),
                UMT5TextEncoder.from_wan(wan_pth, root / "tokenizer", dtype="bf16", text_len=TEXT_LEN)):
        assert enc.dtype == torch.bfloat16
        feats, lengths = enc.encode(PROMPTS)
        assert feats.dtype == torch.bfloat16 and torch.isfinite(feats.float()).all()
        assert lengths.tolist() == [16, 1, 16, TEXT_LEN]
        err = (feats.float() - f32).norm() / f32.norm()
        assert err < 0.05, float(err)


def test_offload_and_release(tiny):
    _, _, root = tiny
    enc = UMT5TextEncoder.from_pretrained(root, text_len=TEXT_LEN)
    assert enc.offload().device.type == "cpu"
    enc.release()
    assert enc.model is None
    with pytest.raises(RuntimeError, match="released"):
        enc.encode(["a"])
    enc.release()  # a second release is harmless


# --- (d) errors -------------------------------------------------------------------------------------------


def test_bad_prompts_raise(tiny):
    _, _, root = tiny
    enc = UMT5TextEncoder.from_pretrained(root, text_len=TEXT_LEN)
    with pytest.raises(TypeError, match="single str"):
        enc.encode("a cat")
    with pytest.raises(TypeError, match=r"index, type.*\(1, 'int'\)"):
        enc.encode(["a", 3])
    with pytest.raises(TypeError, match="sequence of str"):
        enc.encode(None)
    with pytest.raises(ValueError, match="empty"):
        enc.encode([])


def test_bad_paths_and_arguments_raise(tiny, wan_pth, tmp_path):
    _, _, root = tiny
    with pytest.raises(FileNotFoundError, match="no such directory"):
        UMT5TextEncoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither text_encoder/config.json"):
        UMT5TextEncoder.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        UMT5TextEncoder.from_pretrained(root / "text_encoder", tokenizer=tmp_path / "missing_tok")
    with pytest.raises(FileNotFoundError, match="none of the tokenizer files"):
        UMT5TextEncoder.from_wan(wan_pth, tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        UMT5TextEncoder.from_wan(tmp_path / "missing.pth", root / "tokenizer")
    with pytest.raises(ValueError, match="dtype must be"):
        UMT5TextEncoder.from_pretrained(root, dtype=torch.float16)
    with pytest.raises(ValueError, match="text_len must be a positive int"):
        UMT5TextEncoder.from_pretrained(root, text_len=0)


def test_foreign_or_incomplete_pth_raises(tiny, wan_pth, tmp_path):
    _, _, root = tiny
    sd = torch.load(wan_pth, weights_only=True)
    foreign = dict(sd, **{"lm_head.weight": torch.zeros(3, 3)})
    torch.save(foreign, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        UMT5TextEncoder.from_wan(tmp_path / "foreign.pth", root / "tokenizer")
    incomplete = {k: v for k, v in sd.items() if k != "blocks.1.ffn.fc1.weight"}
    torch.save(incomplete, tmp_path / "incomplete.pth")
    with pytest.raises(CheckpointError, match=r"missing.*blocks\.1\.ffn\.fc1\.weight"):
        UMT5TextEncoder.from_wan(tmp_path / "incomplete.pth", root / "tokenizer")
    bad_shape = dict(sd, **{"blocks.0.attn.o.weight": torch.zeros(32, 16)})
    torch.save(bad_shape, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.o\.weight"):
        UMT5TextEncoder.from_wan(tmp_path / "shape.pth", root / "tokenizer")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="dict of name -> tensor"):
        UMT5TextEncoder.from_wan(tmp_path / "list.pth", root / "tokenizer")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="text.pth is not a readable torch state dict"):
        UMT5TextEncoder.from_wan(tmp_path / "text.pth", root / "tokenizer")


def test_missing_transformers_names_the_package(tiny, wan_pth, monkeypatch):
    _, _, root = tiny
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        UMT5TextEncoder.from_wan(wan_pth, root / "tokenizer")
