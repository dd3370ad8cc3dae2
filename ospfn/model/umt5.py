"""The UMT5-XXL text encoder of Wan2.1 behind the ``TextEncoder`` interface (transformers ``UMT5EncoderModel``).

``UMT5TextEncoder.encode(prompts)`` follows the Wan convention (the same as diffusers' ``WanPipeline``): each
prompt is cleaned (HTML entities unescaped, ``ftfy`` fixes when that package is installed, runs of whitespace
collapsed), tokenised to ``text_len`` tokens (512 by default; padded, truncated, end-of-sequence token added),
run through the encoder with the padding masked, and its last hidden state is kept up to the prompt's true
token count and zeroed beyond it.  No attention mask leaves the encoder: the DiT sees the zero rows.

Two layouts are read:

* ``from_pretrained(path)``: a diffusers pipeline directory (``text_encoder/`` + ``tokenizer/``) or a
  transformers ``text_encoder`` directory plus a tokenizer directory;
* ``from_wan(pth, tokenizer)``: Wan's original ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's own module names,
  renamed to the transformers names by ``wan_t5_to_hf``; the ``UMT5Config`` is inferred from the tensor shapes)
  plus the ``google/umt5-xxl`` tokenizer folder.

transformers is an optional dependency, imported only when an encoder is built.  The key conversion itself
needs only torch:

    >>> import torch
    >>> sd = {"token_embedding.weight": torch.zeros(100, 8), "norm.weight": torch.zeros(8)}
    >>> for name, shape in [("norm1", (8,)), ("attn.q", (8, 8)), ("attn.k", (8, 8)), ("attn.v", (8, 8)),
    ...                     ("attn.o", (8, 8)), ("pos_embedding.embedding", (32, 2)), ("norm2", (8,)),
    ...                     ("ffn.gate.0", (16, 8)), ("ffn.fc1", (16, 8)), ("ffn.fc2", (8, 16))]:
    ...     sd[f"blocks.0.{name}.weight"] = torch.zeros(shape)
    >>> hf, cfg = wan_t5_to_hf(sd)
    >>> [cfg[k] for k in ("vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff")]
    [100, 8, 1, 2, 4, 16]
    >>> hf["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape
    torch.Size([16, 8])
"""

from __future__ import annotations

import gc
import html
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from ospfn.model.checkpoint import CheckpointError

__all__ = ["UMT5TextEncoder", "clean_prompt", "wan_t5_to_hf", "read_torch_state_dict"]

DEFAULT_TEXT_LEN = 512
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _require(module: str, pip_name: str, what: str):
    """Import an optional dependency, or raise ImportError naming the pip package."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the optional package {pip_name!r}: pip install {pip_name}") from e


# ----------------------------------------------------------------------------------------------------------
# prompt cleaning (the Wan / diffusers convention)


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ``ftfy.fix_text`` when ftfy is installed, HTML entities unescaped twice, runs of
    whitespace collapsed to one space, ends stripped.

    >>> clean_prompt("  a  cat &amp;amp;\\n a dog ")
    'a cat & a dog'
    """
    if not isinstance(text, str):
        raise TypeError(f"clean_prompt: text must be a str, got {type(text).__name__}")
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _check_prompts(prompts, who: str) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"{who}: prompts must be a sequence of str (a list), not a single str; wrap it: [{prompts!r}]")
    try:
        prompts = list(prompts)
    except TypeError:
        raise TypeError(f"{who}: prompts must be a sequence of str, got {type(prompts).__name__}") from None
    if not prompts:
        raise ValueError(f"{who}: prompts is empty; pass at least one str (the empty prompt is '')")
    bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{who}: every prompt must be a str; not str at (index, type): {bad[:8]}")
    return prompts


def _check_dtype(dtype, who: str) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(dtype, dtype)
    if dtype not in _DTYPES:
        raise ValueError(f"{who}: dtype must be None, torch.float32 or torch.bfloat16 (or 'fp32' / 'bf16'), got {dtype!r}")
    return dtype


def _check_text_len(text_len, who: str) -> int:
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1:
        raise ValueError(f"{who}: text_len must be a positive int, got {text_len!r}")
    return text_len


def read_torch_state_dict(path, who: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` / ``.pt`` file, read with ``torch.load(weights_only=True)`` (pickled code is
    never run) and memory-mapped when the file is in torch's zip format, or from a ``.safetensors`` file;
    ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers are opened."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{who}: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001  (header or data not safetensors)
            raise CheckpointError(f"{who}: {path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001  (a legacy, non-zip file cannot be memory-mapped: read it plainly)
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001  (unpickling refused, truncated or foreign file, ...)
                raise CheckpointError(f"{who}: {path} is not a readable torch state dict ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and len(sd) == 1 and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{who}: {path} must hold a non-empty dict of name -> tensor, got {type(sd).__name__}")
    return sd


# ----------------------------------------------------------------------------------------------------------
# Wan original T5 names -> transformers UMT5 names

# per-block Wan name -> transformers name, with {n} the block index
_BLOCK_RENAME = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU-gated branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def _natural(key: str) -> list:
    """Sort key with block numbers compared as numbers (blocks.2 before blocks.10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def wan_t5_to_hf(sd: dict, *, max_distance: int = 128, source: str = "state dict") -> tuple[dict, dict]:
    """Rename a Wan original UMT5 encoder state dict to transformers ``UMT5EncoderModel`` names and infer the
    ``UMT5Config`` fields from the shapes.  Returns ``(hf_state_dict, config_kwargs)``; the token embedding is
    given under both ``shared.weight`` and ``encoder.embed_tokens.weight`` (the same tensor).  Unknown keys,
    missing keys and inconsistent shapes raise ``CheckpointError`` listing them."""
    who = f"wan_t5_to_hf({source})"
    out: dict[str, torch.Tensor] = {}
    unknown, blocks = [], set()
    for key, value in sd.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif (m := _BLOCK_KEY.fullmatch(key)) and m.group(2) in _BLOCK_RENAME:
            n = int(m.group(1))
            blocks.add(n)
            out[f"encoder.block.{n}.{_BLOCK_RENAME[m.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{who}: {len(unknown)} key(s) are not Wan UMT5 encoder names: {sorted(unknown)[:20]}"
            f"{' ...' if len(unknown) > 20 else ''} (expected token_embedding.weight, norm.weight and "
            f"blocks.N.{{{', '.join(_BLOCK_RENAME)}}})"
        )
    num_layers = max(blocks) + 1 if blocks else 0
    expected = {"token_embedding.weight", "norm.weight"} | {f"blocks.{n}.{k}" for n in range(max(num_layers, 1)) for k in _BLOCK_RENAME}
    missing = sorted(expected - set(sd), key=_natural)
    if missing:
        raise CheckpointError(f"{who}: {len(missing)} Wan UMT5 key(s) are missing: {missing[:20]}{' ...' if len(missing) > 20 else ''}")

    for wan_name, hf_name in [("token_embedding.weight", "shared.weight"), ("blocks.0.attn.q.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"),
                              ("blocks.0.pos_embedding.embedding.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
                              ("blocks.0.ffn.fc1.weight", "encoder.block.0.layer.1.DenseReluDense.wi_1.weight")]:
        if out[hf_name].dim() != 2:
            raise CheckpointError(f"{who}: {wan_name} must be a matrix, got shape {tuple(out[hf_name].shape)}")
    vocab, d_model = out["shared.weight"].shape
    buckets, heads = out["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner = out["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    d_ff = out["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"].shape[0]
    if inner % heads:
        raise CheckpointError(f"{who}: attention width {inner} (blocks.0.attn.q) is not a multiple of the {heads} heads of the position bias table")
    want = {
        "layer.0.layer_norm.weight": (d_model,),
        "layer.0.SelfAttention.q.weight": (inner, d_model),
        "layer.0.SelfAttention.k.weight": (inner, d_model),
        "layer.0.SelfAttention.v.weight": (inner, d_model),
        "layer.0.SelfAttention.o.weight": (d_model, inner),
        "layer.0.SelfAttention.relative_attention_bias.weight": (buckets, heads),
        "layer.1.layer_norm.weight": (d_model,),
        "layer.1.DenseReluDense.wi_0.weight": (d_ff, d_model),
        "layer.1.DenseReluDense.wi_1.weight": (d_ff, d_model),
        "layer.1.DenseReluDense.wo.weight": (d_model, d_ff),
    }
    inv_block = {v: k for k, v in _BLOCK_RENAME.items()}
    bad = [f"blocks.{n}.{inv_block[name]} {tuple(out[f'encoder.block.{n}.{name}'].shape)} != {shape}"
           for n in range(num_layers) for name, shape in want.items() if tuple(out[f"encoder.block.{n}.{name}"].shape) != shape]
    if tuple(out["encoder.final_layer_norm.weight"].shape) != (d_model,):
        bad.append(f"norm.weight {tuple(out['encoder.final_layer_norm.weight'].shape)} != {(d_model,)}")
    if bad:
        raise CheckpointError(f"{who}: {len(bad)} tensor(s) have shapes inconsistent with d_model={d_model}, heads={heads}, "
                              f"d_kv={inner // heads}, d_ff={d_ff}: {bad[:12]}")
    config = {
        "vocab_size": int(vocab),
        "d_model": int(d_model),
        "num_layers": num_layers,
        "num_heads": int(heads),
        "d_kv": int(inner // heads),
        "d_ff": int(d_ff),
        "relative_attention_num_buckets": int(buckets),
        "relative_attention_max_distance": int(max_distance),
        "feed_forward_proj": "gated-gelu",
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.0,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
    }
    return out, config


# ----------------------------------------------------------------------------------------------------------
# the encoder


class UMT5TextEncoder:
    """``TextEncoder`` over a transformers ``UMT5EncoderModel`` and its tokenizer (the Wan2.1 text encoder).

    ``encode(prompts) -> (features [B, text_len, d_model], lengths [B])`` on the model's device, in the model's
    dtype, computed without gradients.  ``offload()`` moves the weights to the CPU and ``release()`` drops them;
    either frees the accelerator for the DiT (``to(device)`` brings offloaded weights back)."""

    def __init__(self, model, tokenizer, *, text_len: int = DEFAULT_TEXT_LEN, clean: bool = True) -> None:
        self.text_len = _check_text_len(text_len, "UMT5TextEncoder")
        if model is None or not hasattr(model, "config") or not hasattr(model.config, "d_model"):
            raise TypeError(f"UMT5TextEncoder: model must be a transformers UMT5EncoderModel, got {type(model).__name__}")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError(f"UMT5TextEncoder: tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError("UMT5TextEncoder: the tokenizer has no pad token; prompts are padded to text_len")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.clean = bool(clean)
        self.text_dim = int(model.config.d_model)

    # -- state ------------------------------------------------------------------------------------------

    def _live_model(self, who: str):
        if self.model is None:
            raise RuntimeError(f"UMT5TextEncoder.{who}: the encoder was released; build a new one (from_pretrained / from_wan)")
        return self.model

    @property
    def device(self) -> torch.device:
        return next(self._live_model("device").parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._live_model("dtype").parameters()).dtype

    def to(self, device=None, dtype=None) -> "UMT5TextEncoder":
        """Move (and optionally cast to fp32 / bf16) the weights; returns self."""
        dtype = _check_dtype(dtype, "UMT5TextEncoder.to")
        self._live_model("to").to(device=device, dtype=dtype)
        return self

    def offload(self) -> "UMT5TextEncoder":
        """Move the weights to the CPU and return the accelerator's cached memory; ``to(device)`` undoes it."""
        was = self.device
        self._live_model("offload").to("cpu")
        _free_accelerator(was)
        return self

    def release(self) -> None:
        """Drop the model and tokenizer and return the accelerator's cached memory; the encoder cannot encode
        afterwards.  Other references to the model (the caller's) keep it alive."""
        if self.model is None:
            return
        was = self.device
        self.model = None
        self.tokenizer = None
        gc.collect()
        _free_accelerator(was)

    # -- encoding ---------------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, text_len], attention_mask [B, text_len]) of the cleaned prompts, on the CPU."""
        prompts = _check_prompts(prompts, "UMT5TextEncoder.tokenize")
        if self.tokenizer is None:
            raise RuntimeError("UMT5TextEncoder.tokenize: the encoder was released; build a new one (from_pretrained / from_wan)")
        texts = [clean_prompt(p) for p in prompts] if self.clean else prompts
        tok = self.tokenizer(texts, padding="max_length", max_length=self.text_len, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"]

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, text_len, text_dim], lengths [B] long): last hidden state, zero beyond each length."""
        model = self._live_model("encode")
        ids, mask = self.tokenize(prompts)
        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        lengths = mask.gt(0).sum(dim=1).long()
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        keep = torch.arange(hidden.shape[1], device=device)[None, :] < lengths[:, None]
        return torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=device)), lengths

    # -- constructors -----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, tokenizer=None, dtype=None, device="cpu", text_len: int = DEFAULT_TEXT_LEN) -> "UMT5TextEncoder":
        """From a diffusers pipeline directory (``text_encoder/`` + ``tokenizer/``) or a transformers
        ``UMT5EncoderModel`` directory; ``tokenizer`` (a directory) is needed when ``path`` has no tokenizer files
        and no ``tokenizer/`` sibling.  ``dtype`` None keeps the stored dtype.  Local files only."""
        who = "UMT5TextEncoder.from_pretrained"
        dtype = _check_dtype(dtype, who)
        text_len = _check_text_len(text_len, who)
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{who}: no such directory: {path} (expected a diffusers pipeline directory or a text_encoder directory)")
        if (path / "text_encoder" / "config.json").is_file():
            model_dir, default_tok = path / "text_encoder", path / "tokenizer"
        elif (path / "config.json").is_file():
            model_dir = path
            default_tok = path if _has_tokenizer_files(path) else path.parent / "tokenizer"
        else:
            raise FileNotFoundError(f"{who}: {path} has neither text_encoder/config.json (a diffusers pipeline) nor config.json (a text encoder)")
        tok_dir = Path(tokenizer) if tokenizer is not None else default_tok
        tok = _load_tokenizer(tok_dir, who, hint="pass tokenizer=<directory>")
        transformers = _require("transformers", "transformers", "UMT5TextEncoder")
        kwargs = {"dtype": dtype} if dtype is not None else {}
        try:
            model = transformers.UMT5EncoderModel.from_pretrained(str(model_dir), local_files_only=True, **kwargs)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{who}: cannot read a UMT5EncoderModel from {model_dir}: {e}") from e
        return cls(model.to(device), tok, text_len=text_len)

    @classmethod
    def from_wan(cls, pth_path, tokenizer_path, *, dtype=None, device="cpu", text_len: int = DEFAULT_TEXT_LEN) -> "UMT5TextEncoder":
        """From Wan's original ``models_t5_umt5-xxl-enc-bf16.pth`` and the ``google/umt5-xxl`` tokenizer folder.
        ``dtype`` None keeps the file's dtype (bf16 for the released file).  The weights are memory-mapped and
        assigned without a random initialisation or a second copy."""
        who = "UMT5TextEncoder.from_wan"
        dtype = _check_dtype(dtype, who)
        text_len = _check_text_len(text_len, who)
        tok = _load_tokenizer(Path(tokenizer_path), who, hint="tokenizer_path must be the google/umt5-xxl tokenizer folder")
        sd = read_torch_state_dict(pth_path, who)
        hf_sd, cfg = wan_t5_to_hf(sd, source=str(pth_path))
        transformers = _require("transformers", "transformers", "UMT5TextEncoder")
        config = transformers.UMT5Config(**cfg)
        with torch.device("meta"):
            model = transformers.UMT5EncoderModel(config)
        expected = set(model.state_dict())
        if expected != set(hf_sd):  # the installed transformers names differ from the table
            raise CheckpointError(f"{who}: converted names do not match this transformers' UMT5EncoderModel: "
                                  f"missing {sorted(expected - set(hf_sd))[:10]}, unexpected {sorted(set(hf_sd) - expected)[:10]}")
        model.load_state_dict(hf_sd, strict=True, assign=True)
        model.encoder.embed_tokens.weight = model.shared.weight  # one embedding tensor, not two after a cast
        model.to(device=device, dtype=dtype)
        return cls(model, tok, text_len=text_len)


# ----------------------------------------------------------------------------------------------------------
# helpers

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")


def _has_tokenizer_files(path: Path) -> bool:
    return any((path / f).is_file() for f in _TOKENIZER_FILES)


def _load_tokenizer(path: Path, who: str, *, hint: str):
    if not path.is_dir():
        raise FileNotFoundError(f"{who}: tokenizer directory {path} does not exist ({hint})")
    if not _has_tokenizer_files(path):
        raise FileNotFoundError(f"{who}: {path} holds none of the tokenizer files {list(_TOKENIZER_FILES)} ({hint})")
    transformers = _require("transformers", "transformers", "UMT5TextEncoder")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{who}: cannot load a tokenizer from {path}: {e} (a SentencePiece-only folder needs: pip install sentencepiece)") from e


def _free_accelerator(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type not in ("cpu", "meta"):
        mod = getattr(torch, device.type, None)  # npu, xpu, mps: their own empty_cache when present
        if mod is not None and hasattr(mod, "empty_cache"):
            mod.empty_cache()
