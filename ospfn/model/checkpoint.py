"""Checkpoints: Wan2.1 original, diffusers ``WanTransformer3DModel``, OSP-Next FSDP/DCP and FlashI2V files.

Parameters inside ospfn always carry the Wan2.1 original names.  ``load_checkpoint`` reads

* a ``.safetensors`` file, a sharded set (``*.safetensors.index.json``) or a directory holding either;
* a ``.pt`` / ``.pth`` / ``.bin`` state dict, only through ``torch.load(weights_only=True)`` (pickled code in a
  checkpoint is never executed), with wrapper prefixes (``module.``, ``_orig_mod.``, ``_fsdp_wrapped_module.``,
  ``_checkpoint_wrapped_module.``) stripped -- the OSP-Next ``model.pt`` release;
  a legacy (non-zip) ``torch.save`` file is read without mmap, still ``weights_only``;
* a torch.distributed.checkpoint (DCP) directory (``.metadata`` inside): the metadata is unpickled with an
  allow-list of DCP's own records and only tensor entries are read, so no pickled code runs there either;

in Wan or diffusers naming (detected from the keys), converts names, checks every shape against the config,
and reports all missing / unexpected / mis-shaped keys in one error.  Every file is checked before it is
used: an empty, truncated, foreign or inconsistent file raises ``CheckpointError`` naming the file and what
is wrong (``CheckpointMissingError``, also a ``FileNotFoundError``, for a file the checkpoint names but lacks),
never a bare ``struct`` / ``json`` / ``pickle`` / shape error.  Safetensors shards are read one tensor
at a time straight into the destination buffer (no mmap, no second copy of a shard), so loading a 28 GB
checkpoint needs ~28 GB, not 56.

``save_checkpoint`` writes safetensors atomically (temporary file + rename), optionally sharded with an index.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Iterable, Optional

import torch

from ospfn._fs import atomic_path, write_text_atomic
from ospfn.model.config import DiTConfig
from ospfn.model.params import FLASHI2V_BRANCH_KEYS, add_flashi2v_branches, param_shapes

__all__ = [
    "convert_state_dict", "load_checkpoint", "save_checkpoint", "load_config", "detect_format", "read_safetensors",
    "torch_load", "read_dcp_metadata", "checkpoint_shapes", "CheckpointError", "CheckpointMissingError",
]  # fmt: skip

FORMATS = ("wan", "diffusers", "osp-next", "flashi2v")
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: a file is empty, truncated, not of its format or inconsistent (the message
    names the file and what is wrong), or its keys do not match the model (every missing, unexpected and
    mis-shaped key is listed)."""


class CheckpointMissingError(CheckpointError, FileNotFoundError):
    """A file a checkpoint needs is missing: a shard its index names, ``.metadata`` of a DCP directory, a file of
    a training checkpoint or a pipeline directory (also a ``FileNotFoundError``)."""


# ----------------------------------------------------------------------------------------------------------
# name conversion

# (Wan template, diffusers template); {n} is a block index, {wb} weight|bias, {qkv} one of q/k/v
_WB = "weight|bias"
_RULES = [
    ("blocks.{n}.self_attn.{qkv}.{wb}", "blocks.{n}.attn1.to_{qkv}.{wb}"),
    ("blocks.{n}.self_attn.o.{wb}", "blocks.{n}.attn1.to_out.0.{wb}"),
    ("blocks.{n}.self_attn.norm_{qk}.weight", "blocks.{n}.attn1.norm_{qk}.weight"),
    ("blocks.{n}.cross_attn.{qkv}.{wb}", "blocks.{n}.attn2.to_{qkv}.{wb}"),
    ("blocks.{n}.cross_attn.o.{wb}", "blocks.{n}.attn2.to_out.0.{wb}"),
    ("blocks.{n}.cross_attn.norm_{qk}.weight", "blocks.{n}.attn2.norm_{qk}.weight"),
    ("blocks.{n}.norm3.{wb}", "blocks.{n}.norm2.{wb}"),  # diffusers' norm2 is Wan's norm3 (cross-attn, affine)
    ("blocks.{n}.ffn.0.{wb}", "blocks.{n}.ffn.net.0.proj.{wb}"),
    ("blocks.{n}.ffn.2.{wb}", "blocks.{n}.ffn.net.2.{wb}"),
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    ("patch_embedding.{wb}", "patch_embedding.{wb}"),
    ("text_embedding.0.{wb}", "condition_embedder.text_embedder.linear_1.{wb}"),
    ("text_embedding.2.{wb}", "condition_embedder.text_embedder.linear_2.{wb}"),
    ("time_embedding.0.{wb}", "condition_embedder.time_embedder.linear_1.{wb}"),
    ("time_embedding.2.{wb}", "condition_embedder.time_embedder.linear_2.{wb}"),
    ("time_projection.1.{wb}", "condition_embedder.time_proj.{wb}"),
    ("head.head.{wb}", "proj_out.{wb}"),
    ("head.modulation", "scale_shift_table"),
    # FlashI2V additions keep their names in every layout (listed so that a rename is one edit here)
    ("fourier_embedding.{i01}.{wb}", "fourier_embedding.{i01}.{wb}"),
    ("learnable_proj.proj.{i02}.{wb}", "learnable_proj.proj.{i02}.{wb}"),
]
_PLACEHOLDERS = {"n": r"\d+", "wb": _WB, "qkv": "q|k|v", "qk": "q|k", "i01": "0|1", "i02": "0|2"}
# diffusers-side aliases accepted on input (newer diffusers fold the top-level table into norm_out)
_DIFFUSERS_ALIASES = {"norm_out.scale_shift_table": "scale_shift_table"}


def _template_regex(tmpl: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", tmpl)
    rx = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_PLACEHOLDERS[p]})" for i, p in enumerate(parts))
    return re.compile("^" + rx + "$")


def _rename_table(src: str, dst: str) -> list:
    """[(regex over src names, dst template)]; src/dst are "wan" or "diffusers"."""
    i, j = (1, 0) if src == "diffusers" else (0, 1)
    if dst == src:
        j = i
    return [(_template_regex(r[i]), r[j]) for r in _RULES]


def _strip_wrappers(key: str) -> str:
    for w in _WRAPPERS:
        key = key.replace(w, "")
    return key


def detect_format(keys: Iterable[str]) -> str:
    """"diffusers" if the keys use diffusers names, else "wan" (Wan / OSP-Next / FlashI2V all use Wan names)."""
    for k in keys:
        k = _strip_wrappers(k)
        if k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k or ".attn2." in k:
            return "diffusers"
    return "wan"


def _convert_name(key: str, table) -> Optional[str]:
    for rx, tmpl in table:
        m = rx.match(key)
        if m:
            return tmpl.format(**m.groupdict())
    return None


def convert_state_dict(sd: dict, src: str, dst: str) -> dict:
    """Rename a state dict between layouts: "wan", "diffusers", "osp-next" (Wan names behind FSDP /
    torch.compile / DDP wrapper prefixes) and "flashi2v" (Wan names plus ``fourier_embedding.*`` and
    ``learnable_proj.*``).  Tensors are not copied.  Keys no rule knows raise ``CheckpointError``.

    >>> import torch
    >>> sd = {"blocks.0.self_attn.o.weight": torch.zeros(2, 2), "head.modulation": torch.zeros(1, 2, 2)}
    >>> sorted(convert_state_dict(sd, "wan", "diffusers"))
    ['blocks.0.attn1.to_out.0.weight', 'scale_shift_table']
    """
    for name, v in (("src", src), ("dst", dst)):
        if v not in FORMATS:
            raise ValueError(f"convert_state_dict: {name} must be one of {FORMATS}, got {v!r}")
    items = {(_strip_wrappers(k) if src == "osp-next" else k): v for k, v in sd.items()}
    if src == "diffusers":
        items = {_DIFFUSERS_ALIASES.get(k, k): v for k, v in items.items()}
    table = _rename_table("diffusers" if src == "diffusers" else "wan", "diffusers" if dst == "diffusers" else "wan")
    out, unknown = {}, []
    for k, v in items.items():
        new = _convert_name(k, table)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise CheckpointError(f"convert_state_dict({src} -> {dst}): no rule for {len(unknown)} key(s): {sorted(unknown)[:20]}")
    return out


# ----------------------------------------------------------------------------------------------------------
# reading


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_MAX_HEADER = 100 * 2**20


def _describe(e: BaseException) -> str:
    """``Type: first line`` of an exception (torch's messages run over many lines)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _safetensors_header(f, path: Path) -> tuple[dict, int]:
    """(header dict, data base offset); ``CheckpointError`` naming ``path`` for anything not a safetensors header."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > _MAX_HEADER:
        raise CheckpointError(f"{path}: implausible safetensors header of {n} bytes (at most {_MAX_HEADER})")
    if n < 2 or 8 + n > size:
        raise CheckpointError(f"{path}: safetensors header length {n} does not fit the file of {size} bytes (truncated or not safetensors)")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({_describe(e)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    return header, 8 + n


def _safetensors_entries(path: Path) -> tuple[list[tuple[str, torch.Size, torch.dtype, int, int]], int]:
    """[(name, shape, dtype, start, end)] in file order, and the data base offset.

    Every entry is checked against the format (a known ``dtype``, a ``shape`` of non-negative ints,
    ``data_offsets`` of exactly shape x dtype-size bytes inside the file, no two tensors sharing bytes), so the
    reads that follow cannot fail on a malformed file.
    """
    with open(path, "rb") as f:
        header, base = _safetensors_header(f, path)
        data_size = os.fstat(f.fileno()).st_size - base
    header.pop("__metadata__", None)
    out = []
    for name, meta in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(meta, dict):
            raise CheckpointError(f"{where}: entry must be an object with dtype, shape and data_offsets, got {meta!r:.80}")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
        if missing:
            raise CheckpointError(f"{where}: entry lacks {missing} (a safetensors entry has dtype, shape and data_offsets)")
        dt, shape, offs = meta["dtype"], meta["shape"], meta["data_offsets"]
        if not isinstance(dt, str) or dt not in _ST_DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {dt!r}; supported: {sorted(_ST_DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative ints, got {shape!r:.80}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs) and 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"{where}: data_offsets must be [start, end] with 0 <= start <= end, got {offs!r:.80}")
        dtype = _ST_DTYPES[dt]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        start, end = offs
        if end - start != nbytes:
            raise CheckpointError(f"{where}: data_offsets {offs} hold {end - start} bytes but shape {shape} x {dt} needs {nbytes}")
        if end > data_size:
            raise CheckpointError(f"{where}: data_offsets {offs} run past the end of the data ({data_size} bytes): the file is truncated")
        out.append((name, torch.Size(shape), dtype, start, end))
    out.sort(key=lambda e: (e[3], e[4]))
    reach, owner = 0, None  # the furthest end so far and its tensor
    for name, _, _, start, end in out:
        if start < reach and end > start:
            raise CheckpointError(f"{path}: tensors {owner!r} and {name!r} overlap in the data section")
        if end > reach:
            reach, owner = end, name
    return out, base


def _read_tensor(f, base: int, start: int, end: int, dtype: torch.dtype, shape, into_dtype, device) -> torch.Tensor:
    """One tensor read straight into a fresh buffer (no mmap); cast/moved only if asked."""
    buf = torch.empty(end - start, dtype=torch.uint8)
    f.seek(base + start)
    if end > start and f.readinto(memoryview(buf.numpy())) != end - start:
        raise CheckpointError(f"{getattr(f, 'name', 'file')}: truncated tensor data")
    t = buf.view(dtype).reshape(shape)
    if into_dtype is not None and into_dtype != dtype:
        t = t.to(into_dtype)
    return t.to(device)


def read_safetensors(path, *, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, checked as ``load_checkpoint`` checks it (``CheckpointError``
    naming the file for anything malformed or truncated)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointMissingError(f"read_safetensors: no such file: {path}")
    entries, base = _safetensors_entries(path)
    with open(path, "rb") as f:
        return {name: _read_tensor(f, base, start, end, dt, shape, None, device) for name, shape, dt, start, end in entries}


def _read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object; ``CheckpointError`` naming the file otherwise."""
    try:
        text = path.read_bytes().decode("utf-8")
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({_describe(e)})") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: {what} is a directory, expected a JSON file") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _shard_path(parent: Path, name, index: Path) -> Path:
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(f"{index}: weight_map values must be shard file names inside {parent}, got {name!r}")
    return parent / name


def _resolve_files(path: Path) -> tuple[list[Path], str]:
    """The weight files of a checkpoint path and their kind ("safetensors" | "torch" | "dcp")."""
    if path.is_dir():
        if (path / ".metadata").exists():
            return [path], "dcp"
        idx = sorted(path.glob("*.safetensors.index.json"))
        if idx:
            return _resolve_files(idx[0])
        if (path / "diffusion_pytorch_model.safetensors").is_file():  # a diffusers / ospfn pipeline's DiT: its
            return [path / "diffusion_pytorch_model.safetensors"], "safetensors"  # other files are not the DiT's
        st = sorted(path.glob("*.safetensors"))
        if st:
            return st, "safetensors"
        pt = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".bin"))
        if len(pt) == 1:
            return pt, "torch"
        if any(path.glob("*.distcp")):
            raise CheckpointMissingError(f"load_checkpoint: {path} holds DCP shards (*.distcp) but no .metadata: an interrupted or incomplete DCP save")
        raise FileNotFoundError(f"load_checkpoint: {path} holds no *.safetensors, index json, single .pt/.pth or DCP checkpoint")
    if not path.exists():
        raise FileNotFoundError(f"load_checkpoint: no such file or directory: {path}")
    if path.name.endswith(".index.json"):
        index = _read_json_object(path, "safetensors index")
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{path}: safetensors index needs a non-empty 'weight_map' object (tensor name -> shard file), got {wm!r:.80}")
        files = sorted({_shard_path(path.parent, f, path) for f in wm.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointMissingError(f"load_checkpoint: shards listed in {path} are missing: {missing}")
        return files, "safetensors"
    if path.suffix == ".safetensors":
        return [path], "safetensors"
    if path.suffix in (".pt", ".pth", ".bin"):
        return [path], "torch"
    raise ValueError(f"load_checkpoint: unknown checkpoint type {path.suffix!r} ({path}); expected .safetensors, an index json, .pt/.pth/.bin or a directory")


def torch_load(path, *, mmap: bool = True):
    """``torch.load(weights_only=True)`` of a zip (``torch.save`` default) or legacy (non-zip) file.

    A zip file is memory-mapped when ``mmap``; a legacy file cannot be and is read into memory.  Pickled code
    is never executed: a global ``weights_only`` does not allow is refused.  Anything unreadable raises
    ``CheckpointError`` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointMissingError(f"torch_load: no such file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a torch checkpoint")
    is_zip = magic == b"PK\x03\x04"
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        glob = next((ln for ln in lines if "GLOBAL" in ln), None)
        if glob is not None:
            raise CheckpointError(f"{path}: refused to unpickle ({glob}): the file holds code or objects other than "
                                  "tensors and plain containers; it is read with weights_only=True, which never runs pickled code") from None  # fmt: skip
        why = next((ln for ln in lines if "Unsupported" in ln or "invalid load key" in ln), lines[0] if lines else "")
        raise CheckpointError(f"{path}: not a torch checkpoint readable with weights_only=True (UnpicklingError: {why})") from None
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 -- torch raises RuntimeError / EOFError / ValueError / ... for corrupt files
        kind = "a truncated or corrupt zip archive" if is_zip else "not a torch checkpoint (neither a zip nor a legacy torch.save file)"
        raise CheckpointError(f"{path}: {kind} ({_describe(e)})") from None


def _unwrap_state_dict(sd, path: Path) -> dict:
    # common wrappings: {"model": sd}, {"state_dict": sd}, {"module": sd}, {"ema": ...}
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict) and all(isinstance(v, torch.Tensor) for v in sd[key].values()):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    bad = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: state dict keys must be str, got {[type(k).__name__ for k in bad[:5]]} for {len(bad)} tensor(s)")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _torch_state_dict(path: Path) -> dict:
    return _unwrap_state_dict(torch_load(path, mmap=True), path)


# DCP ``.metadata`` is a pickle: read it with an unpickler that builds only DCP's metadata records
_DCP_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in _DCP_GLOBALS.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_dcp_metadata(path):
    """The ``Metadata`` of a DCP directory, unpickled without running code (only DCP's own metadata records
    are built); ``CheckpointError`` naming ``<path>/.metadata`` if it is missing, truncated or foreign."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    file = Path(path) / ".metadata"
    if not file.is_file():
        raise CheckpointMissingError(f"{path}: not a DCP checkpoint directory (no .metadata)")
    try:
        with open(file, "rb") as f:
            md = _DCPMetadataUnpickler(f).load()
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 -- EOFError, UnpicklingError, ... for truncated / foreign files
        raise CheckpointError(f"{file}: not readable DCP metadata ({_describe(e)})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{file}: not DCP metadata (got {type(md).__name__})")
    if getattr(md, "storage_meta", None) is None:
        md.storage_meta = StorageMeta()
    return md


def _dcp_state_dict(path: Path) -> dict:
    """The tensors of a DCP directory, read chunk by chunk from the shard files named in its metadata.

    Only tensors are read (non-tensor entries are pickles and are skipped); each chunk goes through
    ``torch.load(weights_only=True)``.  A missing or short shard raises ``CheckpointError`` naming the shard.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_dcp_metadata(path)
    storage = {}
    for idx, info in (getattr(md, "storage_data", None) or {}).items():
        storage[(idx.fqn, tuple(idx.offset) if idx.offset is not None else None)] = info
    sizes: dict[str, int] = {}

    def shard_file(rel) -> Path:
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{path}/.metadata: shard path {rel!r} is not a file inside {path}")
        f = path / rel
        if rel not in sizes:
            if not f.is_file():
                raise CheckpointMissingError(f"{f}: DCP shard named in {path}/.metadata is missing")
            sizes[rel] = f.stat().st_size
        return f

    plan = []  # (fqn, tensor, [(slices, file, offset, length)])
    for fqn, meta in md.state_dict_metadata.items():
        if not isinstance(meta, TensorStorageMetadata):
            continue
        t = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        reads, covered = [], 0
        for chunk in meta.chunks:
            info = storage.get((fqn, tuple(chunk.offsets)))
            if info is None:
                raise CheckpointError(f"{path}/.metadata: no storage entry for chunk {tuple(chunk.offsets)} of {fqn!r}")
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(f"{path}: {fqn!r} is stored with transforms {info.transform_descriptors} (not supported)")
            f = shard_file(info.relative_path)
            if info.offset < 0 or info.length < 0 or info.offset + info.length > sizes[info.relative_path]:
                raise CheckpointError(f"{f}: truncated DCP shard: {fqn!r} needs bytes {info.offset}..{info.offset + info.length}, "
                                      f"the file has {sizes[info.relative_path]}")  # fmt: skip
            sl = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
            reads.append((sl, tuple(chunk.sizes), f, info.offset, info.length))
            covered += math.prod(chunk.sizes)
        if covered != t.numel():
            raise CheckpointError(f"{path}/.metadata: the chunks of {fqn!r} cover {covered} of its {t.numel()} elements")
        plan.append((fqn, t, reads))
    flat = {}
    for fqn, t, reads in plan:
        for sl, shape, f, offset, length in reads:
            with open(f, "rb") as fh:
                fh.seek(offset)
                blob = io.BytesIO(fh.read(length))
            try:
                chunk = torch.load(blob, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{f}: corrupt DCP shard: cannot read {fqn!r} at bytes {offset}..{offset + length} ({_describe(e)})") from None
            if not isinstance(chunk, torch.Tensor) or tuple(chunk.shape) != shape:
                got = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
                raise CheckpointError(f"{f}: corrupt DCP shard: {fqn!r} chunk is {got}, metadata says {shape}")
            t[sl].copy_(chunk)
        flat[fqn] = t
    # nest as DCP's flattening recorded it ({"model": {...}} saves become nested again), then unwrap as for .pt
    nested: dict = {}
    for fqn, t in flat.items():
        keys = (md.planner_data or {}).get(fqn, (fqn,)) if isinstance(md.planner_data, dict) else (fqn,)
        node = nested
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"{path}/.metadata: inconsistent nesting for {fqn!r}")
        node[keys[-1]] = t
    return _unwrap_state_dict(nested, path)


def load_config(path) -> DiTConfig:
    """The DiTConfig of a checkpoint directory (or a config.json file).  A config.json that is not a JSON
    object or does not describe a valid ``DiTConfig`` raises ``CheckpointError`` naming the file."""
    p = Path(path)
    cfg_file = p if p.suffix == ".json" and p.name == "config.json" else (p if p.is_dir() else p.parent) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"load_config: no config.json at {cfg_file}; pass cfg explicitly")
    d = _read_json_object(cfg_file, "config.json")
    try:
        return DiTConfig.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{cfg_file}: not a valid DiT config: {e}") from None


INIT_MISSING = (None, "flashi2v")


def load_checkpoint(path, cfg: Optional[DiTConfig] = None, *, dtype: Optional[torch.dtype] = None, device="cpu",
                    init_missing: Optional[str] = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Read a checkpoint into a Wan-named parameter dict for ``cfg`` (default: the checkpoint's config.json).

    ``dtype`` casts floating tensors (None keeps the file's dtypes).  Raises ``CheckpointError`` listing all
    missing, unexpected and mis-shaped keys, and ``CheckpointError`` naming the file for an empty, truncated,
    foreign or inconsistent file (every safetensors header is checked before any tensor is read).  A legacy
    (non-zip) ``torch.save`` file is read without mmap, still with ``weights_only=True``.

    ``init_missing="flashi2v"`` (``cfg`` a FlashI2V config) accepts a text-to-video checkpoint: when the file
    lacks exactly the eight FlashI2V branch tensors (``params.FLASHI2V_BRANCH_KEYS``), they are created by
    ``add_flashi2v_branches`` (seed 0; zero output at initialisation, so the model equals the T2V model).  A
    file holding some branch tensors but not all, or lacking any other key, still raises.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_checkpoint: path must be a str or os.PathLike, got {type(path).__name__}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"load_checkpoint: dtype must be a floating torch.dtype or None, got {dtype!r}")
    if cfg is not None and not isinstance(cfg, DiTConfig):
        raise TypeError(f"load_checkpoint: cfg must be a DiTConfig or None, got {type(cfg).__name__}")
    if init_missing not in INIT_MISSING:
        raise ValueError(f"load_checkpoint: init_missing must be one of {INIT_MISSING}, got {init_missing!r}")
    path = Path(path)
    files, kind = _resolve_files(path)
    if cfg is None:
        cfg = load_config(path)
    if init_missing == "flashi2v" and cfg.i2v != "flashi2v":
        raise ValueError(f"load_checkpoint: init_missing='flashi2v' needs a FlashI2V cfg (i2v='flashi2v'), got i2v={cfg.i2v!r}")
    expected = param_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    unexpected, misshaped = [], []

    def take(name, shape, reader, fmt):
        key = _strip_wrappers(name)
        if fmt == "diffusers":
            key = _DIFFUSERS_ALIASES.get(key, key)
            new = _convert_name(key, _rename_table("diffusers", "wan"))
        else:
            new = key
        if new is None or new not in expected:
            unexpected.append(name)
            return
        if tuple(shape) != expected[new]:
            misshaped.append(f"{name}: checkpoint {tuple(shape)} vs model {expected[new]}")
            return
        out[new] = reader()

    if kind == "safetensors":
        headers, seen = [], {}
        for file in files:  # every header first: a bad shard fails before any tensor is read
            entries, base = _safetensors_entries(file)
            for e in entries:
                if e[0] in seen:
                    raise CheckpointError(f"load_checkpoint({path}): tensor {e[0]!r} is in both {seen[e[0]]} and {file}")
                seen[e[0]] = file
            headers.append((file, entries, base))
        del seen
        fmt = detect_format(e[0] for _, entries, _ in headers for e in entries)
        for file, entries, base in headers:  # one shard open at a time, one tensor in flight at a time
            with open(file, "rb") as f:
                for name, shape, dt, start, end in entries:
                    target = dtype if (dtype is not None and dt.is_floating_point) else None
                    take(name, shape, lambda a=(f, base, start, end, dt, shape, target): _read_tensor(*a, device), fmt)
    else:
        sd = _torch_state_dict(files[0]) if kind == "torch" else _dcp_state_dict(files[0])
        fmt = detect_format(sd)
        for name in list(sd):
            t = sd.pop(name)
            target = dtype if (dtype is not None and t.dtype.is_floating_point) else t.dtype
            take(name, t.shape, lambda t=t, target=target: t.to(device=device, dtype=target, copy=True), fmt)
        del sd
    missing = sorted(set(expected) - set(out))
    if init_missing == "flashi2v" and not unexpected and not misshaped and set(missing) == set(FLASHI2V_BRANCH_KEYS):
        return add_flashi2v_branches(out, cfg, seed=0)
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:30]}{' ...' if len(missing) > 30 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {sorted(unexpected)[:30]}{' ...' if len(unexpected) > 30 else ''}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {misshaped[:30]}")
        hint = ""
        if init_missing is None and not unexpected and not misshaped and set(missing) == set(FLASHI2V_BRANCH_KEYS):
            hint = (" (a text-to-video checkpoint: pass init_missing='flashi2v' to create the FlashI2V branches with their "
                    "zero-output initialisation)")  # fmt: skip
        raise CheckpointError(f"load_checkpoint({path}): keys do not match {cfg_name(cfg)}: " + "; ".join(parts) + hint)
    return out


def checkpoint_shapes(path) -> dict[str, tuple[int, ...]]:
    """The tensor names (converted to Wan names when the file uses diffusers names; wrapper prefixes stripped)
    and shapes of a checkpoint ``load_checkpoint`` reads, without reading its tensor data: safetensors headers
    (checked as ``load_checkpoint`` checks them), a DCP directory's metadata, a ``.pt``'s state dict through a
    memory map.  Names no rule knows are returned as they are.  Used to recognise a checkpoint (FlashI2V
    branches present or not, their kernel size) before loading it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint_shapes: path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    files, kind = _resolve_files(path)
    raw: dict[str, tuple[int, ...]] = {}
    if kind == "safetensors":
        for file in files:
            entries, _ = _safetensors_entries(file)
            raw.update({name: tuple(shape) for name, shape, *_ in entries})
    elif kind == "torch":
        raw = {k: tuple(v.shape) for k, v in _torch_state_dict(files[0]).items()}
    else:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        md = read_dcp_metadata(files[0])
        nesting = md.planner_data if isinstance(md.planner_data, dict) else {}
        for fqn, meta in md.state_dict_metadata.items():
            if isinstance(meta, TensorStorageMetadata):
                keys = nesting.get(fqn, (fqn,))
                # a {"model": state_dict} save is opened as load_checkpoint opens it (_unwrap_state_dict)
                nested = isinstance(keys, (tuple, list)) and len(keys) == 2 and keys[0] in ("model", "state_dict", "module")
                raw[str(keys[1]) if nested else fqn] = tuple(meta.size)
    fmt = detect_format(raw)
    table = _rename_table("diffusers", "wan") if fmt == "diffusers" else None
    out = {}
    for name, shape in raw.items():
        key = _strip_wrappers(name)
        if table is not None:
            key = _DIFFUSERS_ALIASES.get(key, key)
            key = _convert_name(key, table) or key
        out[key] = shape
    return out


def cfg_name(cfg: DiTConfig) -> str:
    return f"DiTConfig(dim={cfg.dim}, num_layers={cfg.num_layers}, i2v={cfg.i2v!r})"


# ----------------------------------------------------------------------------------------------------------
# writing


def _atomic_save_safetensors(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def save_checkpoint(
    params: dict[str, torch.Tensor],
    path,
    *,
    cfg: Optional[DiTConfig] = None,
    layout: str = "wan",
    max_shard_bytes: Optional[int] = None,
) -> Path:
    """Write ``params`` as safetensors (Wan names by default, ``layout="diffusers"`` to convert).

    ``path`` ending in ``.safetensors`` writes one file; otherwise ``path`` is a directory receiving
    ``diffusion_pytorch_model.safetensors`` or, with ``max_shard_bytes``, shards + ``*.index.json``, and
    ``config.json`` when ``cfg`` is given.  Every file is written to a temporary name and renamed.
    """
    sd = convert_state_dict(params, "wan", layout) if layout != "wan" else dict(params)
    path = Path(path)
    if path.suffix == ".safetensors":
        _atomic_save_safetensors(sd, path, {"format": "pt", "ospfn_layout": layout})
        return path
    path.mkdir(parents=True, exist_ok=True)
    stem = "diffusion_pytorch_model"
    if max_shard_bytes is None:
        _atomic_save_safetensors(sd, path / f"{stem}.safetensors", {"format": "pt", "ospfn_layout": layout})
    else:
        shards, cur, size = [], {}, 0
        for k in sorted(sd):
            nb = sd[k].numel() * sd[k].element_size()
            if cur and size + nb > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = sd[k]
            size += nb
        if cur:
            shards.append(cur)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save_safetensors(shard, path / name, {"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        write_text_atomic(path / f"{stem}.safetensors.index.json", json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if cfg is not None:
        write_text_atomic(path / "config.json", json.dumps(cfg.to_dict(), indent=2))
    return path


