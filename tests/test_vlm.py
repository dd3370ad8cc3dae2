"""ospfn.model.vlm: the Uniworld-OSP2.0 VLM conditioning, on a tiny random Qwen2.5-VL and a processor built offline
(tests/vlm_tiny.py: word-level tokenizer with Qwen's special tokens, a Qwen-style chat template; no download).

References are this test's own: the processor and the transformers model called directly, the language model
called with explicit 1-D positions, float64 hand computations of the adapter and the first-frame tokens, a
torch module laid out like the released ``EncoderAdapter`` (fc1 -> GELU -> fc2)."""

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from PIL import Image  # noqa: E402

from ospfn.model.checkpoint import CheckpointError  # noqa: E402
from ospfn.model.vlm import (  # noqa: E402
    QwenVLEncoder,
    VLMAdapterConfig,
    VLMFeatureCache,
    adapter_shapes,
    convert_released_adapter,
    init_adapter,
    load_released_adapter,
    style_tokens,
    to_released_adapter,
    uniworld_context,
)
from ospfn.styles import STYLES  # noqa: E402

from vlm_tiny import IMAGE_SIZE, N_IMAGE_TOKENS, VOCAB  # noqa: E402  (the shared tiny model and processor)
from vlm_tiny import image as _image  # noqa: E402
from vlm_tiny import model as _tiny_model  # noqa: E402
from vlm_tiny import processor as _processor  # noqa: E402

MAX_LEN = 48
MAX_CAP = 8
PROMPT = "a red circle moving left"
NEG = "bad blurry ugly"


@pytest.fixture(scope="module")
def tiny():
    """(Qwen2_5_VLForConditionalGeneration with random weights, processor)."""
    return _tiny_model(), _processor()


def _enc(tiny, **kw):
    model, proc = tiny
    kw = {"image_size": IMAGE_SIZE, "max_caption_tokens": MAX_CAP, "max_length": MAX_LEN, **kw}
    return QwenVLEncoder(model, proc, **kw)


def _reference_inputs(proc, image, prompt, max_length=MAX_LEN):
    """The processor on the released code's message layout, this test's own call."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return proc(text=[text], images=[image], padding="max_length", max_length=max_length, return_tensors="pt")


def _first_image_pos(ids):
    return int((ids[0] == VOCAB["<|image_pad|>"]).nonzero()[0, 0])


# ----------------------------------------------------------------------------------------------------------
# the encoder


def test_shapes_padding_and_vlm_dim(tiny):
    enc = _enc(tiny)
    assert enc.vlm_dim == 32
    feats = enc.encode([_image(0), _image(1)], [PROMPT, ""])
    assert feats.shape == (2, MAX_LEN, 32) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    inputs = enc.build_inputs([_image(0), _image(1)], [PROMPT, ""])
    # system turn (im_start, 6 words, im_end), user turn (im_start, user, vision_start, image tokens, vision_end,
    # caption, im_end), generation prompt (im_start, assistant)
    for row, n_caption in ((0, len(PROMPT.split())), (1, 0)):
        n = 8 + (3 + N_IMAGE_TOKENS + 1) + n_caption + 1 + 2
        assert inputs["attention_mask"][row].tolist() == [1] * n + [0] * (MAX_LEN - n)  # right padding to max_length
        assert (inputs["input_ids"][row, n:] == VOCAB["<|endoftext|>"]).all()
        assert int((inputs["input_ids"][row] == VOCAB["<|image_pad|>"]).sum()) == N_IMAGE_TOKENS


def test_full_mode_equals_the_model_called_directly(tiny):
    model, proc = tiny
    enc = _enc(tiny)
    images, prompts = [_image(2), _image(3)], [PROMPT, "the cat jumps over fence"]
    got = enc.encode(images, prompts)
    for b in range(2):
        ref_inputs = _reference_inputs(proc, images[b], prompts[b])
        with torch.no_grad():
            ref = model.model(**ref_inputs, use_cache=False).last_hidden_state[0]
        torch.testing.assert_close(got[b], ref, rtol=1e-5, atol=1e-5)
    single = enc.encode(images[:1], prompts[:1])[0]
    with torch.no_grad():
        ref = model.model(**_reference_inputs(proc, images[0], prompts[0]), use_cache=False).last_hidden_state[0]
    assert torch.equal(single, ref)
    # the base Qwen2_5_VLModel directly is the same encoder
    base = QwenVLEncoder(model.model, proc, image_size=IMAGE_SIZE, max_caption_tokens=MAX_CAP, max_length=MAX_LEN)
    assert torch.equal(base.encode(images[:1], prompts[:1])[0], ref)


def test_full_mode_sees_the_image(tiny):
    enc = _enc(tiny)
    a, b = enc.encode([_image(4)], [PROMPT])[0], enc.encode([_image(5)], [PROMPT])[0]
    first = _first_image_pos(enc.build_inputs([_image(4)], [PROMPT])["input_ids"])
    assert torch.equal(a[:first], b[:first])  # causal: the tokens before the image do not see it
    diff = (a - b).abs().amax(dim=-1)
    assert (diff[first:] > 1e-4).all(), diff  # the image tokens and everything after them (padding included)


def test_text_only_reproduces_the_language_tower(tiny):
    model, proc = tiny
    enc = _enc(tiny, text_only=True)
    assert enc.vlm_dim == 32
    a = enc.encode([_image(6)], [PROMPT])
    b = enc.encode([_image(7)], [PROMPT])
    assert torch.equal(a, b)  # no vision features: the image does not matter (same size)
    # independent: the language model on the processor's ids, explicit plain 1-D positions 0..L-1
    ref_inputs = _reference_inputs(proc, _image(6), PROMPT)
    pos = torch.arange(MAX_LEN)[None]
    with torch.no_grad():
        ref = model.model.language_model(input_ids=ref_inputs["input_ids"], attention_mask=ref_inputs["attention_mask"],
                                         position_ids=pos, use_cache=False).last_hidden_state  # fmt: skip
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)
    # the placeholder tokens really are the <|image_pad|> embedding: the same as feeding that embedding by hand
    emb = model.model.language_model.embed_tokens(ref_inputs["input_ids"])
    with torch.no_grad():
        ref2 = model.model.language_model(inputs_embeds=emb, attention_mask=ref_inputs["attention_mask"], use_cache=False).last_hidden_state
    torch.testing.assert_close(a, ref2, rtol=1e-5, atol=1e-5)
    # before the first image token, full mode (1-D text positions, same embeddings) agrees with text_only; after, not
    full = _enc(tiny).encode([_image(6)], [PROMPT])
    first = _first_image_pos(ref_inputs["input_ids"])
    torch.testing.assert_close(full[:, :first], a[:, :first], rtol=1e-5, atol=1e-5)
    assert ((full[0, first:] - a[0, first:]).abs().amax(-1) > 1e-4).all()
    # a bare Qwen2_5_VLTextModel works the same way; and needs text_only
    bare = QwenVLEncoder(model.model.language_model, proc, text_only=True, image_size=IMAGE_SIZE, max_caption_tokens=MAX_CAP,
                         max_length=MAX_LEN)  # fmt: skip
    assert torch.equal(bare.encode([_image(6)], [PROMPT]), a)
    with pytest.raises(TypeError, match="text_only=True"):
        QwenVLEncoder(model.model.language_model, proc, image_size=IMAGE_SIZE)


def test_caption_truncation_and_too_long_sequences(tiny):
    enc = _enc(tiny)
    long = "the cat jumps over fence slowly under bright sky wind blows green tree"
    assert len(long.split()) > MAX_CAP
    cut = " ".join(long.split()[:MAX_CAP])  # one token per word with this tokenizer
    assert enc.truncate_caption(long) == cut and enc.truncate_caption(PROMPT) == PROMPT
    assert torch.equal(enc.encode([_image(8)], [long]), enc.encode([_image(8)], [cut]))
    assert not torch.equal(enc.encode([_image(8)], [long]), enc.encode([_image(8)], [" ".join(long.split()[: MAX_CAP - 1])]))
    # 15 template + 6 image + 8 caption tokens = 29 > 25
    short = _enc(tiny, max_length=25)
    with pytest.raises(ValueError, match=r"29 tokens.*max_length=25"):
        short.encode([_image(8)], [long])
    assert short.encode([_image(8)], ["a"]).shape == (1, 25, 32)


def test_cfg_row_is_the_negative_prompt_alone(tiny):
    enc = _enc(tiny)
    img = _image(9)
    both = enc.encode([img, img], [PROMPT, NEG])
    torch.testing.assert_close(both[1], enc.encode([img], [NEG])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[0], enc.encode([img], [PROMPT])[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_image_inputs_tensor_pil_and_resize(tiny):
    enc = _enc(tiny)
    u = np.array(_image(10))
    t = torch.from_numpy(u).permute(2, 0, 1).float() / 127.5 - 1  # ospfn's [-1, 1]
    assert torch.equal(enc.encode(t[None], [PROMPT]), enc.encode([Image.fromarray(u)], [PROMPT]))
    big = _image(11, size=(100, 130))
    mine = big.resize((IMAGE_SIZE[1], IMAGE_SIZE[0]), Image.Resampling.BICUBIC)
    assert enc.prepare_images([big])[0].size == (IMAGE_SIZE[1], IMAGE_SIZE[0])
    assert torch.equal(enc.encode([big], [PROMPT]), enc.encode([mine], [PROMPT]))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        enc.encode((t[None] + 1) * 127.5, [PROMPT])
    with pytest.raises(ValueError, match="one image per prompt"):
        enc.encode([_image(0)], [PROMPT, NEG])
    with pytest.raises(TypeError, match="not a single str"):
        enc.encode([_image(0)], PROMPT)


def test_from_pretrained_local_directory(tiny, tmp_path):
    model, proc = tiny
    with pytest.raises(FileNotFoundError, match="nowhere"):
        QwenVLEncoder.from_pretrained(tmp_path / "nowhere", processor=proc)
    other = tmp_path / "t5"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match=r"t5.*not a Qwen2\.5-VL directory"):
        QwenVLEncoder.from_pretrained(other, processor=proc)
    model.save_pretrained(tmp_path / "qwen")
    kw = dict(image_size=IMAGE_SIZE, max_caption_tokens=MAX_CAP, max_length=MAX_LEN, processor=proc)
    for text_only in (False, True):
        loaded = QwenVLEncoder.from_pretrained(tmp_path / "qwen", text_only=text_only, **kw)
        assert hasattr(loaded.model, "visual") != text_only
        assert torch.equal(loaded.encode([_image(12)], [PROMPT]), _enc(tiny, text_only=text_only).encode([_image(12)], [PROMPT]))


# ----------------------------------------------------------------------------------------------------------
# the adapter and the extra tokens

SMALL = dict(vlm_dim=24, hidden_dim=40, text_dim=16)


def test_adapter_init():
    cfg = VLMAdapterConfig(**SMALL, first_frame_tokens=True, latent_channels=4, style_tokens=3)
    p = init_adapter(cfg, seed=3)
    assert {k: tuple(v.shape) for k, v in p.items()} == adapter_shapes(cfg)
    for name, (fan_out, fan_in) in (("adapter.0.weight", (40, 24)), ("adapter.2.weight", (16, 40)), ("first_frame.0.weight", (40, 16))):
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = p[name]
        assert w.shape == (fan_out, fan_in)
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # uniform over [-bound, bound]
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.15 * bound
    for name in ("adapter.0.bias", "adapter.2.bias", "first_frame.0.bias", "first_frame.2.weight", "first_frame.2.bias", "style_tokens"):
        assert not p[name].any(), name
    # same adapter draw with or without the extra branches; another seed differs
    plain = init_adapter(VLMAdapterConfig(**SMALL), seed=3)
    assert set(plain) == {"adapter.0.weight", "adapter.0.bias", "adapter.2.weight", "adapter.2.bias"}
    assert torch.equal(plain["adapter.0.weight"], p["adapter.0.weight"])
    assert not torch.equal(init_adapter(VLMAdapterConfig(**SMALL), seed=4)["adapter.0.weight"], plain["adapter.0.weight"])
    # at init the first-frame and style tokens are exactly zero
    feats = torch.randn(2, 5, 24)
    ctx = uniworld_context(p, cfg, feats, first_frame=torch.randn(2, 4, 1, 4, 4), style="Lego")
    assert ctx.shape == (2, 5 + 4 + 3, 16)
    assert not ctx[:, 5:].any() and ctx[:, :5].abs().sum() > 0
    assert init_adapter(cfg, dtype=torch.bfloat16)["adapter.0.weight"].dtype == torch.bfloat16


def _gelu64(x):
    return 0.5 * x * (1 + torch.special.erf(x / math.sqrt(2)))


def _random_params(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.3 for k, s in adapter_shapes(cfg).items()}


def test_context_equals_a_float64_hand_computation():
    cfg = VLMAdapterConfig(**SMALL, first_frame_tokens=True, latent_channels=3, style_tokens=2)
    p = _random_params(cfg)
    feats = torch.randn(2, 7, 24)
    latent = torch.randn(2, 3, 1, 4, 6)
    ctx = uniworld_context(p, cfg, feats, first_frame=latent, style=[0, "chibi"])
    d = {k: v.double() for k, v in p.items()}
    vlm = _gelu64(feats.double() @ d["adapter.0.weight"].T + d["adapter.0.bias"]) @ d["adapter.2.weight"].T + d["adapter.2.bias"]
    tokens = []  # 2 x 2 patches, row-major; each patch as (channel, row, column)
    for i in range(0, 4, 2):
        for j in range(0, 6, 2):
            tokens.append(latent[:, :, 0, i:i + 2, j:j + 2].reshape(2, -1))
    t = torch.stack(tokens, 1).double()
    ff = _gelu64(t @ d["first_frame.0.weight"].T + d["first_frame.0.bias"]) @ d["first_frame.2.weight"].T + d["first_frame.2.bias"]
    styles = torch.stack([d["style_tokens"][0], d["style_tokens"][STYLES.index("Chibi")]])
    want = torch.cat([vlm, ff, styles], 1)
    assert ctx.shape == (2, 7 + 6 + 2, 16) and ctx.dtype == torch.float32
    torch.testing.assert_close(ctx.double(), want, rtol=1e-5, atol=1e-5)
    # a 4-D latent is the same frame; bf16 params give a bf16 context
    torch.testing.assert_close(uniworld_context(p, cfg, feats, first_frame=latent[:, :, 0], style=[0, 11]), ctx)
    pb = {k: v.bfloat16() for k, v in p.items()}
    assert uniworld_context(pb, cfg, feats, first_frame=latent, style=0).dtype == torch.bfloat16


def test_styles():
    cfg = VLMAdapterConfig(**SMALL, style_tokens=4)
    p = _random_params(cfg, seed=1)
    feats = torch.randn(3, 5, 24)
    assert uniworld_context(p, cfg, feats).shape == (3, 5, 16)  # None: nothing appended
    ctx = uniworld_context(p, cfg, feats, style=["Ghibli", 11, "pixel-art"])
    assert ctx.shape == (3, 9, 16)
    for b, i in enumerate((0, 11, 5)):
        torch.testing.assert_close(ctx[b, 5:], p["style_tokens"][i])
    same = uniworld_context(p, cfg, feats, style="GOTHAM NOIR")
    assert all(torch.equal(same[b, 5:], p["style_tokens"][9]) for b in range(3))
    assert torch.equal(style_tokens(p, cfg, 9, 3), same[:, 5:])
    with pytest.raises(ValueError) as e:
        uniworld_context(p, cfg, feats, style="watercolour")
    assert all(name in str(e.value) for name in STYLES)
    with pytest.raises(ValueError, match="one per sample"):
        uniworld_context(p, cfg, feats, style=["Lego", "Chibi"])
    with pytest.raises(ValueError, match="out of range"):
        uniworld_context(p, cfg, feats, style=12)
    off = VLMAdapterConfig(**SMALL)
    with pytest.raises(ValueError, match="style_tokens is 0"):
        uniworld_context(_random_params(off), off, feats, style="Lego")
    with pytest.raises(ValueError, match="first_frame"):
        uniworld_context(_random_params(off), off, feats, first_frame=torch.randn(3, 16, 1, 4, 4))
    with pytest.raises(ValueError, match="missing"):
        uniworld_context(_random_params(off), cfg, feats)
    with pytest.raises(ValueError, match="style_tokens"):
        VLMAdapterConfig(style_tokens=-1)


# ----------------------------------------------------------------------------------------------------------
# the released adapter's names


class _ReleasedLayout(torch.nn.Module):
    """Laid out like the released EncoderAdapter: fc1 -> GELU -> fc2."""

    def __init__(self, v, h, t):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(v, h), torch.nn.GELU(), torch.nn.Linear(h, t)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_released_names_round_trip(tmp_path):
    cfg = VLMAdapterConfig(**SMALL)
    ours = _random_params(cfg, seed=2)
    released = to_released_adapter(ours)
    assert sorted(released) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    back = convert_released_adapter(released, cfg=cfg)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    # the released module with those weights computes what ospfn computes
    mod = _ReleasedLayout(24, 40, 16)
    mod.load_state_dict(released, strict=True)
    feats = torch.randn(2, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(uniworld_context(ours, cfg, feats), mod(feats), rtol=1e-5, atol=1e-5)
    # a state dict saved from the released module (possibly wrapped) loads back
    torch.save({f"module.{k}": v for k, v in mod.state_dict().items()}, tmp_path / "adapter.pt")
    loaded = load_released_adapter(tmp_path / "adapter.pt", cfg=cfg)
    assert all(torch.equal(loaded[k], ours[k]) for k in ours)
    with pytest.raises(CheckpointError, match=r"unknown.*fc3\.weight"):
        convert_released_adapter({**released, "fc3.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"missing.*fc2\.bias"):
        convert_released_adapter({k: v for k, v in released.items() if k != "fc2.bias"})
    with pytest.raises(CheckpointError, match="do not match"):
        convert_released_adapter(released, cfg=VLMAdapterConfig(vlm_dim=24, hidden_dim=40, text_dim=32))


# ----------------------------------------------------------------------------------------------------------
# the feature cache


def test_feature_cache_hits_and_misses(tiny, tmp_path, monkeypatch):
    enc = _enc(tiny)
    calls = []
    real_encode = enc.encode

    def counting(images, prompts):
        calls.append(list(prompts))
        return real_encode(images, prompts)

    monkeypatch.setattr(enc, "encode", counting)
    cache = VLMFeatureCache(tmp_path / "cache", "tiny-qwen")
    img = _image(13)
    first = cache.get_or_encode(enc, [img, img], [PROMPT, NEG])
    assert calls == [[PROMPT, NEG]] and (cache.hits, cache.misses) == (0, 2)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    torch.testing.assert_close(first, real_encode([img, img], [PROMPT, NEG]))

    def refuse(images, prompts):
        raise AssertionError("the encoder must not run on a cache hit")

    monkeypatch.setattr(enc, "encode", refuse)
    again = VLMFeatureCache(tmp_path / "cache", "tiny-qwen").get_or_encode(enc, [img, img], [PROMPT, NEG])
    assert torch.equal(again, first)
    monkeypatch.setattr(enc, "encode", counting)
    calls.clear()
    cache.get_or_encode(enc, [img], ["the cat"])  # another prompt
    cache.get_or_encode(enc, [_image(14)], [PROMPT])  # another image
    VLMFeatureCache(tmp_path / "cache", "other-weights").get_or_encode(enc, [img], [PROMPT])  # another encoder key
    assert calls == [["the cat"], [PROMPT], [PROMPT]]
    text_only = _enc(tiny, text_only=True)  # other settings
    hit = cache.get_or_encode(text_only, [img], [PROMPT])
    assert torch.equal(hit, text_only.encode([img], [PROMPT]))
    assert cache.misses == 2 + 2 + 1
