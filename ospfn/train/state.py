"""Training checkpoints: everything needed to resume exactly, written atomically.

A checkpoint is a directory ``ckpt-<step>/`` with ``model.safetensors`` (trainable parameters),
``ema.safetensors`` (EMA weights) and ``state.pt`` (optimizer, gradient-clipping statistics, data position,
RNG states, step, anything else the recipe adds; read back with ``torch.load(weights_only=True)``).  It is
assembled in a temporary directory ``.ckpt-<step>.tmp-<pid>`` and renamed into place, then ``latest`` is
rewritten atomically, so a crash at any point leaves the previous checkpoint intact.  Every file gets the
permissions of a plain ``open(path, "w")`` (0644 under umask 022).

A killed writer leaves its temporary directory behind; ``sweep_stale_temporaries`` (called by
``save_train_state`` and on start / resume) removes those whose writer process is dead, never a live one's.
Reading (``load_train_state``, ``latest_checkpoint``) raises ``CheckpointError`` naming the file for a
truncated, empty or foreign file, a ``latest`` pointer that names no checkpoint, or an incomplete directory.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from ospfn._fs import default_file_mode, pid_alive, stale_temporaries, write_text_atomic
from ospfn.model.checkpoint import CheckpointError, CheckpointMissingError, read_safetensors, torch_load

__all__ = ["install_checkpoint", "save_train_state", "load_train_state", "latest_checkpoint", "sweep_stale_temporaries"]

_CKPT = re.compile(r"^ckpt-\d+$")
_TMP = re.compile(r"^\.ckpt-\d+\.(?:tmp|old)-(?P<pid>\d+)$")  # temporary (being written) / replaced (being removed)


def _checkpoints(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob("ckpt-*") if _CKPT.match(p.name) and p.is_dir())


def sweep_stale_temporaries(out_dir) -> list[Path]:
    """Remove what killed writers left in ``out_dir``: ``.ckpt-<step>.tmp-<pid>`` directories (and
    ``.ckpt-<step>.old-<pid>`` ones, a checkpoint being replaced) whose ``pid`` is not a live process, and the
    temporaries of atomic file writes (``ospfn._fs.atomic_path``) of dead writers in ``out_dir`` and its
    direct subdirectories (e.g. an interrupted pipeline export).  A live process's temporaries, our own
    included, stay.  Returns the removed paths, sorted; a missing ``out_dir`` is nothing to sweep.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    removed = []
    for p in sorted(out_dir.iterdir()):
        m = _TMP.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not pid_alive(int(m.group("pid"))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for d in [out_dir] + sorted(p for p in out_dir.iterdir() if p.is_dir() and not p.is_symlink() and not _TMP.match(p.name)):
        for f in stale_temporaries(d):
            try:
                f.unlink()
                removed.append(f)
            except FileNotFoundError:  # another sweeper got there first
                pass
    return sorted(removed)


def _fsync_and_chmod(path: Path, mode: int) -> None:
    os.chmod(path, mode)  # safetensors' writer creates files 0600
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def install_checkpoint(tmp: Path, final: Path) -> None:
    """Rename the finished temporary checkpoint directory ``tmp`` to ``final`` (``<out_dir>/ckpt-<step>``).
    Re-saving a step moves the old directory aside first (``.ckpt-<step>.old-<pid>``, swept if we die before
    removing it), so at every instant one complete checkpoint of that step exists."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def save_train_state(
    out_dir,
    step: int,
    *,
    params: dict[str, torch.Tensor],
    ema: Optional[dict[str, torch.Tensor]] = None,
    state: Optional[dict] = None,
    keep: int = 2,
) -> Path:
    """Write ``ckpt-<step>`` under ``out_dir`` atomically; keep the newest ``keep`` checkpoints.

    Stale temporaries of killed writers are swept first (``sweep_stale_temporaries``).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"save_train_state: step must be an int >= 0, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"save_train_state: keep must be an int >= 1 (the checkpoint just written is kept), got {keep!r}")
    for name, d in (("params", params), ("ema", ema), ("state", state)):
        if d is not None and not isinstance(d, dict):
            raise TypeError(f"save_train_state: {name} must be a dict, got {type(d).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(out_dir)
    final = out_dir / f"ckpt-{step:08d}"
    tmp = out_dir / f".ckpt-{step:08d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    mode = default_file_mode()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, tmp / "model.safetensors")
        if ema is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
        torch.save({"step": step, **(state or {})}, tmp / "state.pt")
        for f in tmp.iterdir():
            _fsync_and_chmod(f, mode)
        install_checkpoint(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(out_dir / "latest", final.name + "\n")
    ckpts = _checkpoints(out_dir)
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir) -> Optional[Path]:
    """The checkpoint named by ``out_dir/latest`` (or, without one, the newest ``ckpt-*``), None if there is none.

    A ``latest`` that does not name an existing ``ckpt-<step>`` directory of ``out_dir`` raises
    ``CheckpointError`` (a subclass of it when the directory is missing): it is never silently passed over.
    """
    out_dir = Path(out_dir)
    marker = out_dir / "latest"
    if marker.is_file():
        try:
            name = marker.read_bytes().decode("utf-8").strip()
        except UnicodeDecodeError:
            name = None
        if name is None or not _CKPT.match(name):
            shown = "binary data" if name is None else repr(name[:80])
            raise CheckpointError(f"latest_checkpoint: {marker} must hold the name of a ckpt-<step> directory in {out_dir}, got {shown}")
        p = out_dir / name
        if not p.is_dir():
            found = [c.name for c in _checkpoints(out_dir)]
            raise CheckpointMissingError(f"latest_checkpoint: {marker} names {name}, which is not a directory in {out_dir} "
                                         f"(checkpoints there: {found or 'none'}); pass one of them explicitly")  # fmt: skip
        return p
    ckpts = _checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def load_train_state(path) -> dict:
    """{"path", "params", "ema" (or None), "state"} of a checkpoint directory (or of the latest one in a run dir).

    Raises ``FileNotFoundError`` when ``path`` holds no checkpoint, ``CheckpointError`` naming the file when a
    checkpoint is incomplete (no ``model.safetensors``), a file is empty / truncated / not of its format, or
    ``state.pt`` is not a dict with an int ``step``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load_train_state: no such directory: {path}")
    if not path.is_dir():
        raise CheckpointError(f"load_train_state: {path} is a file; expected a checkpoint directory (ckpt-<step>) or a run directory")
    if not (path / "state.pt").exists():
        found = latest_checkpoint(path)
        if found is None:
            if (path / "model.safetensors").exists():
                raise CheckpointMissingError(f"load_train_state: {path} has model.safetensors but no state.pt: an incomplete checkpoint")
            raise FileNotFoundError(f"load_train_state: no checkpoint in {path} (expected ckpt-*/state.pt or a 'latest' file)")
        path = found
    missing = [n for n in ("model.safetensors", "state.pt") if not (path / n).is_file()]
    if missing:
        raise CheckpointMissingError(f"load_train_state: {path} lacks {missing}: an incomplete or foreign checkpoint directory")
    state = torch_load(path / "state.pt", mmap=False)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / 'state.pt'}: expected a dict of training state, got {type(state).__name__}")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path / 'state.pt'}: 'step' must be an int >= 0, got {step!r}")
    return {
        "path": path,
        "params": read_safetensors(path / "model.safetensors"),
        "ema": read_safetensors(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None,
        "state": state,
    }
