"""A cache of VAE latents and text features: a video corpus encoded once, read by training in its place.

Training from videos decodes, resizes, VAE-encodes and text-encodes every sample at every step; with the real
Wan2.1 VAE and UMT5-XXL that costs more than the DiT step and needs both encoders on the training device.
:func:`prepare_cache` runs the encoders once over a dataset (usually a :class:`~ospfn.data.video.VideoDataset`
over an OSP-Next index, as ``data.kind: video`` would read it) and writes the results into a directory;
:class:`LatentDataset` serves them to the trainer (``data.kind: latents``), in the same sample order, so a run
from the cache computes what a run from the videos computes (docs/training.md#latent-cache).

Layout of a cache directory::

    index.json                what it holds, what made it, how far preparing got (rewritten atomically)
    shard-00000.safetensors   samples 0 .. S-1, then shard-00001 ...: per sample k of the shard
                                "latent.k"  [C, T_lat, h, w]  the video's latents
                                "cond.k"    [C, 1, h, w]      frame 0 encoded on its own (FlashI2V caches)
                                "context.k" [L_k, D]          the caption's features, cut to its L_k tokens
                                "empty.k"   [L, D]            (text kind "qwen_vl" only) the per-sample empty
                                                              context: frame 0 with the caption ""
                              and in the header metadata ("ospfn.samples") one JSON record per sample:
                              source_index, caption, path, bucket, frame_indices, style (I2SV clips: the
                              context is the caption wrapped in the style template)
    empty.safetensors         "context" [L, D]: the empty prompt's features (text dropout; not for "qwen_vl",
                              whose empty context depends on the image)
    text_encoder.safetensors  the tiny text encoder's weights (text kind "tiny" only: an export needs them)

Text kind ``"qwen_vl"`` (Uniworld-OSP2.0's frozen Qwen2.5-VL, ``ospfn.model.vlm.QwenVLEncoder``): the encoder reads
frame 0 of the clip with the (style-templated) caption, ``text.encode([frame0], [caption])``, and its features are
stored at all ``text_len`` positions (no mask: nothing is cut); the dropped-caption context is the encoding of
(frame 0, ``""``), stored per sample as ``empty.k``.

Every shard is written to a temporary file and renamed into place, then ``index.json`` is rewritten, so a run
killed at any moment leaves a cache that the next :func:`prepare_cache` on the same directory continues from
the first shard not yet listed (temporaries of dead writers are removed; a second writer is refused while
one holds the directory's lock).  Features are stored in ``float32`` by default, which holds the encoders'
fp32 or bf16 outputs exactly; ``bfloat16`` halves the size at the cost of rounding fp32 features.

    >>> import tempfile, torch
    >>> from ospfn.model.text import TinyTextEncoder
    >>> from ospfn.model.vae import PixelVAE
    >>> tmp = tempfile.TemporaryDirectory()
    >>> data = [{"video": torch.zeros(3, 2, 8, 8), "caption": "a cat"}]     # any dataset of such items
    >>> index = prepare_cache(data, tmp.name + "/cache", text=TinyTextEncoder.create(text_dim=8, text_len=4),
    ...                       vae=PixelVAE(2), text_spec={"kind": "tiny", "text_dim": 8, "text_len": 4},
    ...                       vae_spec={"kind": "pixel", "latent_channels": 12}, cond=True, progress=False)
    >>> index["num_samples"], index["complete"]
    (1, True)
    >>> item = LatentDataset(tmp.name + "/cache")[0]
    >>> item["latent"].shape, item["cond"].shape, item["context"].shape, item["length"]
    (torch.Size([12, 2, 4, 4]), torch.Size([12, 1, 4, 4]), torch.Size([4, 8]), 3)
    >>> tmp.cleanup()
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from ospfn._fs import atomic_path, stale_temporaries, write_text_atomic
from ospfn.styles import style_prompt

__all__ = ["LatentCacheError", "CacheItemError", "LatentDataset", "prepare_cache", "read_cache_index", "CACHE_FORMAT",
           "PER_SAMPLE_EMPTY_KINDS"]

CACHE_FORMAT = "ospfn-latent-cache"
CACHE_VERSION = 1
INDEX = "index.json"
EMPTY = "empty.safetensors"
TEXT_WEIGHTS = "text_encoder.safetensors"
LOCK = ".lock"
_META_KEY = "ospfn.samples"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_SHARD_SIZE = 1_000_000
# text kinds whose features depend on the image too: the empty (dropped-caption) context is stored per sample
PER_SAMPLE_EMPTY_KINDS = ("qwen_vl",)


class LatentCacheError(ValueError):
    """A latent cache cannot be written or read: the message names the directory or file and what is wrong."""


class CacheItemError(LatentCacheError):
    """An item of the source dataset cannot be encoded (unreadable video, non-finite latents); names the item."""


def _shard_name(n: int) -> str:
    return f"shard-{n:05d}.safetensors"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------------------
# the index


def read_cache_index(path) -> dict:
    """The ``index.json`` of the cache directory ``path`` as a dict, checked for the keys every reader relies on
    (``LatentCacheError`` naming the file otherwise; ``FileNotFoundError`` when ``path`` holds no index)."""
    path = Path(path)
    index = path / INDEX
    if not path.is_dir():
        raise FileNotFoundError(f"latent cache {path}: no such directory (write one with recipes/prepare_data.py)")
    if not index.is_file():
        raise FileNotFoundError(f"latent cache {path}: no {INDEX} (not a latent cache; write one with recipes/prepare_data.py)")
    try:
        obj = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LatentCacheError(f"{index}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != CACHE_FORMAT:
        raise LatentCacheError(f"{index}: not an ospfn latent cache index (format must be {CACHE_FORMAT!r})")
    if obj.get("version") != CACHE_VERSION:
        raise LatentCacheError(f"{index}: cache version {obj.get('version')!r}; this ospfn reads version {CACHE_VERSION}")
    spec = obj.get("spec")
    shards = obj.get("shards")
    ok = (
        isinstance(spec, dict)
        and all(isinstance(spec.get(k), dict) for k in ("text", "vae", "source"))
        and isinstance(spec.get("cond"), bool)
        and spec.get("dtype") in _DTYPES
        and _is_int(spec["text"].get("text_dim")) and _is_int(spec["text"].get("text_len"))
        and _is_int(spec["vae"].get("latent_channels"))
        and isinstance(shards, list)
        and all(isinstance(s, dict) and isinstance(s.get("file"), str) and _is_int(s.get("count")) and s["count"] >= 1
                and _is_int(s.get("start")) and _is_int(s.get("end")) for s in shards)
        and all(_is_int(obj.get(k)) and obj[k] >= 0 for k in ("num_source", "next", "num_samples"))
        and isinstance(obj.get("complete"), bool)
    )  # fmt: skip
    if not ok:
        raise LatentCacheError(f"{index}: malformed cache index (spec, shards, num_source, next, num_samples, complete)")
    for s in shards:
        name = s["file"]
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise LatentCacheError(f"{index}: shard file names must be plain names inside {path}, got {name!r}")
    if sum(s["count"] for s in shards) != obj["num_samples"]:
        raise LatentCacheError(f"{index}: the shards hold {sum(s['count'] for s in shards)} samples, num_samples says {obj['num_samples']}")
    return obj


def _write_index(path: Path, obj: dict) -> None:
    write_text_atomic(path / INDEX, json.dumps(obj, indent=1) + "\n")


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} ({a!r} then, {b!r} now)"]


# ---------------------------------------------------------------------------------------------------------
# writing


def _check_spec(spec, name: str, keys: tuple) -> dict:
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise TypeError(f"prepare_cache: {name} must be a dict with 'kind' and {list(keys)}, got {spec!r:.120}")
    missing = [k for k in keys if not _is_int(spec.get(k))]
    if missing:
        raise ValueError(f"prepare_cache: {name} must give {missing} as ints, got {spec!r:.200}")
    try:
        return json.loads(json.dumps(spec))  # plain JSON: compared with the index on resume
    except (TypeError, ValueError) as e:
        raise TypeError(f"prepare_cache: {name} must be JSON-serialisable ({e})") from None


def _save_tensors(path: Path, tensors: dict, metadata: Optional[dict] = None) -> None:
    """One safetensors file, atomically, flushed to disk before it is renamed into place."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LatentCacheError(f"latent cache {path}: another process is writing it (it holds {path / LOCK})") from None
        yield
    finally:
        os.close(fd)


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="prepare", unit="clip", dynamic_ncols=True)


def _encode_text_vlm(text, video: torch.Tensor, prompt: str, i: int, L: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [L, D], empty context [L, D]) of a VLM encoder: frame 0 with ``prompt``, then with ``""``."""
    frame0 = video[:, 0][None]  # [1, 3, H, W] in [-1, 1]
    out = []
    for p in (prompt, ""):
        feats = text.encode(frame0, [p])
        if not isinstance(feats, torch.Tensor) or tuple(feats.shape) != (1, L, D):
            shown = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"item {i}: the VLM gave features {shown}, expected [1, {L}, {D}] (text_len, vlm_dim of the text_spec)")
        out.append(feats[0].float().cpu())
    return out[0], out[1]


def _encode_one(item, i: int, *, text, vae, cond: bool, text_spec: dict, vae_spec: dict):
    """(latent, cond latent or None, context [L, D], empty context [L, D] or None, record) of dataset item ``i``."""
    if not isinstance(item, dict) or not isinstance(item.get("video"), torch.Tensor) or not isinstance(item.get("caption"), str):
        raise TypeError(f"item {i}: a dataset item must be a dict with 'video' (a [3, F, H, W] tensor) and 'caption' (a str), "
                        f"got {type(item).__name__}")  # fmt: skip
    video = item["video"]
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"item {i}: video must be [3, F, H, W], got {tuple(video.shape)}")
    v = video[None]
    C, D, L = vae_spec["latent_channels"], text_spec["text_dim"], text_spec["text_len"]
    prompt = style_prompt(item["caption"], item.get("style"))  # an I2SV label: the style's template
    empty = None
    with torch.no_grad():
        z = vae.encode(v)[0].float().cpu()
        c = vae.encode(v[:, :, :1])[0].float().cpu() if cond else None
        if text_spec["kind"] in PER_SAMPLE_EMPTY_KINDS:
            ctx, empty = _encode_text_vlm(text, video, prompt, i, L, D)
        else:
            feats, lengths = text.encode([prompt])
    if z.dim() != 4 or z.shape[0] != C:
        raise ValueError(f"item {i}: the VAE gave latents of shape {tuple(z.shape)}, expected [{C}, T, h, w] (vae_spec {vae_spec})")
    if empty is None:
        if tuple(feats.shape[1:]) != (L, D):
            raise ValueError(f"item {i}: the text encoder gave features {tuple(feats.shape)}, expected [1, {L}, {D}] (text_spec {text_spec})")
        n = int(lengths[0])
        ctx = feats[0, :n].float().cpu()
    for name, t in (("latents", z), ("first-frame latents", c), ("text features", ctx), ("empty-caption text features", empty)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"item {i}: the {name} hold NaN or Inf")
    record = {"source_index": i, "caption": item["caption"]}
    for key in ("path", "bucket", "frame_indices", "style"):
        if key in item:
            val = item[key]
            record[key] = val.tolist() if isinstance(val, torch.Tensor) else (list(val) if isinstance(val, tuple) else val)
    return z, c, ctx, empty, record


def prepare_cache(
    dataset,
    out,
    *,
    text,
    vae,
    text_spec: dict,
    vae_spec: dict,
    cond: bool,
    source: Optional[dict] = None,
    shard_size: int = 64,
    dtype: torch.dtype = torch.float32,
    text_weights: Optional[dict] = None,
    skip_bad: bool = False,
    stop_after: Optional[int] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Encode ``dataset`` into the cache directory ``out`` (created, or continued) and return its index.

    ``dataset``: ``len()`` and items ``{"video": [3, F, H, W] in [-1, 1], "caption": str, ...}`` (``path``,
    ``bucket``, ``frame_indices``, ``style`` are recorded when present).  ``text``: a ``TextEncoder``
    (``encode(prompts) -> (features, lengths)``), or for ``text_spec["kind"] == "qwen_vl"`` a VLM encoder
    (``encode(images [B, 3, H, W], prompts) -> [B, text_len, text_dim]``, e.g. ``ospfn.model.vlm.QwenVLEncoder``:
    frame 0 is its image and the per-sample empty context is stored too); ``vae``: a ``VideoVAE``;
    ``text_spec`` / ``vae_spec`` describe them (JSON; at least ``kind``, ``text_dim`` + ``text_len`` /
    ``latent_channels``); ``cond``: also cache frame 0 encoded on its own (FlashI2V).  ``source`` (JSON) describes the corpus (index file, frames, fps, buckets, a digest of
    its entries); ``text_weights``: the tiny text encoder's weights, stored with the cache.  All of these are
    the cache's identity: continuing a cache made with other values raises ``LatentCacheError`` listing them.

    Samples are encoded one at a time (items of different buckets have different shapes) into shards of
    ``shard_size`` samples, stored in ``dtype`` (float32 or bfloat16).  A failing item (unreadable video,
    non-finite latents) raises ``LatentCacheError`` naming it, or with ``skip_bad`` is left out and listed in
    the index's ``skipped`` (the samples after it move up one place).  ``stop_after``: stop once that many
    items of the dataset are done (rounded up to a whole shard); a later call continues.
    """
    fn = "prepare_cache"
    say = log if log is not None else (lambda s: None)
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"{fn}: dataset must have len() and items, got {type(dataset).__name__}")
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"{fn}: out must be a directory path, got {type(out).__name__}")
    if not _is_int(shard_size) or not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise ValueError(f"{fn}: shard_size must be an int in [1, {MAX_SHARD_SIZE}], got {shard_size!r}")
    if dtype not in _DTYPES.values():
        raise ValueError(f"{fn}: dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")
    if stop_after is not None and (not _is_int(stop_after) or stop_after < 1):
        raise ValueError(f"{fn}: stop_after must be an int >= 1 or None, got {stop_after!r}")
    if not isinstance(cond, bool):
        raise TypeError(f"{fn}: cond must be True or False, got {cond!r}")
    if not callable(getattr(text, "encode", None)) or not callable(getattr(vae, "encode", None)):
        raise TypeError(f"{fn}: text and vae must have encode() (a TextEncoder and a VideoVAE), got "
                        f"{type(text).__name__}, {type(vae).__name__}")  # fmt: skip
    text_spec = _check_spec(text_spec, "text_spec", ("text_dim", "text_len"))
    vae_spec = _check_spec(vae_spec, "vae_spec", ("latent_channels",))
    if text_weights is not None and not (isinstance(text_weights, dict) and all(isinstance(v, torch.Tensor) for v in text_weights.values())):
        raise TypeError(f"{fn}: text_weights must be a dict of tensors or None, got {type(text_weights).__name__}")
    n_src = len(dataset)
    if n_src < 1:
        raise ValueError(f"{fn}: the dataset is empty: nothing to cache")
    dtype_name = next(k for k, v in _DTYPES.items() if v == dtype)
    spec = {"text": text_spec, "vae": vae_spec, "cond": cond, "dtype": dtype_name, "shard_size": shard_size,
            "source": json.loads(json.dumps(source or {}))}  # fmt: skip

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LatentCacheError(f"latent cache {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        for f in stale_temporaries(out):  # what writers killed mid-file left behind
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        if (out / INDEX).is_file():
            index = read_cache_index(out)
            changed = _diff(index["spec"], spec)
            if index["num_source"] != n_src:
                changed.append(f"number of source items ({index['num_source']} then, {n_src} now)")
            if changed:
                raise LatentCacheError(f"latent cache {out}: it was prepared with different settings: {'; '.join(changed)}; "
                                       "prepare into a new directory (or delete this one)")  # fmt: skip
            lost = next((s for s in index["shards"] if not (out / s["file"]).is_file()), None)
            if lost is not None:  # a listed shard vanished: redo from there
                say(f"{out / lost['file']} is missing: preparing again from source item {lost['start']}")
                keep = index["shards"][: index["shards"].index(lost)]
                index.update(shards=keep, next=lost["start"], num_samples=sum(s["count"] for s in keep), complete=False)
                index["skipped"] = [s for s in index.get("skipped", []) if s.get("source_index", 0) < lost["start"]]
            elif index["next"] > 0:
                say(f"continuing {out}: {index['next']} of {n_src} items done")
        else:
            others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
            if others:
                raise LatentCacheError(f"latent cache {out}: the directory is not empty and holds no {INDEX} ({others[:5]}); "
                                       "give a new or empty directory")  # fmt: skip
            index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "spec": spec, "num_source": n_src, "next": 0,
                     "num_samples": 0, "complete": False, "shards": [], "skipped": []}  # fmt: skip
        if text_weights is not None:
            _check_or_save_text_weights(out, text_weights)
        if text_spec["kind"] not in PER_SAMPLE_EMPTY_KINDS and not (out / EMPTY).is_file():
            feats, lengths = text.encode([""])
            _save_tensors(out / EMPTY, {"context": feats[0, : int(lengths[0])].float().cpu().contiguous()})
        _write_index(out, index)
        if index["complete"]:
            say(f"{out}: already complete ({index['num_samples']} samples)")
            return index
        limit = n_src if stop_after is None else min(n_src, index["next"] + stop_after)
        bar = _progress(progress, n_src, index["next"])
        try:
            while index["next"] < limit:
                start = index["next"]
                end = min(n_src, (start // shard_size + 1) * shard_size)  # shards cover fixed ranges of items
                tensors, records, skipped = {}, [], []
                for i in range(start, end):
                    try:
                        z, c, ctx, empty, rec = _encode_one(dataset[i], i, text=text, vae=vae, cond=cond, text_spec=text_spec,
                                                            vae_spec=vae_spec)  # fmt: skip
                    except torch.OutOfMemoryError:  # the machine's problem, not the clip's: never skipped
                        raise
                    except (OSError, RuntimeError, ValueError, TypeError) as e:
                        where = _item_path(dataset, i)
                        if not skip_bad:
                            raise CacheItemError(f"latent cache {out}: source item {i}{where}: {e} "
                                                   "(skip_bad / --skip-bad leaves such items out)") from e  # fmt: skip
                        skipped.append({"source_index": i, "error": f"{type(e).__name__}: {e}"[:500], **({"path": where[2:-1]} if where else {})})
                        if bar is not None:
                            bar.update(1)
                        continue
                    k = len(records)
                    tensors[f"latent.{k}"] = z.to(dtype).contiguous()
                    if c is not None:
                        tensors[f"cond.{k}"] = c.to(dtype).contiguous()
                    tensors[f"context.{k}"] = ctx.to(dtype).contiguous()
                    if empty is not None:
                        tensors[f"empty.{k}"] = empty.to(dtype).contiguous()
                    records.append(rec)
                    if bar is not None:
                        bar.update(1)
                shard = {"file": _shard_name(start // shard_size), "start": start, "end": end, "count": len(records)}
                if records:
                    _save_tensors(out / shard["file"], tensors, {_META_KEY: json.dumps(records)})
                    index["shards"].append(shard)
                index["skipped"] = index.get("skipped", []) + skipped
                index["next"] = end
                index["num_samples"] += len(records)
                index["complete"] = end == n_src
                _write_index(out, index)
                for s in skipped:
                    say(f"skipped source item {s['source_index']}: {s['error']}")
        finally:
            if bar is not None:
                bar.close()
        if index["complete"] and index["num_samples"] == 0:
            raise LatentCacheError(f"latent cache {out}: every one of the {n_src} items failed; nothing was cached")
        return index


def _item_path(dataset, i: int) -> str:
    entries = getattr(dataset, "entries", None)
    try:
        return f" ({entries[i].path})" if entries is not None else ""
    except (IndexError, AttributeError, TypeError):
        return ""


def _check_or_save_text_weights(out: Path, weights: dict) -> None:
    from ospfn.model.checkpoint import read_safetensors

    f = out / TEXT_WEIGHTS
    w = {k: v.detach().float().cpu().contiguous() for k, v in weights.items()}
    if not f.is_file():
        _save_tensors(f, w)
        return
    have = read_safetensors(f)
    if set(have) != set(w) or not all(torch.equal(have[k], w[k]) for k in w):
        raise LatentCacheError(f"latent cache {out}: it was prepared with other text encoder weights ({f}); "
                               "prepare into a new directory")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# reading


class LatentDataset:
    """The samples of a complete latent cache, in the order they were prepared.

    Item ``i``: ``latent`` float32 [C, T_lat, h, w]; ``cond`` float32 [C, 1, h, w] (caches made with
    ``cond``); ``context`` float32 [text_len, D], the caption's features zero beyond its ``length`` tokens;
    ``length`` int; ``caption``, ``path`` and ``style`` (when recorded), ``source_index`` (the item of the corpus
    it came from) and ``index`` (``i``).  ``empty_context`` is the empty prompt's features [1, text_len, D]; in a
    cache of a VLM (text kind ``"qwen_vl"``, ``per_sample_empty``) it is None and every item carries its own
    ``empty_context`` [text_len, D] (frame 0 with the caption ``""``), and ``context`` is never cut.
    ``spec`` what made the cache (text, vae, cond, dtype, source).

    Errors name the file: ``FileNotFoundError`` for a missing directory, index or shard;
    ``LatentCacheError`` for an incomplete cache (prepare it to the end first: it continues where it
    stopped), a malformed index, or a shard whose tensors or records are not what the index describes (every
    shard's safetensors header is checked when it is first read).
    """

    is_latent_cache = True  # what the trainer looks for (ospfn.train.step.Trainer.micro_loss)

    def __init__(self, path) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"LatentDataset: path must be a cache directory path, got {type(path).__name__}")
        self.path = Path(path)
        idx = read_cache_index(self.path)
        if not idx["complete"]:
            raise LatentCacheError(f"latent cache {self.path} is incomplete: {idx['next']} of {idx['num_source']} source items prepared; "
                                   "run recipes/prepare_data.py again to finish it (it continues where it stopped)")  # fmt: skip
        if idx["num_samples"] < 1:
            raise LatentCacheError(f"latent cache {self.path} holds no samples")
        self.index = idx
        self.spec = idx["spec"]
        self.cond = bool(self.spec["cond"])
        self.text_len = self.spec["text"]["text_len"]
        self.text_dim = self.spec["text"]["text_dim"]
        self.latent_channels = self.spec["vae"]["latent_channels"]
        self.per_sample_empty = self.spec["text"].get("kind") in PER_SAMPLE_EMPTY_KINDS
        self.shards = idx["shards"]
        self.starts = []
        n = 0
        for s in self.shards:
            self.starts.append(n)
            n += s["count"]
        self._len = n
        missing = [s["file"] for s in self.shards if not (self.path / s["file"]).is_file()]
        if missing:
            raise FileNotFoundError(f"latent cache {self.path}: shard file(s) {missing[:5]} listed in {INDEX} are missing")
        self._open: dict[int, tuple] = {}
        if self.per_sample_empty:
            self.empty_context = None
            return
        empty = self._read_file(self.path / EMPTY)
        ctx = empty.get("context")
        if ctx is None or ctx.dim() != 2 or ctx.shape[1] != self.text_dim or not 1 <= ctx.shape[0] <= self.text_len:
            raise LatentCacheError(f"{self.path / EMPTY}: must hold 'context' [L <= {self.text_len}, {self.text_dim}], "
                                   f"got {None if ctx is None else tuple(ctx.shape)}")  # fmt: skip
        self.empty_context = self._pad(ctx)[None]

    @staticmethod
    def _read_file(path: Path) -> dict:
        from ospfn.model.checkpoint import CheckpointError, CheckpointMissingError, read_safetensors

        try:
            return read_safetensors(path)
        except CheckpointMissingError:
            raise FileNotFoundError(f"latent cache: {path} is missing") from None
        except CheckpointError as e:
            raise LatentCacheError(f"latent cache file {e}") from None

    def text_weights(self) -> dict:
        """The tiny text encoder's weights stored with the cache (text kind "tiny")."""
        f = self.path / TEXT_WEIGHTS
        if not f.is_file():
            raise FileNotFoundError(f"latent cache {self.path}: no {TEXT_WEIGHTS} (only caches of the tiny text encoder have one)")
        return self._read_file(f)

    def _pad(self, ctx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.text_len, self.text_dim, dtype=torch.float32)
        out[: ctx.shape[0]] = ctx.float()
        return out

    def _shard(self, j: int) -> tuple:
        """(entries {name: (shape, dtype, start, end)}, data offset, records) of shard ``j``, checked once."""
        if j in self._open:
            return self._open[j]
        from ospfn.model.checkpoint import CheckpointError, _safetensors_entries, _safetensors_header

        s = self.shards[j]
        path = self.path / s["file"]
        try:
            entries, base = _safetensors_entries(path)
            with open(path, "rb") as f:
                header, _ = _safetensors_header(f, path)
        except FileNotFoundError:
            raise FileNotFoundError(f"latent cache {self.path}: shard {path} is missing") from None
        except CheckpointError as e:
            raise LatentCacheError(f"latent cache shard {e}") from None
        table = {name: (shape, dt, start, end) for name, shape, dt, start, end in entries}
        try:
            records = json.loads((header.get("__metadata__") or {}).get(_META_KEY, "null"))
        except (TypeError, json.JSONDecodeError):
            records = None
        n = s["count"]
        if not isinstance(records, list) or len(records) != n or not all(isinstance(r, dict) and isinstance(r.get("caption"), str) for r in records):
            raise LatentCacheError(f"{path}: its sample records ({_META_KEY} metadata) do not describe the {n} samples {INDEX} lists")
        kinds = ("latent", "context") + (("cond",) if self.cond else ()) + (("empty",) if self.per_sample_empty else ())
        want = {f"{k}.{i}" for k in kinds for i in range(n)}
        if set(table) != want:
            lacking, extra = sorted(want - set(table)), sorted(set(table) - want)
            raise LatentCacheError(f"{path}: tensors do not match {INDEX} ({n} samples{', with cond' if self.cond else ''}): "
                                   f"missing {lacking[:6]}, unexpected {extra[:6]}")  # fmt: skip
        C, D, L = self.latent_channels, self.text_dim, self.text_len
        for name, (shape, _, _, _) in table.items():
            kind = name.split(".", 1)[0]
            if kind in ("context", "empty") and self.per_sample_empty:  # VLM features: all text_len positions
                ok = list(shape) == [L, D]
            elif kind == "context":
                ok = len(shape) == 2 and shape[1] == D and 1 <= shape[0] <= L
            else:
                ok = len(shape) == 4 and shape[0] == C and min(shape) >= 1 and (kind != "cond" or shape[1] == 1)
            if not ok:
                what = {"latent": f"[{C}, T, h, w]", "cond": f"[{C}, 1, h, w]"}.get(kind, f"[{L}, {D}]" if self.per_sample_empty else f"[L <= {L}, {D}]")
                raise LatentCacheError(f"{path}: tensor {name!r} has shape {list(shape)}, expected {what}")
        self._open[j] = (table, base, records)
        return self._open[j]

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        from ospfn.model.checkpoint import _read_tensor

        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"LatentDataset: index={index!r} must be an int")
        i = index + (self._len if index < 0 else 0)
        if not 0 <= i < self._len:
            raise IndexError(f"LatentDataset: index={index} is out of range for {self._len} samples")
        j = bisect.bisect_right(self.starts, i) - 1
        k = i - self.starts[j]
        table, base, records = self._shard(j)
        path = self.path / self.shards[j]["file"]
        names = ["latent", "context"] + (["cond"] if self.cond else []) + (["empty"] if self.per_sample_empty else [])
        got = {}
        with open(path, "rb") as f:
            for name in names:
                shape, dt, start, end = table[f"{name}.{k}"]
                got[name] = _read_tensor(f, base, start, end, dt, shape, torch.float32, "cpu")
        rec = records[k]
        item = {"latent": got["latent"], "context": self._pad(got["context"]), "length": int(got["context"].shape[0]),
                "caption": rec["caption"], "source_index": rec.get("source_index"), "index": i}  # fmt: skip
        if self.cond:
            item["cond"] = got["cond"]
        if self.per_sample_empty:
            item["empty_context"] = got["empty"]
        if "path" in rec:
            item["path"] = rec["path"]
        if "style" in rec:
            item["style"] = rec["style"]
        return item

    def records(self) -> list[dict]:
        """The sample records of every shard (caption, source_index, path, style, ...), in sample order; reads the
        shards' headers only."""
        out = []
        for j in range(len(self.shards)):
            out.extend(dict(r) for r in self._shard(j)[2])
        return out

    def __repr__(self) -> str:
        t, v = self.spec["text"], self.spec["vae"]
        return (f"LatentDataset({self.path}, {self._len} samples, text {t.get('kind')} [{self.text_len}, {self.text_dim}], "
                f"vae {v.get('kind')} ({self.latent_channels} channels){', cond' if self.cond else ''})")  # fmt: skip
