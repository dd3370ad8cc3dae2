"""LoRA files: save and load the diffusers and PEFT layouts, load original-Wan and musubi-tuner files
(docs/lora_files.md).

Inside ospfn an adapter is a ``LoraAdapter`` (Wan2.1 original module names, one rank and one ``scale = alpha /
rank``).  The files people exchange differ in three ways, all handled here:

* the module names: diffusers' (``blocks.0.attn1.to_q``), Wan's (``blocks.0.self_attn.q``) or musubi-tuner's
  flattened ones (``lora_unet_blocks_0_self_attn_q``), behind a prefix (``transformer.``, ``base_model.model.``,
  ``diffusion_model.``);
* the names of the two factors (``lora_A`` / ``lora_B`` or ``lora_down`` / ``lora_up``) and of the bias delta
  (diffusers / PEFT ``lora_B.bias``, multiplied by the scale like the rest of the branch; Wan ``diff_b``, added
  as it is);
* where the scale comes from: a PEFT ``LoraConfig`` (``r``, ``lora_alpha``, ``rank_pattern``,
  ``alpha_pattern``, ``use_rslora``) in ``adapter_config.json`` or in the safetensors metadata key
  ``lora_adapter_metadata``; a per-module ``.alpha`` tensor (Wan, musubi); or nothing (scale 1).

On load, a module whose own scale differs from the adapter's gets the ratio folded into its ``lora_B`` and a
module of a lower rank is padded with zero rows / columns, so the loaded adapter computes exactly the deltas the
file describes.  ``save_lora`` writes every file atomically (temporary file + rename), after checking everything.

    >>> import tempfile
    >>> from ospfn.model import DiTConfig
    >>> from ospfn.lora import LoraConfig, init_lora
    >>> adapter = init_lora(DiTConfig.preset("tiny"), LoraConfig(rank=4, alpha=8.0), seed=0)
    >>> d = tempfile.mkdtemp()
    >>> save_lora(d, adapter).name
    'pytorch_lora_weights.safetensors'
    >>> detect_lora_format(d)
    'diffusers'
    >>> back = load_lora(d, DiTConfig.preset("tiny"))
    >>> back.config == adapter.config, all(torch.equal(back.weights[k], v) for k, v in adapter.weights.items())
    (True, True)
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from ospfn.lora.adapter import LORA_MODULES, LoraAdapter, LoraConfig

__all__ = [
    "save_lora", "load_lora", "detect_lora_format", "read_lora_metadata", "LoraFileError", "LORA_FILE_FORMATS",
    "DIFFUSERS_NAMES", "MUSUBI_NAMES", "DIFFUSERS_WEIGHT_NAME", "PEFT_CONFIG_NAME", "PEFT_WEIGHT_NAME",
]  # fmt: skip

LORA_FILE_FORMATS = ("diffusers", "peft", "wan", "musubi")  # load_lora / detect_lora_format
SAVE_FORMATS = ("diffusers", "peft")
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
_PEFT_WEIGHT_BIN = "adapter_model.bin"
METADATA_KEY = "lora_adapter_metadata"  # diffusers: the PEFT LoraConfig as JSON in the safetensors metadata
OSPFN_KEY = "ospfn_lora_config"  # ours: the exact LoraConfig (rank, alpha, targets, init), ignored by others
_RESERVED = ("format", METADATA_KEY, OSPFN_KEY)

# module names inside a block: Wan original (ospfn) -> diffusers' WanTransformer3DModel
DIFFUSERS_NAMES = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v", "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}  # fmt: skip
# musubi-tuner (kohya) flattens the module path with underscores: blocks_0_self_attn_q, blocks_0_ffn_0
MUSUBI_NAMES = {name: name.replace(".", "_") for name in LORA_MODULES}
_IN_BLOCK = {**{v: k for k, v in DIFFUSERS_NAMES.items()}, **{k: k for k in LORA_MODULES}}  # either naming -> Wan
_FROM_MUSUBI = {v: k for k, v in MUSUBI_NAMES.items()}
_BLOCK_RX = re.compile(r"^blocks\.(\d+)\.(.+)$")
_MUSUBI_RX = re.compile(r"^blocks_(\d+)_(.+)$")

# the ending of a key -> what it holds: A [r, in], B [out, r], alpha (a scalar), bias (added as is) or
# bias_scaled (multiplied by the module's scale, like PEFT's lora_B bias)
_ENDINGS = {
    "diffusers": {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias_scaled"},
    "peft": {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias_scaled"},
    "wan": {".lora_A.weight": "A", ".lora_down.weight": "A", ".lora_B.weight": "B", ".lora_up.weight": "B", ".alpha": "alpha",
            ".diff_b": "bias"},  # fmt: skip
    "musubi": {".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha"},
}
_PREFIX = {"diffusers": "transformer.", "peft": "base_model.model.", "wan": "diffusion_model.", "musubi": "lora_unet_"}
_LORA_MARKS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", "lora_unet_", ".diff_b")
# full-weight deltas (Wan files carry them for norms): nothing a low-rank adapter can hold
_FULL_DELTAS = (".diff", ".diff_b")
_WAN_MARKS = ("self_attn.", "cross_attn.", ".ffn.0.", ".ffn.2.")


class LoraFileError(ValueError):
    """A LoRA file cannot be read or written: not a LoRA, of an unknown layout, with keys ospfn cannot hold, with
    inconsistent shapes or config, or not fitting the model (the message names the file and what is wrong)."""


# ----------------------------------------------------------------------------------------------------------
# reading files


def _ckpt():
    from ospfn.model import checkpoint  # lazily: ospfn.model imports ospfn.lora when a forward takes lora=

    return checkpoint


def _read_weights(file: Path) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of one weights file; LoraFileError naming it for anything unreadable."""
    ck = _ckpt()
    try:
        if file.suffix == ".safetensors":
            with open(file, "rb") as f:
                header, _ = ck._safetensors_header(f, file)
            meta = header.get("__metadata__") or {}
            if not isinstance(meta, dict):
                raise LoraFileError(f"{file}: safetensors __metadata__ must be an object of strings, got {type(meta).__name__}")
            return ck.read_safetensors(file), meta
        if file.suffix in (".bin", ".pt", ".pth"):
            return ck._unwrap_state_dict(ck.torch_load(file, mmap=False), file), {}
    except ck.CheckpointError as e:
        raise LoraFileError(str(e)) from None
    raise LoraFileError(f"{file}: unknown LoRA file type {file.suffix!r}; expected .safetensors (or a PEFT .bin) or a directory")


def _resolve(path) -> tuple[Path, Optional[Path]]:
    """(weights file, adapter_config.json or None) for a directory, a weights file or an adapter_config.json."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"load_lora: path must be a str or Path (a directory or a .safetensors file), got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"load_lora: no such file or directory: {p}")
    if p.is_file() and p.name == PEFT_CONFIG_NAME:
        p = p.parent
    if p.is_file():
        cfg = p.parent / PEFT_CONFIG_NAME
        return p, (cfg if cfg.is_file() and p.name in (PEFT_WEIGHT_NAME, _PEFT_WEIGHT_BIN) else None)
    cfg = p / PEFT_CONFIG_NAME
    if cfg.is_file():
        for name in (PEFT_WEIGHT_NAME, _PEFT_WEIGHT_BIN):
            if (p / name).is_file():
                return p / name, cfg
        raise LoraFileError(f"load_lora: {p} has {PEFT_CONFIG_NAME} but neither {PEFT_WEIGHT_NAME} nor {_PEFT_WEIGHT_BIN}")
    if (p / DIFFUSERS_WEIGHT_NAME).is_file():
        return p / DIFFUSERS_WEIGHT_NAME, None
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
        return files[0], None
    listing = sorted(q.name for q in p.iterdir())[:20]
    raise LoraFileError(f"load_lora: {p} is not a LoRA directory: expected {DIFFUSERS_WEIGHT_NAME}, {PEFT_CONFIG_NAME} + "
                        f"{PEFT_WEIGHT_NAME}, or exactly one .safetensors file; it holds {listing}")  # fmt: skip


def _read_json(file: Path) -> dict:
    try:
        obj = json.loads(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(f"{file}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise LoraFileError(f"{file}: must hold a JSON object (a PEFT LoraConfig), got {type(obj).__name__}")
    return obj


def read_lora_metadata(path) -> dict[str, str]:
    """The safetensors metadata of a LoRA file (a directory or a file): what ``save_lora(metadata=)`` stored,
    next to ``format``, ``lora_adapter_metadata`` and ``ospfn_lora_config``; ``{}`` for a torch ``.bin``."""
    file, _ = _resolve(path)
    if file.suffix != ".safetensors":
        return {}
    ck = _ckpt()
    try:
        with open(file, "rb") as f:
            header, _ = ck._safetensors_header(f, file)
    except ck.CheckpointError as e:
        raise LoraFileError(str(e)) from None
    meta = header.get("__metadata__") or {}
    return dict(meta) if isinstance(meta, dict) else {}


# ----------------------------------------------------------------------------------------------------------
# formats


def _keys_format(keys: list[str], where: str) -> str:
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith("lora_unet_") for k in keys):
        return "musubi"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "wan"
    loraish = [k for k in keys if any(m in k for m in _LORA_MARKS) or k.endswith(".alpha")]
    if not loraish:
        sample = sorted(keys)[:8]
        raise LoraFileError(f"{where}: not a LoRA file: none of its {len(keys)} key(s) is a LoRA key (such as "
                            f"'transformer.blocks.0.attn1.to_q.lora_A.weight', 'diffusion_model.blocks.0.self_attn.q.lora_down.weight' "
                            f"or 'lora_unet_blocks_0_self_attn_q.lora_up.weight'); its keys begin {sample}")  # fmt: skip
    if any(k.startswith("transformer.") for k in loraish):
        return "diffusers"
    if any(m in k for k in loraish for m in (".lora_down.", ".lora_up.", ".diff_b")) or any(k.endswith(".alpha") for k in loraish):
        return "wan"
    if any(m in k for k in loraish for m in _WAN_MARKS):
        return "wan"  # Wan module names, lora_A / lora_B, no prefix
    return "diffusers"


def detect_lora_format(path_or_state_dict) -> str:
    """The layout of a LoRA file, directory or state dict: ``"diffusers"``, ``"peft"``, ``"wan"`` or ``"musubi"``.

    A directory with ``adapter_config.json`` is PEFT; otherwise the keys decide: ``base_model.model.`` (PEFT),
    ``lora_unet_`` (musubi-tuner), ``diffusion_model.`` or Wan module names with ``lora_down`` / ``lora_up`` /
    ``.alpha`` / ``.diff_b`` (original Wan), ``transformer.`` or diffusers module names (diffusers).  Anything
    without a LoRA key raises ``LoraFileError`` ("not a LoRA file").

    >>> detect_lora_format({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(1)})
    'musubi'
    """
    if isinstance(path_or_state_dict, dict):
        bad = [k for k in path_or_state_dict if not isinstance(k, str)]
        if bad:
            raise TypeError(f"detect_lora_format: state dict keys must be str, got {bad[:5]}")
        return _keys_format(list(path_or_state_dict), "detect_lora_format")
    if not isinstance(path_or_state_dict, (str, Path)):
        raise TypeError(f"detect_lora_format: expected a path (str / Path) or a state dict, got {type(path_or_state_dict).__name__}")
    file, cfg = _resolve(path_or_state_dict)
    if cfg is not None:
        return "peft"
    if file.suffix == ".safetensors":
        ck = _ckpt()
        try:
            with open(file, "rb") as f:
                header, _ = ck._safetensors_header(f, file)
        except ck.CheckpointError as e:
            raise LoraFileError(str(e)) from None
        return _keys_format([k for k in header if k != "__metadata__"], str(file))
    return _keys_format(list(_read_weights(file)[0]), str(file))


def _module_of(stem: str, fmt: str) -> Optional[tuple[int, str]]:
    """(block, Wan name) of a module path without its prefix, or None for a module ospfn has no LoRA for."""
    m = (_MUSUBI_RX if fmt == "musubi" else _BLOCK_RX).match(stem)
    if m is None:
        return None
    name = (_FROM_MUSUBI if fmt == "musubi" else _IN_BLOCK).get(m.group(2))
    return None if name is None else (int(m.group(1)), name)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern that matches the end of the module path."""
    for pat, v in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return v
    return default


def _peft_config_fields(cfg: Optional[dict], where: str) -> Optional[dict]:
    if cfg is None:
        return None
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise LoraFileError(f"{where}: peft_type is {peft_type!r}; only LoRA adapters (peft_type 'LORA') can be loaded")
    if cfg.get("use_dora"):
        raise LoraFileError(f"{where}: use_dora is true: DoRA adapters are not supported (plain LoRA only)")
    out = {}
    for k, default in (("r", 8), ("lora_alpha", 8)):
        v = cfg.get(k, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise LoraFileError(f"{where}: {k} must be a positive number, got {v!r}")
        out[k] = v
    for k in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(k) or {}
        if not isinstance(v, dict):
            raise LoraFileError(f"{where}: {k} must be an object {{module pattern: number}}, got {v!r:.80}")
        out[k] = v
    out["use_rslora"] = bool(cfg.get("use_rslora", False))
    out["init_lora_weights"] = cfg.get("init_lora_weights", True)
    return out


def _diffusers_config(meta: dict, where: str) -> Optional[dict]:
    raw = meta.get(METADATA_KEY)
    if not raw:
        return None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraFileError(f"{where}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise LoraFileError(f"{where}: metadata {METADATA_KEY!r} must be a JSON object, got {type(obj).__name__}")
    if any(k.startswith("transformer.") for k in obj):  # a pipeline's file: keys prefixed by component
        return {k[len("transformer.") :]: v for k, v in obj.items() if k.startswith("transformer.")}
    return obj if ("r" in obj or "lora_alpha" in obj) else None


def _ospfn_config(meta: dict) -> Optional[LoraConfig]:
    raw = meta.get(OSPFN_KEY)
    if not raw:
        return None
    try:
        d = json.loads(raw)
        return LoraConfig(rank=d["rank"], alpha=d["alpha"], targets=tuple(d["targets"]), init=d["init"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # not ours after all, or edited: the config is derived from the tensors instead


# ----------------------------------------------------------------------------------------------------------
# loading


def load_lora(path, model_cfg=None, *, format: Optional[str] = None, strict: bool = True, device="cpu",
              dtype: Optional[torch.dtype] = None) -> LoraAdapter:  # fmt: skip
    """Read a LoRA file into a ``LoraAdapter`` (Wan names, uniform ``scale = alpha / rank``).

    ``path``: a directory (``pytorch_lora_weights.safetensors``; ``adapter_config.json`` + ``adapter_model.safetensors``
    or ``.bin``; or a single ``.safetensors``) or a weights file.  ``format``: None (detected, see
    ``detect_lora_format``) or one of ``"diffusers"``, ``"peft"``, ``"wan"``, ``"musubi"``.  ``model_cfg`` (a
    ``DiTConfig``): check block indices and shapes against the model (and size bias-only modules).

    The adapter's rank is the largest rank in the file and its scale the most common per-module scale; other
    modules get ``lora_B`` multiplied by (their scale / the adapter's) and zero padding up to the rank (computed in
    float64, stored in the file's dtype, or ``dtype``), so every module's delta is the file's.  A Wan ``diff_b``
    becomes ``lora_bias`` as is; a PEFT / diffusers ``lora_B.bias`` is multiplied by its module's scale.

    Keys ospfn cannot hold (LoRA on Linears outside the blocks such as ``head`` or ``patch_embedding``, DoRA,
    Wan I2V ``k_img`` / ``v_img``, full-weight ``.diff`` deltas) raise ``LoraFileError`` listing them; with
    ``strict=False`` they are skipped with a warning.  ``.diff`` / ``.diff_b`` tensors of such modules that are
    all zero (Wan files carry zero norm deltas) change nothing and are always skipped.
    """
    if format is not None and format not in LORA_FILE_FORMATS:
        raise ValueError(f"load_lora: format must be None (detect) or one of {LORA_FILE_FORMATS}, got {format!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"load_lora: strict must be a bool, got {strict!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"load_lora: dtype must be None (keep the file's) or a floating torch.dtype, got {dtype!r}")
    if model_cfg is not None:
        from ospfn.model.config import DiTConfig

        if not isinstance(model_cfg, DiTConfig):
            raise TypeError(f"load_lora: model_cfg must be None or an ospfn.model.DiTConfig, got {type(model_cfg).__name__}")
    file, cfg_file = _resolve(path)
    sd, meta = _read_weights(file)
    where = str(file)
    if not sd:
        raise LoraFileError(f"{where}: not a LoRA file: it holds no tensors")
    fmt = format or ("peft" if cfg_file is not None else _keys_format(list(sd), where))
    peft_cfg = None
    if fmt == "peft":
        if cfg_file is None:
            raise LoraFileError(f"{where}: PEFT weights need their {PEFT_CONFIG_NAME} (r, lora_alpha) in the same directory")
        peft_cfg = _peft_config_fields(_read_json(cfg_file), str(cfg_file))
    elif fmt == "diffusers":
        peft_cfg = _peft_config_fields(_diffusers_config(meta, where), f"{where} (metadata {METADATA_KEY!r})")
    adapter = _build(sd, fmt, peft_cfg, _ospfn_config(meta), model_cfg, where, strict)
    if device is not None or dtype is not None:
        adapter = adapter.to(device=device, dtype=dtype)
    if model_cfg is not None:
        try:
            adapter.check(model_cfg)
        except ValueError as e:
            raise LoraFileError(f"load_lora: {where} does not fit model_cfg: {e}") from None
    return adapter


def _group(sd: dict, fmt: str, where: str) -> tuple[dict, list[str]]:
    """{(block, name): {kind: (key, tensor), "path": module path as written}} and the keys that fit no module."""
    prefix = _PREFIX[fmt]
    need_prefix = fmt in ("peft", "musubi") or any(k.startswith(prefix) for k in sd)
    mods: dict[tuple[int, str], dict] = {}
    unsupported = []
    for key, v in sd.items():
        body = key[len(prefix) :] if key.startswith(prefix) else (None if need_prefix else key)
        hit = None if body is None else next(((body[: -len(e)], kind) for e, kind in _ENDINGS[fmt].items() if body.endswith(e)), None)
        mod = None if hit is None else _module_of(hit[0], fmt)
        if mod is None:
            unsupported.append(key)
            continue
        rec = mods.setdefault(mod, {"path": hit[0]})
        kind = hit[1]
        if kind in rec:
            raise LoraFileError(f"{where}: keys {rec[kind][0]!r} and {key!r} both give blocks.{mod[0]}.{mod[1]} its "
                                f"{'lora_A' if kind == 'A' else 'lora_B' if kind == 'B' else kind}")  # fmt: skip
        if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
            raise LoraFileError(f"{where}: {key!r} must be a floating-point tensor, got {getattr(v, 'dtype', type(v).__name__)}")
        rec[kind] = (key, v)
    for mod in list(mods):  # an all-zero bias delta adds nothing (PEFT's lora_bias is all or nothing: zeros fill in)
        rec = mods[mod]
        for kind in ("bias", "bias_scaled"):
            if kind in rec and not bool(rec[kind][1].any()):
                del rec[kind]
        if len(rec) == 1:  # only its path is left
            del mods[mod]
    return mods, unsupported


def _drop_unsupported(sd: dict, unsupported: list[str], fmt: str, where: str, strict: bool) -> None:
    zero_deltas = [k for k in unsupported if k.endswith(_FULL_DELTAS) and not bool(sd[k].any())]
    rest = [k for k in unsupported if k not in set(zero_deltas)]
    if not rest:
        return
    allowed = ", ".join(LORA_MODULES)
    shown = rest[:20] if len(rest) <= 20 else rest[:20] + [f"... {len(rest) - 20} more"]
    msg = (f"{where}: {len(rest)} key(s) cannot be held by an ospfn LoRA adapter (read as the {fmt!r} layout; ospfn adapts "
           f"the block Linears {allowed} through lora A/B factors{', .alpha and .diff_b' if fmt == 'wan' else ''} only): {shown}")  # fmt: skip
    if strict:
        raise LoraFileError(msg + "; pass strict=False to skip them with a warning")
    warnings.warn(msg + "; skipped (strict=False)", stacklevel=4)


def _build(sd, fmt, peft_cfg, ours: Optional[LoraConfig], model_cfg, where: str, strict: bool) -> LoraAdapter:
    mods, unsupported = _group(sd, fmt, where)
    _drop_unsupported(sd, unsupported, fmt, where, strict)
    if not mods:
        raise LoraFileError(f"{where}: no LoRA module for the DiT blocks in this {fmt!r} file (its keys begin {sorted(sd)[:8]})")
    # per module: (A, B, bias delta, rank, scale, alpha as the file gives it)
    entries = {}
    for (i, name), rec in sorted(mods.items(), key=lambda kv: (kv[0][0], LORA_MODULES.index(kv[0][1]))):
        mod = f"blocks.{i}.{name}"
        a, b = rec.get("A"), rec.get("B")
        if (a is None) != (b is None):
            have, lack = ("A", "B") if b is None else ("B", "A")
            raise LoraFileError(f"{where}: {rec[have][0]!r} has no matching {'up / B' if lack == 'B' else 'down / A'} factor for {mod}")
        bias = rec.get("bias") or rec.get("bias_scaled")
        if a is None:
            if "alpha" in rec or bias is None:
                raise LoraFileError(f"{where}: {mod} has {[k for k, _ in (rec[x] for x in rec if x != 'path')]} but no lora A / B factors")
            entries[mod] = [None, None, bias, None, 1.0, None, rec]
            continue
        (ka, a), (kb, b) = a, b
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise LoraFileError(f"{where}: {mod}: {ka!r} {tuple(a.shape)} and {kb!r} {tuple(b.shape)} are not a LoRA pair "
                                "(expected down / A [r, in] and up / B [out, r] with the same r >= 1)")  # fmt: skip
        r = a.shape[0]
        if bias is not None and (bias[1].dim() != 1 or bias[1].shape[0] != b.shape[0]):
            raise LoraFileError(f"{where}: {bias[0]!r} has shape {tuple(bias[1].shape)}, expected [{b.shape[0]}] like {kb!r}'s rows")
        if peft_cfg is not None:
            r_cfg = _pattern_value(peft_cfg["rank_pattern"], rec["path"], peft_cfg["r"])
            if r_cfg != r:
                raise LoraFileError(f"{where}: {mod}: the LoraConfig says rank {r_cfg} for {rec['path']!r} but {ka!r} has rank {r}")
            alpha = _pattern_value(peft_cfg["alpha_pattern"], rec["path"], peft_cfg["lora_alpha"])
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
                raise LoraFileError(f"{where}: the LoraConfig's alpha for {rec['path']!r} must be a positive number, got {alpha!r}")
            scale = alpha / math.sqrt(r) if peft_cfg["use_rslora"] else alpha / r
            alpha_eq = alpha * math.sqrt(r) if peft_cfg["use_rslora"] else alpha  # the alpha with scale = alpha / r
        elif "alpha" in rec:
            kal, t = rec["alpha"]
            alpha = float(t.float().reshape(-1)[0]) if t.numel() == 1 else None
            if alpha is None or not math.isfinite(alpha) or alpha <= 0:
                raise LoraFileError(f"{where}: {kal!r} must be one positive number (the module's alpha), got shape {tuple(t.shape)}"
                                    f"{'' if t.numel() != 1 else f' value {float(t.float().reshape(-1)[0])}'}")  # fmt: skip
            scale, alpha_eq = alpha / r, alpha
        else:  # no alpha anywhere: delta = B @ A (diffusers' and the Wan loaders' convention)
            scale, alpha_eq = 1.0, float(r)
        if bias is not None and "bias_scaled" in rec and scale != 1.0:
            bias = (bias[0], (bias[1].double() * scale).to(bias[1].dtype))
        entries[mod] = [a, b, bias, r, scale, alpha_eq, rec]

    ranks = [e[3] for e in entries.values() if e[3] is not None]
    R = max(ranks) if ranks else 1
    names = sorted({m.split(".", 2)[2] for m in entries}, key=LORA_MODULES.index)
    if ours is not None and ours.rank == R and set(names) <= set(ours.targets):
        config = ours
    else:
        scales = Counter(e[4] for e in entries.values() if e[3] is not None)
        top = scales.most_common(1)[0][0] if scales else 1.0
        same = [e[5] for e in entries.values() if e[3] == R and e[4] == top]
        alpha = float(same[0]) if same else top * R
        init = "gaussian"
        if peft_cfg is not None and peft_cfg["init_lora_weights"] is True:
            init = "kaiming"
        config = LoraConfig(rank=R, alpha=alpha, targets=tuple(names), init=init)
    scale = config.scale
    dims = _dims(entries, model_cfg, where)
    weights = {}
    for mod, (a, b, bias, r, s, _, rec) in entries.items():
        if a is None:  # a bias delta only: zero factors
            name = mod.split(".", 2)[2]
            fin = dims["ffn_dim" if name == "ffn.2" else "dim"]
            a = torch.zeros(R, fin, dtype=bias[1].dtype)
            b = torch.zeros(bias[1].shape[0], R, dtype=bias[1].dtype)
        else:
            if s != scale:
                b = (b.double() * (s / scale)).to(b.dtype)
            if r < R:  # zero rows of A / columns of B add nothing
                a = torch.cat([a, a.new_zeros(R - r, a.shape[1])], 0)
                b = torch.cat([b, b.new_zeros(b.shape[0], R - r)], 1)
        weights[mod + ".lora_A"], weights[mod + ".lora_B"] = a, b
        if bias is not None:
            weights[mod + ".lora_bias"] = bias[1]
    return LoraAdapter(config, weights)


def _dims(entries: dict, model_cfg, where: str) -> dict:
    """dim / ffn_dim for modules with a bias delta only (from model_cfg, else from the file's other tensors)."""
    dims = {}
    if model_cfg is not None:
        dims = {"dim": model_cfg.dim, "ffn_dim": model_cfg.ffn_dim}
    for mod, (a, b, bias, *_rest) in entries.items():
        name = mod.split(".", 2)[2]
        fin, fout = (a.shape[1], b.shape[0]) if a is not None else (None, bias[1].shape[0])
        kin, kout = {"ffn.0": ("dim", "ffn_dim"), "ffn.2": ("ffn_dim", "dim")}.get(name, ("dim", "dim"))
        dims.setdefault(kout, fout)
        if fin is not None:
            dims.setdefault(kin, fin)
    need = [m for m, e in entries.items() if e[0] is None and ("ffn_dim" if m.endswith("ffn.2") else "dim") not in dims]
    if need:
        raise LoraFileError(f"{where}: {need[:5]} have a bias delta only and the file does not tell their input features: pass model_cfg")
    return dims


# ----------------------------------------------------------------------------------------------------------
# saving


def _peft_dict(adapter: LoraAdapter, names: dict, has_bias: bool) -> dict:
    """The PEFT LoraConfig (as ``LoraConfig.to_dict()`` would give it) that makes PEFT / diffusers compute the
    adapter's deltas."""
    cfg = adapter.config
    mods = adapter.modules()
    blocks = sorted({int(m.split(".")[1]) for m in mods})
    by_name = {n: {int(m.split(".")[1]) for m in mods if m.split(".", 2)[2] == n} for n in cfg.targets}
    present = [n for n in cfg.targets if by_name[n]]
    if all(by_name[n] == set(range(blocks[-1] + 1)) for n in present):
        targets = sorted(names[n] for n in present)  # every block 0..L-1: the in-block names suffice
    else:
        targets = sorted(f"blocks.{m.split('.')[1]}.{names[m.split('.', 2)[2]]}" for m in mods)
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None, "inference_mode": True,
        "r": cfg.rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": targets, "exclude_modules": None, "modules_to_save": None,
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" and not has_bias else True,  # PEFT: lora_bias needs True "use_rslora": False, "use_dora": False,
        "lora_bias": has_bias, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }  # fmt: skip


def save_lora(path, adapter: LoraAdapter, *, format: str = "diffusers", metadata: Optional[dict] = None,
              module_names: str = "diffusers") -> Path:  # fmt: skip
    """Write ``adapter`` for diffusers or PEFT; returns the weights file written.

    * ``format="diffusers"``: ``<path>/pytorch_lora_weights.safetensors`` (or ``path`` itself when it ends in
      ``.safetensors``), keys ``transformer.blocks.{i}.attn1.to_q.lora_A.weight`` ..., the PEFT LoraConfig under the
      safetensors metadata key ``lora_adapter_metadata`` (fields prefixed ``transformer.``, as a pipeline's
      ``save_lora_weights`` writes them): what ``WanPipeline.load_lora_weights`` and
      ``WanTransformer3DModel.load_lora_adapter`` read.
    * ``format="peft"``: ``<path>/adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight``) and
      ``<path>/adapter_config.json``: what ``peft.PeftModel.from_pretrained`` reads.  ``module_names="diffusers"``
      (default: for a diffusers ``WanTransformer3DModel``) or ``"wan"`` (``blocks.0.self_attn.q``: a model with
      Wan's original module names, as OSP-Next trains).

    ``lora_bias`` is written as PEFT's ``lora_B.bias`` divided by the scale (PEFT scales the whole branch), with
    zeros for modules without one when any has one.  ``metadata``: extra ``{str: str}`` for the safetensors
    metadata (``read_lora_metadata`` returns it).  Each file goes to a temporary name and is renamed into place;
    everything is checked before anything is written.
    """
    if not isinstance(adapter, LoraAdapter):
        raise TypeError(f"save_lora: adapter must be an ospfn.lora.LoraAdapter, got {type(adapter).__name__}")
    if format not in SAVE_FORMATS:
        raise ValueError(f"save_lora: format must be one of {SAVE_FORMATS}, got {format!r} (wan / musubi files are read only)")
    if module_names not in ("diffusers", "wan"):
        raise ValueError(f"save_lora: module_names must be 'diffusers' or 'wan', got {module_names!r}")
    if format == "diffusers" and module_names != "diffusers":
        raise ValueError("save_lora: module_names='wan' is for format='peft'; the diffusers layout always uses diffusers names")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"save_lora: path must be a str or Path (a directory), got {type(path).__name__}")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"save_lora: metadata must be a dict of str -> str, got {metadata!r:.120}")
    clash = sorted(set(metadata) & set(_RESERVED))
    if clash:
        raise ValueError(f"save_lora: metadata keys {clash} are reserved (written by save_lora: {_RESERVED})")
    path = Path(path)
    if format == "peft" and path.suffix == ".safetensors":
        raise ValueError(f"save_lora: format='peft' writes a directory (adapter_config.json + adapter_model.safetensors), got a file name {path}")
    file = path if path.suffix == ".safetensors" else path / (DIFFUSERS_WEIGHT_NAME if format == "diffusers" else PEFT_WEIGHT_NAME)
    if file.parent.exists() and not file.parent.is_dir():
        raise LoraFileError(f"save_lora: {file.parent} exists and is not a directory")
    if file.is_dir():
        raise LoraFileError(f"save_lora: {file} is a directory")

    names = DIFFUSERS_NAMES if module_names == "diffusers" else {n: n for n in LORA_MODULES}
    prefix = "transformer." if format == "diffusers" else "base_model.model."
    w = adapter.weights
    mods = adapter.modules()
    if not mods:
        raise ValueError("save_lora: adapter has no modules (its weights are empty): nothing to save")
    has_bias = any(m + ".lora_bias" in w for m in mods)
    scale = adapter.scale
    tensors = {}
    for m in mods:
        _, i, name = m.split(".", 2)
        stem = f"{prefix}blocks.{i}.{names[name]}"
        tensors[stem + ".lora_A.weight"] = w[m + ".lora_A"]
        b = w[m + ".lora_B"]
        tensors[stem + ".lora_B.weight"] = b
        if has_bias:
            bias = w.get(m + ".lora_bias")
            tensors[stem + ".lora_B.bias"] = b.new_zeros(b.shape[0]) if bias is None else (bias.double() / scale).to(bias.dtype)
    peft = _peft_dict(adapter, names, has_bias)
    ours = {"rank": adapter.config.rank, "alpha": adapter.config.alpha, "targets": list(adapter.config.targets), "init": adapter.config.init}
    meta = {"format": "pt", OSPFN_KEY: json.dumps(ours), **metadata}
    if format == "diffusers":
        meta[METADATA_KEY] = json.dumps({f"transformer.{k}": v for k, v in peft.items()}, indent=2, sort_keys=True)
    ck = _ckpt()
    file.parent.mkdir(parents=True, exist_ok=True)
    ck._atomic_save_safetensors(tensors, file, meta)
    if format == "peft":
        from ospfn._fs import write_text_atomic

        write_text_atomic(file.parent / PEFT_CONFIG_NAME, json.dumps(peft, indent=2, sort_keys=True) + "\n")
    return file

