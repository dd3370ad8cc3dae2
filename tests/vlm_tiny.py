"""A tiny random Qwen2.5-VL and its processor, built offline (no download), shared by the VLM tests.

The processor is a word-level tokenizer with Qwen's special tokens and a Qwen-style chat template; the model is
``Qwen2_5_VLForConditionalGeneration`` with 2 text layers (hidden 32) and a 2-layer vision tower, its weights
drawn larger than the default initialisation so that every part shows in the output.  Without torchvision the
processor is built without a video processor (the images-only path ospfn uses).
"""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from PIL import Image  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = ("[UNK] system user assistant You are a helpful assistant. red circle moving left blue square right the cat dog "
         "jumps over fence slowly green tree wind blows under bright sky bad blurry ugly "
         # ospfn.data.SyntheticMotion's captions (appended: the ids above are unchanged)
         "small large triangle diamond up down on background yellow cyan magenta white black gray navy brown purple").split()  # fmt: skip
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}
# the official Qwen2.5-VL template, reduced to one image and text parts (a default system turn, then the user turn)
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_SIZE = (56, 84)  # (H, W): 4 x 6 patches of 14 -> 2 x 3 = 6 merged image tokens
N_IMAGE_TOKENS = 6
HIDDEN = 32  # the language model's width: the features' vlm_dim


def tokenizer():
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=VOCAB, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<|endoftext|>",
                                                eos_token="<|im_end|>", additional_special_tokens=SPECIALS[1:])  # fmt: skip


def processor():
    tok = tokenizer()
    kw = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64, patch_size=14, merge_size=2, temporal_patch_size=2)
    try:
        import torchvision  # noqa: F401

        return transformers.Qwen2_5_VLProcessor(image_processor=transformers.Qwen2VLImageProcessor(**kw), tokenizer=tok,
                                                video_processor=transformers.Qwen2VLVideoProcessor(), chat_template=TEMPLATE)  # fmt: skip
    except ImportError:
        pass
    # without torchvision this transformers cannot even check a video processor's class (its registry is a dummy):
    # build the processor without one (images only), bypassing that check for the video slot alone
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, name, arg):
        return None if (name == "video_processor" and arg is None) else original(self, name, arg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class", check)
        return transformers.Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(**kw), tokenizer=tok, video_processor=None,
                                                chat_template=TEMPLATE)  # fmt: skip


def config():
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=256, bos_token_id=None, eos_token_id=VOCAB["<|im_end|>"],
                         pad_token_id=VOCAB["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, out_hidden_size=HIDDEN, fullatt_block_indexes=[1]),
        image_token_id=VOCAB["<|image_pad|>"], video_token_id=VOCAB["<|video_pad|>"],
        vision_start_token_id=VOCAB["<|vision_start|>"], vision_end_token_id=VOCAB["<|vision_end|>"],
    )  # fmt: skip


def model(seed: int = 1):
    """``Qwen2_5_VLForConditionalGeneration`` with random weights (fixed by ``seed``), in eval mode."""
    torch.manual_seed(0)
    m = transformers.Qwen2_5_VLForConditionalGeneration(config()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():  # larger than the default init, so every part shows in the output
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return m


def image(seed, size=IMAGE_SIZE):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))
