"""Uniworld-OSP2.0's VLM conditioning: a frozen Qwen2.5-VL reads the first frame and the caption, a small trained
adapter maps its last hidden states to the DiT's ``context`` (where the UMT5 features used to go).

The recipe (Uniworld-OSP2.0 technical report and its released code, PKU-YuanGroup/UniWorld, folder UniWorld-OSP2.0):

* **VLM features** (``QwenVLEncoder``): Qwen2.5-VL-7B (hidden 3584, frozen) reads ONE chat turn -- the first frame
  resized to 416 x 240 (W x H) and the caption cut to 512 tokens (``""`` when the caption is dropped) -- with the
  generation prompt appended, padded to 1024 tokens.  The features are the LAST layer's hidden states (after the
  final norm) at all 1024 positions: no pooling, no mask, the DiT cross-attends to every position.
* **Adapter** (the only trained part of the released recipe): ``Linear(3584 -> 4096) -> GELU (exact erf) ->
  Linear(4096 -> 4096)``, Xavier-uniform weights, zero biases.  Its 4096-wide output replaces the T5 features as
  the DiT's ``context`` [B, L, text_dim]; the DiT's own ``text_embedding`` then maps text_dim -> dim.
* **First-frame latent tokens** (optional, the report's f_img branch; absent from the released code, off by
  default): the first-frame latent [B, C, 1, h, w] cut into 2 x 2 patches (C*4 = 64 values each for Wan's 16
  channels) -> ``MLP(C*4 -> hidden_dim, GELU, hidden_dim -> text_dim)`` with its LAST layer zero-initialised, the
  tokens appended after the VLM tokens.
* **Style tokens** (ospfn's addition for image-to-stylised-video): a learned table [12, tokens_per_style,
  text_dim], zero-initialised; the chosen style's tokens (``ospfn.styles``) are appended last.  No style appends
  nothing.
* **CFG**: the unconditional context is the VLM embedding of the SAME image with the negative prompt
  (``encode([img, img], [prompt, negative])``).

Parameters are a flat dict of tensors with ospfn's own names (``adapter_shapes``); ``convert_released_adapter``
renames the released adapter's state dict (``fc1.*`` / ``fc2.*`` of its ``EncoderAdapter``) to them.

    >>> import torch
    >>> cfg = VLMAdapterConfig(vlm_dim=8, hidden_dim=16, text_dim=12, first_frame_tokens=True, latent_channels=4,
    ...                        style_tokens=3)
    >>> params = init_adapter(cfg, seed=0)
    >>> sorted(params)  # doctest: +NORMALIZE_WHITESPACE
    ['adapter.0.bias', 'adapter.0.weight', 'adapter.2.bias', 'adapter.2.weight', 'first_frame.0.bias',
     'first_frame.0.weight', 'first_frame.2.bias', 'first_frame.2.weight', 'style_tokens']
    >>> feats = torch.randn(2, 10, 8)                   # [B, L, vlm_dim] from QwenVLEncoder.encode
    >>> latent = torch.randn(2, 4, 1, 4, 6)             # first-frame latent: (4/2) * (6/2) = 6 tokens
    >>> ctx = uniworld_context(params, cfg, feats, first_frame=latent, style=["Pixel art", 3])
    >>> ctx.shape                                       # 10 VLM + 6 first-frame + 3 style tokens
    torch.Size([2, 19, 12])
    >>> bool((ctx[:, 10:] == 0).all())                  # both extra branches start at exactly zero
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ospfn.model.checkpoint import CheckpointError
from ospfn.styles import STYLES, style_id

__all__ = [
    "VLMAdapterConfig",
    "adapter_shapes",
    "init_adapter",
    "check_adapter_params",
    "adapter_forward",
    "patchify_first_frame",
    "first_frame_tokens",
    "style_tokens",
    "uniworld_context",
    "convert_released_adapter",
    "to_released_adapter",
    "load_released_adapter",
    "QwenVLEncoder",
    "VLMFeatureCache",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_MAX_CAPTION_TOKENS",
    "DEFAULT_MAX_LENGTH",
]

DEFAULT_IMAGE_SIZE = (240, 416)  # (H, W): 416 x 240 (W x H) in the released code
DEFAULT_MAX_CAPTION_TOKENS = 512
DEFAULT_MAX_LENGTH = 1024
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def _pos_int(value, name: str, who: str, *, zero_ok: bool = False) -> int:
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{who}: {name} must be an int >= {low}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------
# configuration and parameters


@dataclass(frozen=True)
class VLMAdapterConfig:
    """Shapes of the VLM adapter and of the two optional extra token branches.

    ``vlm_dim``: the VLM's hidden size (3584 for Qwen2.5-VL-7B); ``hidden_dim``: the adapter's (and the first-frame
    MLP's) hidden width; ``text_dim``: the width of the DiT's context (4096, that of UMT5-XXL, for Wan2.1).
    ``first_frame_tokens``: append the patchified first-frame latent (``latent_channels`` channels, ``patch`` x
    ``patch`` patches).  ``style_tokens``: tokens per style (0: no style table); ``num_styles``: rows of the style
    table (the 12 of ``ospfn.styles.STYLES``)."""

    vlm_dim: int = 3584
    hidden_dim: int = 4096
    text_dim: int = 4096
    first_frame_tokens: bool = False
    latent_channels: int = 16
    patch: int = 2
    style_tokens: int = 0
    num_styles: int = 12

    def __post_init__(self):
        who = "VLMAdapterConfig"
        for name in ("vlm_dim", "hidden_dim", "text_dim", "latent_channels", "patch", "num_styles"):
            _pos_int(getattr(self, name), name, who)
        _pos_int(self.style_tokens, "style_tokens", who, zero_ok=True)
        if not isinstance(self.first_frame_tokens, bool):
            raise ValueError(f"{who}: first_frame_tokens must be a bool, got {self.first_frame_tokens!r}")

    @property
    def first_frame_dim(self) -> int:
        """Values per first-frame token: ``latent_channels * patch * patch``."""
        return self.latent_channels * self.patch * self.patch


def adapter_shapes(cfg: VLMAdapterConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the adapter (and of the enabled extra branches) with its shape.  Linear weights are
    ``[out, in]`` (``F.linear``); ``.0`` / ``.2`` number the layers as in ``nn.Sequential(Linear, GELU, Linear)``."""
    if not isinstance(cfg, VLMAdapterConfig):
        raise TypeError(f"adapter_shapes: cfg must be a VLMAdapterConfig, got {type(cfg).__name__}")
    H, T = cfg.hidden_dim, cfg.text_dim
    shapes = {"adapter.0.weight": (H, cfg.vlm_dim), "adapter.0.bias": (H,), "adapter.2.weight": (T, H), "adapter.2.bias": (T,)}
    if cfg.first_frame_tokens:
        shapes.update({"first_frame.0.weight": (H, cfg.first_frame_dim), "first_frame.0.bias": (H,),
                       "first_frame.2.weight": (T, H), "first_frame.2.bias": (T,)})  # fmt: skip
    if cfg.style_tokens:
        shapes["style_tokens"] = (cfg.num_styles, cfg.style_tokens, T)
    return shapes


def init_adapter(cfg: VLMAdapterConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Fresh parameters: Xavier-uniform weights (bound ``sqrt(6 / (fan_in + fan_out))``) and zero biases for the
    adapter and the first layer of the first-frame MLP; the first-frame MLP's LAST layer (weight and bias) and the
    style table zero, so both extra branches contribute exactly zero tokens at initialisation.  Drawn in fp32 from
    a generator seeded with ``seed`` in the order adapter.0, adapter.2, first_frame.0 (so enabling an extra branch
    does not change the adapter's draw), then cast to ``dtype``."""
    if not isinstance(cfg, VLMAdapterConfig):
        raise TypeError(f"init_adapter: cfg must be a VLMAdapterConfig, got {type(cfg).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"init_adapter: dtype must be a floating-point torch.dtype, got {dtype!r}")
    g = torch.Generator().manual_seed(int(seed))

    def xavier(shape):
        fan_out, fan_in = shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        return (torch.rand(shape, generator=g, dtype=torch.float32) * 2 - 1) * bound

    out = {}
    for name, shape in adapter_shapes(cfg).items():
        if name in ("adapter.0.weight", "adapter.2.weight", "first_frame.0.weight"):
            out[name] = xavier(shape)
        else:  # biases, the first-frame MLP's last layer, the style table
            out[name] = torch.zeros(shape, dtype=torch.float32)
    return {k: v.to(dtype) for k, v in out.items()}


def check_adapter_params(params, cfg: VLMAdapterConfig, who: str = "check_adapter_params") -> None:
    """Raise ``ValueError`` listing every missing, unexpected and mis-shaped parameter (``TypeError`` for a
    non-dict or a non-floating tensor); all tensors must share one dtype and one device."""
    if not isinstance(cfg, VLMAdapterConfig):
        raise TypeError(f"{who}: cfg must be a VLMAdapterConfig, got {type(cfg).__name__}")
    if not isinstance(params, dict):
        raise TypeError(f"{who}: params must be a dict of tensors (init_adapter), got {type(params).__name__}")
    want = adapter_shapes(cfg)
    missing = sorted(set(want) - set(params))
    unexpected = sorted(set(params) - set(want))
    misshaped = [f"{k}: got {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}, expected {want[k]}"
                 for k, v in params.items() if k in want and not (isinstance(v, torch.Tensor) and tuple(v.shape) == want[k])]  # fmt: skip
    if missing or unexpected or misshaped:
        parts = [f"{what} {len(keys)}: {keys}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                                  ("mis-shaped", misshaped)) if keys]  # fmt: skip
        raise ValueError(f"{who}: params do not match {cfg}: " + "; ".join(parts))
    dtypes = {v.dtype for v in params.values()}
    devices = {v.device for v in params.values()}
    if any(not d.is_floating_point for d in dtypes):
        raise TypeError(f"{who}: params must be floating-point tensors, got dtypes {sorted(map(str, dtypes))}")
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"{who}: params must share one dtype and one device, got {sorted(map(str, dtypes))} on {sorted(map(str, devices))}")


def _mlp(params: dict, prefix: str, x: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    w0, b0 = params[f"{prefix}.0.weight"], params[f"{prefix}.0.bias"]
    w2, b2 = params[f"{prefix}.2.weight"], params[f"{prefix}.2.bias"]
    x = x.to(device=w0.device, dtype=compute_dtype)
    h = F.gelu(F.linear(x, w0.to(compute_dtype), b0.to(compute_dtype)), approximate="none")
    return F.linear(h, w2.to(compute_dtype), b2.to(compute_dtype))


def _check_compute_dtype(compute_dtype, who: str) -> torch.dtype:
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise TypeError(f"{who}: compute_dtype must be a floating-point torch.dtype, got {compute_dtype!r}")
    return compute_dtype


def adapter_forward(params: dict, features: torch.Tensor, *, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Linear -> GELU (exact erf) -> Linear`` over the last dim of ``features`` [..., vlm_dim], computed in
    ``compute_dtype`` on the parameters' device; returns ``compute_dtype`` (``uniworld_context`` casts)."""
    _check_compute_dtype(compute_dtype, "adapter_forward")
    return _mlp(params, "adapter", features, compute_dtype)


def patchify_first_frame(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """First-frame latent [B, C, 1, h, w] (or [B, C, h, w]) -> tokens [B, (h/p) * (w/p), C * p * p].

    Tokens run row-major over the patch grid; each token holds its patch as (channel, row, column) -- the order in
    which a ``Conv2d(C, ., kernel=p, stride=p)`` flattens its weight.

        >>> x = torch.arange(2 * 4 * 4).float().view(1, 2, 1, 4, 4)
        >>> t = patchify_first_frame(x, 2)
        >>> t.shape, t[0, 1].tolist()   # patch (row 0, column 1): channel 0 then channel 1
        (torch.Size([1, 4, 8]), [2.0, 3.0, 6.0, 7.0, 18.0, 19.0, 22.0, 23.0])
    """
    who = "patchify_first_frame"
    if not isinstance(latent, torch.Tensor):
        raise TypeError(f"{who}: latent must be a tensor [B, C, 1, h, w] or [B, C, h, w], got {type(latent).__name__}")
    _pos_int(patch, "patch", who)
    if latent.dim() == 5:
        if latent.shape[2] != 1:
            raise ValueError(f"{who}: a 5-D latent must hold ONE frame [B, C, 1, h, w], got {tuple(latent.shape)}; pass latent[:, :, :1]")
        latent = latent[:, :, 0]
    if latent.dim() != 4:
        raise ValueError(f"{who}: latent must be [B, C, 1, h, w] or [B, C, h, w], got shape {tuple(latent.shape)}")
    B, C, h, w = latent.shape
    if h % patch or w % patch or h == 0 or w == 0:
        raise ValueError(f"{who}: latent height and width ({h}, {w}) must be positive multiples of patch={patch}")
    x = latent.reshape(B, C, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // patch) * (w // patch), C * patch * patch)


def first_frame_tokens(params: dict, cfg: VLMAdapterConfig, latent: torch.Tensor, *,
                       compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """The first-frame context tokens [B, (h/p) * (w/p), text_dim] in ``compute_dtype``: ``patchify_first_frame``
    then ``MLP(C*p*p -> hidden_dim, GELU, hidden_dim -> text_dim)``."""
    who = "first_frame_tokens"
    _check_compute_dtype(compute_dtype, who)
    if not cfg.first_frame_tokens:
        raise ValueError(f"{who}: cfg.first_frame_tokens is False: this adapter has no first-frame branch")
    if isinstance(latent, torch.Tensor) and latent.dim() in (4, 5) and latent.shape[1] != cfg.latent_channels:
        raise ValueError(f"{who}: latent has {latent.shape[1]} channels, cfg.latent_channels is {cfg.latent_channels}")
    if isinstance(latent, torch.Tensor) and not latent.dtype.is_floating_point:
        raise TypeError(f"{who}: latent must be a floating-point tensor, got {latent.dtype}")
    return _mlp(params, "first_frame", patchify_first_frame(latent, cfg.patch), compute_dtype)


def _style_ids(style, batch: int, num_styles: int, who: str) -> Optional[list[int]]:
    """None, or one style id per sample, from None / a name / an id / a list of names or ids (one per sample)."""
    if style is None:
        return None

    def one(s) -> int:
        if isinstance(s, str):
            try:
                i = style_id(s)
            except ValueError as e:
                raise ValueError(f"{who}: {e}") from None
        elif isinstance(s, numbers.Integral) and not isinstance(s, bool):
            i = int(s)
        elif isinstance(s, torch.Tensor) and s.dim() == 0 and not s.dtype.is_floating_point and s.dtype != torch.bool:
            i = int(s)
        else:
            raise TypeError(f"{who}: a style must be a name (one of {list(STYLES)}) or an int id, got {type(s).__name__}: {s!r}")
        if not 0 <= i < num_styles:
            raise ValueError(f"{who}: style id {i} is out of range 0..{num_styles - 1} (the styles: {', '.join(STYLES)})")
        return i

    if isinstance(style, (list, tuple)):
        if len(style) != batch:
            raise ValueError(f"{who}: a list of styles needs one per sample: got {len(style)} for a batch of {batch}")
        if any(s is None for s in style):
            raise ValueError(f"{who}: per-sample styles must all be set (None inside the list would give samples different "
                             "context lengths); pass style=None for no style tokens at all")
        return [one(s) for s in style]
    if isinstance(style, torch.Tensor) and style.dim() == 1:
        return _style_ids(style.tolist(), batch, num_styles, who)
    return [one(style)] * batch


def style_tokens(params: dict, cfg: VLMAdapterConfig, style, batch: int) -> torch.Tensor:
    """The style tokens [batch, cfg.style_tokens, text_dim] (the params' dtype): rows of the ``style_tokens`` table
    picked by ``style`` -- a name (``ospfn.styles``: case, spaces, ``-`` and ``_`` ignored), an int id, or a list
    with one name / id per sample.  ``style=None`` gives [batch, 0, text_dim].  Unknown names raise ``ValueError``
    listing the 12 styles."""
    who = "style_tokens"
    _pos_int(batch, "batch", who)
    ids = _style_ids(style, batch, cfg.num_styles, who)
    if ids is None:
        ref = params["adapter.2.bias"]
        return ref.new_zeros(batch, 0, cfg.text_dim)
    if not cfg.style_tokens:
        raise ValueError(f"{who}: got style={style!r} but cfg.style_tokens is 0 (no style table); use "
                         "VLMAdapterConfig(style_tokens=N) or pass style=None")  # fmt: skip
    table = params["style_tokens"]
    return table[torch.tensor(ids, dtype=torch.long, device=table.device)]


def uniworld_context(params: dict, cfg: VLMAdapterConfig, features: torch.Tensor, *, first_frame: Optional[torch.Tensor] = None,
                     style=None, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """The DiT's ``context`` [B, L + n_first_frame + n_style, text_dim]: ``adapter_forward(features)``, then the
    first-frame tokens (required when ``cfg.first_frame_tokens``, refused otherwise), then the style tokens of
    ``style`` (None: none; a name / id for every sample; or a list with one per sample).  Computed in
    ``compute_dtype`` (fp32 by default) on the parameters' device; returned in the parameters' dtype.

    For classifier-free guidance build the unconditional context from the unconditional VLM features (the same
    image with the negative prompt) with the same ``first_frame`` and ``style``."""
    who = "uniworld_context"
    check_adapter_params(params, cfg, who)
    _check_compute_dtype(compute_dtype, who)
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{who}: features must be a tensor [B, L, vlm_dim={cfg.vlm_dim}], got {type(features).__name__}")
    if features.dim() != 3 or features.shape[2] != cfg.vlm_dim or features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"{who}: features must be [B, L, vlm_dim={cfg.vlm_dim}] with B, L >= 1, got {tuple(features.shape)}")
    if not features.dtype.is_floating_point:
        raise TypeError(f"{who}: features must be a floating-point tensor, got {features.dtype}")
    B = features.shape[0]
    out_dtype = params["adapter.0.weight"].dtype
    parts = [adapter_forward(params, features, compute_dtype=compute_dtype)]
    if cfg.first_frame_tokens:
        if first_frame is None:
            raise ValueError(f"{who}: cfg.first_frame_tokens is True: pass first_frame (the first-frame latent [B, C, 1, h, w])")
        if not isinstance(first_frame, torch.Tensor) or first_frame.dim() not in (4, 5) or first_frame.shape[0] != B:
            shown = tuple(first_frame.shape) if isinstance(first_frame, torch.Tensor) else type(first_frame).__name__
            raise ValueError(f"{who}: first_frame must be [B={B}, C, 1, h, w] or [B={B}, C, h, w], got {shown}")
        parts.append(first_frame_tokens(params, cfg, first_frame, compute_dtype=compute_dtype))
    elif first_frame is not None:
        raise ValueError(f"{who}: got first_frame but cfg.first_frame_tokens is False; enable it or pass first_frame=None")
    if style is not None:
        parts.append(style_tokens(params, cfg, style, B).to(compute_dtype))
    return torch.cat(parts, dim=1).to(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# the released adapter's names

# EncoderAdapter (UniWorld-OSP2.0/ultrai2v/modules/flashi2v.py of PKU-YuanGroup/UniWorld): fc1 -> act (nn.GELU) -> fc2;
# the inference script loads its saved state dict into the bare module with strict=True.
_RELEASED = {"fc1.weight": "adapter.0.weight", "fc1.bias": "adapter.0.bias", "fc2.weight": "adapter.2.weight", "fc2.bias": "adapter.2.bias"}
# wrappers that may prefix the names (DDP / torch.compile / a parent module that holds the adapter under its pipeline name)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "vlm_encoder_adapter.")


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def convert_released_adapter(state_dict: dict, *, cfg: Optional[VLMAdapterConfig] = None, source: str = "state dict") -> dict:
    """Rename the released Uniworld-OSP2.0 adapter (``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``;
    ``module.`` / ``_orig_mod.`` / ``vlm_encoder_adapter.`` prefixes are dropped) to ospfn's ``adapter.*`` names.
    Unknown and missing keys raise ``CheckpointError`` listing them, as do shapes that do not chain
    (``fc1 [H, V]``, ``fc2 [T, H]``) or, with ``cfg``, do not match it.  The first-frame and style parameters are
    not part of the release: merge the result into ``init_adapter(cfg)`` for those.

        >>> sd = {"fc1.weight": torch.zeros(16, 8), "fc1.bias": torch.zeros(16),
        ...       "fc2.weight": torch.zeros(12, 16), "fc2.bias": torch.zeros(12)}
        >>> sorted(convert_released_adapter(sd))
        ['adapter.0.bias', 'adapter.0.weight', 'adapter.2.bias', 'adapter.2.weight']
    """
    who = f"convert_released_adapter({source})"
    if not isinstance(state_dict, dict):
        raise TypeError(f"{who}: state_dict must be a dict of name -> tensor, got {type(state_dict).__name__}")
    out, unknown, seen = {}, [], {}
    for key, value in state_dict.items():
        name = _strip_wrappers(key) if isinstance(key, str) else key
        if name not in _RELEASED:
            unknown.append(key)
            continue
        if name in seen:
            raise CheckpointError(f"{who}: keys {seen[name]!r} and {key!r} both name the released {name!r}")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{who}: {key!r} must be a tensor, got {type(value).__name__}")
        seen[name] = key
        out[_RELEASED[name]] = value
    missing = sorted(set(_RELEASED) - set(seen))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} unknown key(s): {sorted(map(str, unknown))[:20]}{' ...' if len(unknown) > 20 else ''}")
        if missing:
            parts.append(f"missing: {missing}")
        raise CheckpointError(f"{who}: not the released VLM adapter ({'; '.join(parts)}); expected exactly {sorted(_RELEASED)} "
                              f"(optionally prefixed by {', '.join(_WRAPPER_PREFIXES)})")  # fmt: skip
    w0, b0, w2, b2 = (out[k] for k in ("adapter.0.weight", "adapter.0.bias", "adapter.2.weight", "adapter.2.bias"))
    if w0.dim() != 2 or w2.dim() != 2 or b0.shape != (w0.shape[0],) or w2.shape[1] != w0.shape[0] or b2.shape != (w2.shape[0],):
        raise CheckpointError(f"{who}: shapes do not chain: fc1.weight {tuple(w0.shape)}, fc1.bias {tuple(b0.shape)}, "
                              f"fc2.weight {tuple(w2.shape)}, fc2.bias {tuple(b2.shape)} (expected [H, V], [H], [T, H], [T])")  # fmt: skip
    if cfg is not None:
        want = {k: v for k, v in adapter_shapes(cfg).items() if k in out}
        bad = [f"{k}: {tuple(out[k].shape)} != {s}" for k, s in want.items() if tuple(out[k].shape) != s]
        if bad:
            raise CheckpointError(f"{who}: shapes do not match {cfg}: {bad}")
    return out


def to_released_adapter(params: dict) -> dict:
    """ospfn's ``adapter.*`` parameters under the released names (``fc1.*`` / ``fc2.*``), e.g. to load them into
    the released ``EncoderAdapter``; the extra branches (first-frame, style) have no released name and are left
    out."""
    if not isinstance(params, dict):
        raise TypeError(f"to_released_adapter: params must be a dict of tensors, got {type(params).__name__}")
    inv = {v: k for k, v in _RELEASED.items()}
    missing = sorted(k for k in inv if k not in params)
    if missing:
        raise KeyError(f"to_released_adapter: params lack {missing}")
    return {inv[k]: params[k] for k in inv}


def load_released_adapter(path, *, cfg: Optional[VLMAdapterConfig] = None) -> dict:
    """The released adapter checkpoint (``torch.save`` of its state dict, read with ``weights_only=True``, or a
    ``.safetensors`` file) as ospfn's ``adapter.*`` parameters (``convert_released_adapter``)."""
    from ospfn.model.umt5 import read_torch_state_dict

    return convert_released_adapter(read_torch_state_dict(path, "load_released_adapter"), cfg=cfg, source=str(path))


# ----------------------------------------------------------------------------------------------------------
# the frozen VLM


def _transformers(what: str):
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"{what} needs the optional package 'transformers': pip install transformers") from e
    return transformers


def _check_prompts(prompts, who: str) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"{who}: prompts must be a sequence of str (a list), not a single str; wrap it: [{prompts!r}]")
    try:
        prompts = list(prompts)
    except TypeError:
        raise TypeError(f"{who}: prompts must be a sequence of str, got {type(prompts).__name__}") from None
    if not prompts:
        raise ValueError(f"{who}: prompts is empty; pass one str per image ('' for a dropped caption)")
    bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{who}: every prompt must be a str; not str at (index, type): {bad[:8]}")
    return prompts


def _check_image_size(image_size, who: str) -> tuple[int, int]:
    if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in image_size)):  # fmt: skip
        raise ValueError(f"{who}: image_size must be (height, width) as two positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


class QwenVLEncoder:
    """The frozen Qwen2.5-VL of Uniworld-OSP2.0 over a transformers model and its processor.

    ``encode(images, prompts) -> [B, max_length, vlm_dim]``: for each (image, caption) pair ONE user turn -- the
    image resized to ``image_size`` (H, W; 240 x 416 by default), then the caption cut to ``max_caption_tokens``
    tokens -- rendered with the processor's chat template (the official Qwen2.5-VL template adds its default system turn,
    "You are a helpful assistant.") and the generation prompt, expanded by the processor
    (each image placeholder becomes one token per merged vision patch), right-padded to ``max_length`` with the
    tokenizer's pad token; the VLM's last hidden state (after the final norm) at every position, padding
    included (the DiT cross-attends to all of them, as in the release).  The attention mask goes to the VLM, so
    the padding does not change the real positions.  A sequence longer than ``max_length`` raises ``ValueError``.
    Computed without gradients; returned on the model's device in the model's dtype.

    ``model``: ``Qwen2_5_VLModel`` or ``Qwen2_5_VLForConditionalGeneration`` (its ``.model`` is used: no logits);
    with ``text_only=True`` also a bare ``Qwen2_5_VLTextModel``.  ``processor``: a ``Qwen2_5_VLProcessor`` (or any
    object with its ``tokenizer``, ``apply_chat_template`` and ``__call__``).

    Modes:

    * default (full multimodal): ``pixel_values`` / ``image_grid_thw`` / ``mm_token_type_ids`` go to the model, the
      image tokens carry the vision tower's features and get Qwen2.5-VL's 3-D (M-RoPE) positions.
    * ``text_only=True``: what the released code did -- it loaded only the language tower
      (``Qwen2_5_VLTextModel.from_pretrained``) and called it on the processor's ``input_ids`` / ``attention_mask``
      (the pixel values it also passed are ignored by that class).  The image-placeholder tokens therefore hold
      only the embedding of ``<|image_pad|>`` (no vision features; the image size still sets how many there are),
      and, given no ``position_ids``, the language model numbers the positions ``0 .. max_length-1`` and uses that
      one index for all three M-RoPE sections (temporal, height, width) -- i.e. plain 1-D RoPE over the padded
      sequence, image tokens included.  The image's content changes nothing (every image is resized to
      ``image_size``, so even the number of placeholder tokens is fixed).

    Differences from the released preprocessing (documented, not reproduced): the release wrote the resized first
    frame to a JPEG file (lossy) and read it back through ``qwen_vl_utils``; here the resized image goes to the
    processor directly (bicubic resizing, then the processor's own rounding to multiples of
    ``patch_size * merge_size``, 28 for Qwen2.5-VL: 240 x 416 -> 252 x 420, 9 x 15 = 135 image tokens).  The
    release re-decoded every caption after cutting it to 512 tokens; here only captions longer than
    ``max_caption_tokens`` are re-decoded (``decode(ids[:max], skip_special_tokens=True)``), shorter ones go in as
    given.  Padding is forced to the right (the Qwen2.5-VL tokenizer's default, which the release used)."""

    def __init__(self, model, processor, *, text_only: bool = False, image_size=DEFAULT_IMAGE_SIZE,
                 max_caption_tokens: int = DEFAULT_MAX_CAPTION_TOKENS, max_length: int = DEFAULT_MAX_LENGTH) -> None:  # fmt: skip
        who = "QwenVLEncoder"
        if not isinstance(text_only, bool):
            raise TypeError(f"{who}: text_only must be a bool, got {text_only!r}")
        self.image_size = _check_image_size(image_size, who)
        self.max_caption_tokens = _pos_int(max_caption_tokens, "max_caption_tokens", who)
        self.max_length = _pos_int(max_length, "max_length", who)
        self.text_only = text_only
        for attr in ("tokenizer", "apply_chat_template"):
            if not hasattr(processor, attr):
                raise TypeError(f"{who}: processor must be a Qwen2_5_VLProcessor (with .tokenizer and .apply_chat_template), "
                                f"got {type(processor).__name__}")  # fmt: skip
        if not callable(processor):
            raise TypeError(f"{who}: processor must be callable (a Qwen2_5_VLProcessor), got {type(processor).__name__}")
        if getattr(processor.tokenizer, "pad_token_id", None) is None:
            raise ValueError(f"{who}: the tokenizer has no pad token; sequences are padded to max_length={self.max_length}")
        tr = _transformers(who)
        if isinstance(model, tr.Qwen2_5_VLForConditionalGeneration):
            model = model.model
        if isinstance(model, tr.Qwen2_5_VLModel):
            self._vlm_dim = int(model.config.text_config.hidden_size)
            if text_only:
                model = model.language_model
            else:
                image_token_id = getattr(processor, "image_token_id", None)
                if image_token_id is not None and int(image_token_id) != int(model.config.image_token_id):
                    raise ValueError(f"{who}: the processor's image token id {image_token_id} differs from the model's "
                                     f"config.image_token_id {model.config.image_token_id}: they are not a pair")  # fmt: skip
        elif isinstance(model, tr.Qwen2_5_VLTextModel):
            if not text_only:
                raise TypeError(f"{who}: a Qwen2_5_VLTextModel has no vision tower; pass text_only=True (the released behaviour) "
                                "or the full Qwen2_5_VLModel / Qwen2_5_VLForConditionalGeneration")  # fmt: skip
            self._vlm_dim = int(model.config.hidden_size)
        else:
            raise TypeError(f"{who}: model must be a transformers Qwen2_5_VLModel, Qwen2_5_VLForConditionalGeneration or "
                            f"(text_only) Qwen2_5_VLTextModel, got {type(model).__name__}")  # fmt: skip
        self.model = model.eval()
        self.processor = processor

    # -- properties ---------------------------------------------------------------------------------------

    @property
    def vlm_dim(self) -> int:
        """The width of the features: the language model's hidden size (3584 for Qwen2.5-VL-7B)."""
        return self._vlm_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def settings(self) -> dict:
        """Everything besides the weights that decides the features (part of ``VLMFeatureCache``'s key)."""
        return {"text_only": self.text_only, "image_size": list(self.image_size), "max_caption_tokens": self.max_caption_tokens,
                "max_length": self.max_length, "vlm_dim": self.vlm_dim, "dtype": str(self.dtype).replace("torch.", "")}  # fmt: skip

    # -- preprocessing ------------------------------------------------------------------------------------

    def prepare_images(self, images) -> list:
        """RGB PIL images of ``image_size`` from a float tensor [B, 3, H, W] in [-1, 1] (ospfn's convention), or a
        sequence of PIL images and/or [3, H, W] tensors.  Tensors become uint8 as ``round((x + 1) * 127.5)``;
        images of another size are resized with bicubic filtering (no crop: the aspect ratio follows image_size)."""
        who = "QwenVLEncoder.prepare_images"
        from PIL import Image

        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                raise ValueError(f"{who}: a single image tensor {tuple(images.shape)}: pass a batch [B, 3, H, W] (images[None])")
            if images.dim() != 4:
                raise ValueError(f"{who}: images must be [B, 3, H, W], got shape {tuple(images.shape)}")
            items = list(images.unbind(0))
        elif isinstance(images, Image.Image):
            raise TypeError(f"{who}: images must be a sequence (a list of PIL images or a [B, 3, H, W] tensor), not a single image: wrap it")
        else:
            try:
                items = list(images)
            except TypeError:
                raise TypeError(f"{who}: images must be a [B, 3, H, W] tensor or a sequence of PIL images, got {type(images).__name__}") from None
        if not items:
            raise ValueError(f"{who}: images is empty")
        H, W = self.image_size
        out = []
        for i, im in enumerate(items):
            if isinstance(im, torch.Tensor):
                if im.dim() != 3 or im.shape[0] != 3 or not im.dtype.is_floating_point:
                    raise ValueError(f"{who}: image {i} must be a float tensor [3, H, W] in [-1, 1], got {tuple(im.shape)} {im.dtype}")
                x = im.detach().to("cpu", torch.float32)
                if not torch.isfinite(x).all():
                    raise ValueError(f"{who}: image {i} holds NaN or inf")
                lo, hi = float(x.min()), float(x.max())
                if lo < -1.001 or hi > 1.001:
                    raise ValueError(f"{who}: image {i} has values in [{lo:.3g}, {hi:.3g}]; image tensors must be in [-1, 1] "
                                     "(ospfn's convention: x / 127.5 - 1 for uint8 pixels)")  # fmt: skip
                arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
                im = Image.fromarray(arr)  # [H, W, 3] uint8: RGB
            elif isinstance(im, Image.Image):
                im = im.convert("RGB")
            else:
                raise TypeError(f"{who}: image {i} must be a PIL image or a [3, H, W] tensor, got {type(im).__name__}")
            if im.size != (W, H):
                im = im.resize((W, H), Image.Resampling.BICUBIC)
            out.append(im)
        return out

    def truncate_caption(self, prompt: str) -> str:
        """``prompt`` cut to ``max_caption_tokens`` tokens (re-decoded without special tokens), or unchanged when it
        is no longer than that."""
        if not isinstance(prompt, str):
            raise TypeError(f"QwenVLEncoder.truncate_caption: prompt must be a str, got {type(prompt).__name__}")
        tok = self.processor.tokenizer
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_caption_tokens:
            return prompt
        return tok.decode(ids[: self.max_caption_tokens], skip_special_tokens=True)

    def chat_text(self, prompt: str) -> str:
        """The templated chat turn for one caption (after ``truncate_caption``): image first, then the text, with the
        generation prompt; the image appears as the template's placeholder, which the processor expands."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.truncate_caption(prompt)}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def build_inputs(self, images, prompts) -> dict[str, torch.Tensor]:
        """The processor's tensors for the batch (on the CPU): ``input_ids`` / ``attention_mask`` (and, with recent
        transformers, ``mm_token_type_ids``) [B, max_length], ``pixel_values`` [sum of patches, .] and
        ``image_grid_thw`` [B, 3].  Each sample is processed on its own (one chat turn, as in the release) and
        checked against ``max_length``."""
        who = "QwenVLEncoder.build_inputs"
        prompts = _check_prompts(prompts, who)
        images = self.prepare_images(images)
        if len(images) != len(prompts):
            raise ValueError(f"{who}: {len(images)} image(s) for {len(prompts)} prompt(s); pass one image per prompt "
                             "(for CFG repeat the image: encode([img, img], [prompt, negative]))")  # fmt: skip
        per_sample = []
        for i, (im, prompt) in enumerate(zip(images, prompts)):
            enc = self.processor(text=[self.chat_text(prompt)], images=[im], padding="max_length", max_length=self.max_length,
                                 truncation=False, padding_side="right", return_tensors="pt")  # fmt: skip
            n = int(enc["input_ids"].shape[1])
            if n > self.max_length:
                n_img = int((enc["input_ids"] == getattr(self.processor, "image_token_id", -1)).sum())
                raise ValueError(f"{who}: sample {i}: the chat turn is {n} tokens ({n_img} of them image tokens), more than "
                                 f"max_length={self.max_length}; lower max_caption_tokens (now {self.max_caption_tokens}) or "
                                 f"image_size (now {self.image_size}), or raise max_length")  # fmt: skip
            per_sample.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})
        keys = per_sample[0].keys()
        return {k: torch.cat([s[k] for s in per_sample], dim=0) for k in keys}

    # -- encoding -----------------------------------------------------------------------------------------

    def encode(self, images, prompts) -> torch.Tensor:
        """Features [B, max_length, vlm_dim] of (image, prompt) pairs; see the class docstring."""
        inputs = self.build_inputs(images, prompts)
        device = self.device
        ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
        with torch.no_grad():
            if self.text_only:
                out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
            else:
                extra = {k: v.to(device) for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
                out = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
        return out.last_hidden_state

    # -- constructor --------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, text_only: bool = False, device=None, dtype=None, processor=None,
                        image_size=DEFAULT_IMAGE_SIZE, max_caption_tokens: int = DEFAULT_MAX_CAPTION_TOKENS,
                        max_length: int = DEFAULT_MAX_LENGTH) -> "QwenVLEncoder":  # fmt: skip
        """From a LOCAL Qwen2.5-VL directory (e.g. Qwen2.5-VL-7B-Instruct: ``config.json`` with ``model_type``
        ``qwen2_5_vl``, the weights, the tokenizer and processor files); nothing is downloaded.  The weights load as
        ``Qwen2_5_VLForConditionalGeneration`` (the layout of the released checkpoints) and only its base model is
        kept (no LM head); ``text_only`` keeps only the language tower.  ``dtype`` None leaves the choice to
        transformers (the stored dtype in transformers 5);
        ``processor`` overrides the processor read from ``path`` (``AutoProcessor``, which needs torchvision for
        Qwen2.5-VL's video processor in recent transformers)."""
        who = "QwenVLEncoder.from_pretrained"
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{who}: {path} is not a directory; expected a local Qwen2.5-VL model directory "
                                    "(e.g. Qwen2.5-VL-7B-Instruct) holding config.json, the weights and the processor files")  # fmt: skip
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{who}: {path} has no config.json: it is not a Qwen2.5-VL model directory")
        try:
            model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{who}: {cfg_file} is not a readable JSON config ({type(e).__name__}: {e})") from e
        if model_type != "qwen2_5_vl":
            raise ValueError(f"{who}: {path} is not a Qwen2.5-VL directory: config.json has model_type {model_type!r}, "
                             "expected 'qwen2_5_vl'")  # fmt: skip
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"{who}: dtype must be None, a torch dtype or one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if dtype is not None and dtype not in _DTYPES.values():
            raise ValueError(f"{who}: dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
        tr = _transformers(who)
        if processor is None:
            try:
                processor = tr.AutoProcessor.from_pretrained(str(path), local_files_only=True)
            except Exception as e:  # noqa: BLE001  (missing files, an optional dependency of the processor, ...)
                raise ValueError(f"{who}: cannot load the processor from {path} ({type(e).__name__}: {e}); Qwen2.5-VL's "
                                 "processor needs its tokenizer / preprocessor files there, and recent transformers need "
                                 "torchvision for it; or pass processor=") from e  # fmt: skip
        kwargs = {"dtype": dtype} if dtype is not None else {}
        try:
            full = tr.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), local_files_only=True, **kwargs)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{who}: cannot read Qwen2.5-VL weights from {path}: {e}") from e
        model = full.model.language_model if text_only else full.model  # no LM head; text_only: no vision tower either
        del full
        if device is not None:
            model.to(device)
        return cls(model, processor, text_only=text_only, image_size=image_size, max_caption_tokens=max_caption_tokens,
                   max_length=max_length)


# ----------------------------------------------------------------------------------------------------------
# feature cache

_KEY_OK = re.compile(r"^[0-9a-f]{64}$")


class VLMFeatureCache:
    """VLM features on disk, one safetensors file per (image, prompt, encoder), for training with a frozen VLM.

    The key is a SHA-256 over ``encoder_key`` (your name for the weights, e.g. ``"qwen2.5-vl-7b-instruct"``), the
    encoder's ``settings`` (mode, image size, caption and sequence limits, width, dtype), the prompt and the bytes
    of the image the encoder sees (after ``prepare_images``: resized RGB).  ``get_or_encode`` reads the hits and
    encodes the misses in one batch, writing each (atomically) as ``<key>.safetensors`` holding ``features``
    [max_length, vlm_dim].  ``hits`` / ``misses`` count samples over the cache's life."""

    def __init__(self, directory, encoder_key: str) -> None:
        if not isinstance(encoder_key, str) or not encoder_key:
            raise ValueError(f"VLMFeatureCache: encoder_key must be a non-empty str naming the VLM weights, got {encoder_key!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.encoder_key = encoder_key
        self.hits = 0
        self.misses = 0

    def key(self, encoder: QwenVLEncoder, image, prompt: str) -> str:
        """The cache key of one (prepared PIL image, prompt) pair for ``encoder``."""
        head = json.dumps({"encoder_key": self.encoder_key, "settings": encoder.settings, "prompt": prompt,
                           "image": [image.mode, list(image.size)]}, sort_keys=True)  # fmt: skip
        h = hashlib.sha256(head.encode("utf-8"))
        h.update(image.tobytes())
        return h.hexdigest()

    def path(self, key: str) -> Path:
        if not _KEY_OK.match(key):
            raise ValueError(f"VLMFeatureCache.path: not a cache key: {key!r}")
        return self.directory / f"{key}.safetensors"

    def get_or_encode(self, encoder: QwenVLEncoder, images, prompts) -> torch.Tensor:
        """Features [B, max_length, vlm_dim] on the encoder's device: read from the cache where present, encoded
        (and stored) otherwise.  A cached file of the wrong shape or an unreadable one is encoded again."""
        from safetensors.torch import load_file, save_file

        from ospfn._fs import atomic_path

        who = "VLMFeatureCache.get_or_encode"
        prompts = _check_prompts(prompts, who)
        prepared = encoder.prepare_images(images)
        if len(prepared) != len(prompts):
            raise ValueError(f"{who}: {len(prepared)} image(s) for {len(prompts)} prompt(s)")
        want = (encoder.max_length, encoder.vlm_dim)
        keys = [self.key(encoder, im, p) for im, p in zip(prepared, prompts)]
        results: list[Optional[torch.Tensor]] = [None] * len(keys)
        for i, k in enumerate(keys):
            p = self.path(k)
            if p.is_file():
                try:
                    t = load_file(str(p))["features"]
                except Exception:  # noqa: BLE001  (a truncated or foreign file: encode again and overwrite)
                    continue
                if tuple(t.shape) == want:
                    results[i] = t
        todo = [i for i, r in enumerate(results) if r is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            feats = encoder.encode([prepared[i] for i in todo], [prompts[i] for i in todo])
            for j, i in enumerate(todo):
                t = feats[j].detach().to("cpu").contiguous()
                with atomic_path(self.path(keys[i]), suffix=".safetensors") as tmp:
                    save_file({"features": t}, tmp, metadata={"encoder_key": self.encoder_key, "prompt": prompts[i],
                                                              "settings": json.dumps(encoder.settings, sort_keys=True)})  # fmt: skip
                results[i] = feats[j]
        device = encoder.device
        return torch.stack([r.to(device) for r in results])

