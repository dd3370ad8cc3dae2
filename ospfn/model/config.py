"""DiT configuration: the Wan2.1 / OSP-Next / FlashI2V family (docs/dit.md#presets, docs/skiparse.md#block-schedule)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["DiTConfig", "PRESETS"]

_SKIPARSE_TYPES = ("full", "dual_end")
_I2V = ("none", "flashi2v")
_QUANT = (None, "hif8")


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of the DiT, named as in Wan2.1 / OSP-Next.  Validated on construction.

    >>> cfg = DiTConfig.preset("osp-next-1.3b")
    >>> cfg.head_dim, cfg.num_layers, cfg.num_full_blocks
    (128, 30, 8)
    >>> DiTConfig.preset("tiny", num_layers=3)
    Traceback (most recent call last):
      ...
    ValueError: DiTConfig: skiparse_model_type='dual_end' needs an even num_layers, got 3
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    skiparse_model_type: str = "full"
    sparse_ratio: int = 1
    num_full_blocks: int = 0
    i2v: str = "none"
    conv3x3x3_proj: bool = False
    quant: Optional[str] = None
    quant_attn: Optional[str] = None
    rope_theta: float = 10000.0
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name, allowed):
            raise ValueError(f"DiTConfig: {name} must be {allowed}, got {getattr(self, name)!r}")

        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "text_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "a positive int")
        if self.dim % self.num_heads:
            raise ValueError(f"DiTConfig: dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"DiTConfig: the head dim dim/num_heads must be even and >= 6 for 3D RoPE, got {self.head_dim}")
        if self.freq_dim % 2:
            bad("freq_dim", "even (cos and sin halves)")
        ps = tuple(self.patch_size) if isinstance(self.patch_size, (tuple, list)) else None
        if ps is None or len(ps) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in ps):
            bad("patch_size", "a (t, h, w) triple of positive ints")
        object.__setattr__(self, "patch_size", ps)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < math.inf:
            bad("eps", "a finite number > 0")  # NaN and inf fail the comparison
        if self.skiparse_model_type not in _SKIPARSE_TYPES:
            bad("skiparse_model_type", f"one of {_SKIPARSE_TYPES}")
        if isinstance(self.sparse_ratio, bool) or not isinstance(self.sparse_ratio, int) or self.sparse_ratio < 1:
            bad("sparse_ratio", "an int >= 1")
        F, L = self.num_full_blocks, self.num_layers
        if isinstance(F, bool) or not isinstance(F, int) or F < 0:
            bad("num_full_blocks", "an int >= 0")
        if self.skiparse_model_type == "dual_end":
            if L % 2:
                raise ValueError(f"DiTConfig: skiparse_model_type='dual_end' needs an even num_layers, got {L}")
            if F % 4 or F > L // 2:
                raise ValueError(
                    f"DiTConfig: skiparse_model_type='dual_end' needs num_full_blocks % 4 == 0 and <= num_layers/2 ({L // 2}), got {F}"
                )
        if self.i2v not in _I2V:
            bad("i2v", f"one of {_I2V}")
        if not isinstance(self.conv3x3x3_proj, bool):
            bad("conv3x3x3_proj", "a bool")
        if self.quant not in _QUANT:
            bad("quant", f"one of {_QUANT}")
        if self.quant_attn not in _QUANT:
            bad("quant_attn", f"one of {_QUANT}")
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) or not 1 < self.rope_theta < math.inf:
            bad("rope_theta", "a finite number > 1")
        if not isinstance(self.extra, dict):
            bad("extra", "a dict")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_numel(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw

    def replace(self, **changes) -> "DiTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        """Build from a dict of our field names or a Wan / diffusers config.json (unknown keys are rejected)."""
        if not isinstance(d, dict):
            raise TypeError(f"DiTConfig.from_dict: d must be a dict of config fields, got {type(d).__name__}")
        d = dict(d)
        for k in ("__name__", "model_type", "architectures"):
            d.pop(k, None)
        for k in [k for k in d if isinstance(k, str) and k.startswith("_")]:  # library bookkeeping (_class_name,
            d.pop(k)  # _diffusers_version, _name_or_path, _use_default_values of an in-memory diffusers config)
        alias = {
            "num_attention_heads": None,  # diffusers; heads * head_dim gives dim
            "attention_head_dim": None,
            "in_channels": "in_dim",
            "out_channels": "out_dim",
            "window_size": None,
            "qk_norm": None,
            "cross_attn_norm": None,
            "image_dim": None,
            "added_kv_proj_dim": None,
            "rope_max_seq_len": None,
            "pos_embed_seq_len": None,
        }
        if "num_attention_heads" in d and "attention_head_dim" in d:
            d.setdefault("num_heads", d["num_attention_heads"])
            d.setdefault("dim", d["num_attention_heads"] * d["attention_head_dim"])
        out = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k in alias:
                if alias[k] is not None:
                    out[alias[k]] = v
                continue
            if k not in names:
                raise ValueError(f"DiTConfig.from_dict: unknown key {k!r}; known keys: {sorted(names - {'extra'})}")
            out[k] = tuple(v) if k == "patch_size" and isinstance(v, (list, tuple)) else v
        if out.get("skiparse_model_type") is None:
            out.pop("skiparse_model_type", None)
        return cls(**out)

    @classmethod
    def preset(cls, name: str, **overrides) -> "DiTConfig":
        """A named configuration (see ``PRESETS``) with optional field overrides.

        An unknown preset name (the known ones are listed) or override key (the fields are listed) raises
        ``ValueError``; the values are validated like any ``DiTConfig``.

        >>> DiTConfig.preset("tiny", depth=3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
          ...
        ValueError: DiTConfig.preset: unknown override key 'depth'; allowed keys: ['conv3x3x3_proj', 'dim', ...]
        """
        if not isinstance(name, str):
            raise TypeError(f"DiTConfig.preset: name must be a str, one of {sorted(PRESETS)}; got {type(name).__name__}")
        if name not in PRESETS:
            raise ValueError(f"DiTConfig.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:
            keys = ", ".join(repr(k) for k in unknown)
            raise ValueError(f"DiTConfig.preset: unknown override key{'s' if len(unknown) > 1 else ''} {keys}; "
                             f"allowed keys: {sorted(names - {'extra'})}")  # fmt: skip
        return cls(**{**PRESETS[name], **overrides})


_WAN_1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
_WAN_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_OSP_NEXT = dict(skiparse_model_type="dual_end", sparse_ratio=2, num_full_blocks=8)

PRESETS: dict[str, dict] = {
    "wan2.1-t2v-1.3b": dict(_WAN_1_3B),
    "wan2.1-t2v-14b": dict(_WAN_14B),
    "osp-next-1.3b": dict(_WAN_1_3B, **_OSP_NEXT),
    "osp-next-14b": dict(_WAN_14B, **_OSP_NEXT),
    "flashi2v-14b": dict(_WAN_14B, i2v="flashi2v"),
    "flashi2v-1.3b": dict(_WAN_1_3B, i2v="flashi2v", conv3x3x3_proj=True),  # the released NPU weights
    # The same architecture at toy size, for tests and the bundled demo: the OSP-Next schedule with
    # blocks 0-1 and 6-7 full and 2-5 sparse (token, group, token, group).
    "tiny": dict(
        dim=64, ffn_dim=128, num_heads=4, num_layers=8, in_dim=16, out_dim=16, text_dim=32, freq_dim=32,
        text_len=16, skiparse_model_type="dual_end", sparse_ratio=2, num_full_blocks=4,
    ),  # fmt: skip
}
