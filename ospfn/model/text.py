"""Text encoders behind one small interface, and a tiny trainable encoder for the bundled model.

Interface (``TextEncoder``): ``encode(prompts) -> (features [B, text_len, text_dim], lengths [B])`` with each
prompt's features cut to its true length and zero-padded (the Wan2.1 convention: no text attention mask).
The UMT5-XXL and Qwen2.5-VL encoders plug in behind the same interface.

``TinyTextEncoder`` needs no download: words are hashed (crc32) into a fixed vocabulary, embedded, given a
learned position, mixed by one pre-LN transformer layer and closed by an end-of-text token, so the empty
prompt encodes to one real token (used for text dropout and as the unconditional CFG branch).  Its
parameters are a flat dict (prefix-free) trained jointly with the DiT.

    >>> enc = TinyTextEncoder.create(text_dim=32, text_len=16, seed=0)
    >>> feats, lengths = enc.encode(["a red circle moving left", ""])
    >>> feats.shape, lengths.tolist()
    (torch.Size([2, 16, 32]), [6, 1])
    >>> bool((feats[1, 1:] == 0).all())
    True
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

__all__ = ["TextEncoder", "TinyTextConfig", "TinyTextEncoder", "tokenize", "init_tiny_text_params", "tiny_text_forward",
           "tiny_text_shapes"]


class TextEncoder(Protocol):
    text_dim: int
    text_len: int

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class TinyTextConfig:
    text_dim: int = 32
    text_len: int = 16
    vocab: int = 1024
    heads: int = 2

    def __post_init__(self):
        for name in ("text_dim", "text_len", "vocab", "heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TinyTextConfig: {name} must be a positive int, got {v!r}")
        if self.text_dim % self.heads:
            raise ValueError(f"TinyTextConfig: text_dim ({self.text_dim}) must be divisible by heads ({self.heads})")


_WORD = re.compile(r"[a-z0-9]+")
EOT = 0  # token id 0 is end-of-text; words hash into 1 .. vocab - 1


def tokenize(prompt: str, cfg: TinyTextConfig) -> list[int]:
    """Lower-cased words hashed into [1, vocab), then EOT; truncated so EOT always fits in text_len."""
    if not isinstance(prompt, str):
        raise TypeError(f"tokenize: prompt must be a str, got {type(prompt).__name__}")
    ids = [1 + zlib.crc32(w.encode()) % (cfg.vocab - 1) for w in _WORD.findall(prompt.lower())]
    return ids[: cfg.text_len - 1] + [EOT]


def tiny_text_shapes(cfg: TinyTextConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the tiny text encoder with its shape."""
    D = cfg.text_dim
    return {
        "tok_emb": (cfg.vocab, D), "pos_emb": (cfg.text_len, D),
        "ln1.weight": (D,), "ln1.bias": (D,), "qkv.weight": (3 * D, D), "qkv.bias": (3 * D,),
        "proj.weight": (D, D), "proj.bias": (D,), "ln2.weight": (D,), "ln2.bias": (D,),
        "mlp.0.weight": (2 * D, D), "mlp.0.bias": (2 * D,), "mlp.2.weight": (D, 2 * D), "mlp.2.bias": (D,),
    }  # fmt: skip


def init_tiny_text_params(cfg: TinyTextConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D = cfg.text_dim

    def xavier(o, i):
        b = math.sqrt(6.0 / (i + o))
        return (torch.rand(o, i, generator=g) * 2 - 1) * b

    return {
        "tok_emb": torch.randn(cfg.vocab, D, generator=g) * 0.5,
        "pos_emb": torch.randn(cfg.text_len, D, generator=g) * 0.1,
        "ln1.weight": torch.ones(D), "ln1.bias": torch.zeros(D),
        "qkv.weight": xavier(3 * D, D), "qkv.bias": torch.zeros(3 * D),
        "proj.weight": xavier(D, D), "proj.bias": torch.zeros(D),
        "ln2.weight": torch.ones(D), "ln2.bias": torch.zeros(D),
        "mlp.0.weight": xavier(2 * D, D), "mlp.0.bias": torch.zeros(2 * D),
        "mlp.2.weight": xavier(D, 2 * D), "mlp.2.bias": torch.zeros(D),
    }  # fmt: skip


def tiny_text_forward(params: dict, cfg: TinyTextConfig, prompts: Sequence[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [B, text_len, text_dim] zero beyond each length, lengths [B]) -- differentiable in params."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"tiny_text_forward: prompts must be a list of str, got {type(prompts).__name__}")
    device = device if device is not None else params["tok_emb"].device
    toks = [tokenize(p, cfg) for p in prompts]
    B, L, D = len(toks), cfg.text_len, cfg.text_dim
    ids = torch.zeros(B, L, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for b, t in enumerate(toks):
        ids[b, : len(t)] = torch.tensor(t)
        valid[b, : len(t)] = True
    ids, valid = ids.to(device), valid.to(device)
    x = params["tok_emb"][ids] + params["pos_emb"][None]
    h = F.layer_norm(x, (D,), params["ln1.weight"], params["ln1.bias"])
    q, k, v = F.linear(h, params["qkv.weight"], params["qkv.bias"]).view(B, L, 3, cfg.heads, D // cfg.heads).unbind(2)
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=valid[:, None, None, :])
    x = x + F.linear(a.transpose(1, 2).reshape(B, L, D), params["proj.weight"], params["proj.bias"])
    h = F.layer_norm(x, (D,), params["ln2.weight"], params["ln2.bias"])
    x = x + F.linear(F.gelu(F.linear(h, params["mlp.0.weight"], params["mlp.0.bias"])), params["mlp.2.weight"], params["mlp.2.bias"])
    return x * valid[..., None], valid.sum(1)


class TinyTextEncoder:
    """``TextEncoder`` over ``tiny_text_forward`` with its parameters."""

    def __init__(self, params: dict[str, torch.Tensor], cfg: TinyTextConfig) -> None:
        fn = "TinyTextEncoder"
        if not isinstance(cfg, TinyTextConfig):
            raise TypeError(f"{fn}: cfg must be a TinyTextConfig, got {type(cfg).__name__}")
        if not isinstance(params, dict):
            raise TypeError(f"{fn}: params must be a dict of tensors (init_tiny_text_params), got {type(params).__name__}")
        want = tiny_text_shapes(cfg)
        missing = sorted(set(want) - set(params))
        unexpected = sorted(set(params) - set(want))
        misshaped = [f"{k}: got {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}, expected {want[k]}"
                     for k, v in params.items() if k in want and not (isinstance(v, torch.Tensor) and tuple(v.shape) == want[k])]  # fmt: skip
        if missing or unexpected or misshaped:
            parts = [f"{what} {len(keys)}: {keys}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                                      ("mis-shaped", misshaped)) if keys]  # fmt: skip
            raise ValueError(f"{fn}: params do not match {cfg}: " + "; ".join(parts))
        self.params, self.cfg = params, cfg
        self.text_dim, self.text_len = cfg.text_dim, cfg.text_len

    @classmethod
    def create(cls, *, text_dim: int = 32, text_len: int = 16, vocab: int = 1024, seed: int = 0) -> "TinyTextEncoder":
        cfg = TinyTextConfig(text_dim=text_dim, text_len=text_len, vocab=vocab)
        return cls(init_tiny_text_params(cfg, seed=seed), cfg)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tiny_text_forward(self.params, self.cfg, prompts)
