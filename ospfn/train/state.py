"""Training checkpoints: everything needed to resume exactly, written atomically.

A checkpoint is a directory ``ckpt-<step>/`` with ``model.safetensors`` (trainable parameters),
``ema.safetensors`` (EMA weights) and ``state.pt`` (optimizer, gradient-clipping statistics, data position,
RNG states, step, anything else the recipe adds; read back with ``torch.load(weights_only=True)``).  It is
assembled in a temporary directory and renamed into place, then ``latest`` is rewritten atomically, so a
crash at any point leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ospfn._fs import write_text_atomic

__all__ = ["save_train_state", "load_train_state", "latest_checkpoint"]




def save_train_state(
    out_dir,
    step: int,
    *,
    params: dict[str, torch.Tensor],
    ema: Optional[dict[str, torch.Tensor]] = None,
    state: Optional[dict] = None,
    keep: int = 2,
) -> Path:
    """Write ``ckpt-<step>`` under ``out_dir`` atomically; keep the newest ``keep`` checkpoints."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"ckpt-{step:08d}"
    tmp = out_dir / f".ckpt-{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, tmp / "model.safetensors")
        if ema is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
        torch.save({"step": step, **(state or {})}, tmp / "state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(out_dir / "latest", final.name + "\n")
    ckpts = sorted(p for p in out_dir.glob("ckpt-*") if p.is_dir())
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir) -> Optional[Path]:
    """The checkpoint named by ``out_dir/latest`` (or the newest ``ckpt-*``), None if there is none."""
    out_dir = Path(out_dir)
    marker = out_dir / "latest"
    if marker.exists():
        p = out_dir / marker.read_text().strip()
        if p.is_dir():
            return p
    ckpts = sorted(p for p in out_dir.glob("ckpt-*") if p.is_dir())
    return ckpts[-1] if ckpts else None


def load_train_state(path) -> dict:
    """{"params", "ema" (or None), "state"} of a checkpoint directory (or of the latest one in a run dir)."""
    path = Path(path)
    if not (path / "state.pt").exists():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"load_train_state: no checkpoint in {path} (expected ckpt-*/state.pt or a 'latest' file)")
        path = found
    return {
        "path": path,
        "params": load_file(path / "model.safetensors"),
        "ema": load_file(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None,
        "state": torch.load(path / "state.pt", weights_only=True),
    }
