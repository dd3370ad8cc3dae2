"""Checkpoints: Wan2.1 original, diffusers ``WanTransformer3DModel``, OSP-Next FSDP/DCP and FlashI2V files.

Parameters inside ospfn always carry the Wan2.1 original names.  ``load_checkpoint`` reads

* a ``.safetensors`` file, a sharded set (``*.safetensors.index.json``) or a directory holding either;
* a ``.pt`` / ``.pth`` / ``.bin`` state dict, only through ``torch.load(weights_only=True)`` (pickled code in a
  checkpoint is never executed), with wrapper prefixes (``module.``, ``_orig_mod.``, ``_fsdp_wrapped_module.``,
  ``_checkpoint_wrapped_module.``) stripped -- the OSP-Next ``model.pt`` release;
* a torch.distributed.checkpoint (DCP) directory (``.metadata`` inside);

in Wan or diffusers naming (detected from the keys), converts names, checks every shape against the config,
and reports all missing / unexpected / mis-shaped keys in one error.  Safetensors shards are read one tensor
at a time straight into the destination buffer (no mmap, no second copy of a shard), so loading a 28 GB
checkpoint needs ~28 GB, not 56.

``save_checkpoint`` writes safetensors atomically (temporary file + rename), optionally sharded with an index.
"""

from __future__ import annotations

import json
import re
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch

from ospfn._fs import atomic_path, write_text_atomic
from ospfn.model.config import DiTConfig
from ospfn.model.params import param_shapes

__all__ = ["convert_state_dict", "load_checkpoint", "save_checkpoint", "load_config", "detect_format", "CheckpointError"]

FORMATS = ("wan", "diffusers", "osp-next", "flashi2v")
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")


class CheckpointError(ValueError):
    """Keys of a checkpoint do not match the model (lists every missing, unexpected and mis-shaped key)."""


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


def _safetensors_header(f) -> tuple[dict, int]:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > 100 * 2**20:
        raise CheckpointError(f"{getattr(f, 'name', 'file')}: implausible safetensors header of {n} bytes")
    header = json.loads(f.read(n))
    return header, 8 + n


def _safetensors_entries(path: Path) -> tuple[list[tuple[str, torch.Size, torch.dtype, int, int]], int]:
    """[(name, shape, dtype, start, end)] in file order, and the data base offset."""
    with open(path, "rb") as f:
        header, base = _safetensors_header(f)
    header.pop("__metadata__", None)
    out = []
    for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if meta["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        out.append((name, torch.Size(meta["shape"]), _ST_DTYPES[meta["dtype"]], start, end))
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


def _resolve_files(path: Path) -> tuple[list[Path], str]:
    """The weight files of a checkpoint path and their kind ("safetensors" | "torch" | "dcp")."""
    if path.is_dir():
        if (path / ".metadata").exists():
            return [path], "dcp"
        idx = sorted(path.glob("*.safetensors.index.json"))
        if idx:
            return _resolve_files(idx[0])
        st = sorted(path.glob("*.safetensors"))
        if st:
            return st, "safetensors"
        pt = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".bin"))
        if len(pt) == 1:
            return pt, "torch"
        raise FileNotFoundError(f"load_checkpoint: {path} holds no *.safetensors, index json, single .pt/.pth or DCP checkpoint")
    if not path.exists():
        raise FileNotFoundError(f"load_checkpoint: no such file or directory: {path}")
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        files = sorted({path.parent / f for f in index["weight_map"].values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"load_checkpoint: shards listed in {path} are missing: {missing}")
        return files, "safetensors"
    if path.suffix == ".safetensors":
        return [path], "safetensors"
    if path.suffix in (".pt", ".pth", ".bin"):
        return [path], "torch"
    raise ValueError(f"load_checkpoint: unknown checkpoint type {path.suffix!r} ({path}); expected .safetensors, an index json, .pt/.pth/.bin or a directory")


def _torch_state_dict(path: Path) -> dict:
    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    # common wrappings: {"model": sd}, {"state_dict": sd}, {"module": sd}, {"ema": ...}
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict) and all(isinstance(v, torch.Tensor) for v in sd[key].values()):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _dcp_state_dict(path: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.pt"
        dcp_to_torch_save(str(path), str(out))
        return _torch_state_dict(out)


def load_config(path) -> DiTConfig:
    """The DiTConfig of a checkpoint directory (or a config.json file)."""
    p = Path(path)
    cfg_file = p if p.suffix == ".json" and p.name == "config.json" else (p if p.is_dir() else p.parent) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"load_config: no config.json at {cfg_file}; pass cfg explicitly")
    return DiTConfig.from_dict(json.loads(cfg_file.read_text()))


def load_checkpoint(path, cfg: Optional[DiTConfig] = None, *, dtype: Optional[torch.dtype] = None, device="cpu") -> dict[str, torch.Tensor]:
    """Read a checkpoint into a Wan-named parameter dict for ``cfg`` (default: the checkpoint's config.json).

    ``dtype`` casts floating tensors (None keeps the file's dtypes).  Raises ``CheckpointError`` listing all
    missing, unexpected and mis-shaped keys.
    """
    path = Path(path)
    files, kind = _resolve_files(path)
    if cfg is None:
        cfg = load_config(path)
    if not isinstance(cfg, DiTConfig):
        raise TypeError(f"load_checkpoint: cfg must be a DiTConfig or None, got {type(cfg).__name__}")
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
        fmt = None
        for file in files:  # one shard open at a time, one tensor in flight at a time
            entries, base = _safetensors_entries(file)
            if fmt is None:
                fmt = detect_format(e[0] for e in entries)
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
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {missing[:30]}{' ...' if len(missing) > 30 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {sorted(unexpected)[:30]}{' ...' if len(unexpected) > 30 else ''}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {misshaped[:30]}")
        raise CheckpointError(f"load_checkpoint({path}): keys do not match {cfg_name(cfg)}: " + "; ".join(parts))
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


