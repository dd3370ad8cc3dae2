"""Atomic writes: the old file survives a failed write, no temporary is left behind, permissions follow umask."""

import os
import stat

import pytest
import torch

from ospfn._fs import atomic_path, write_text_atomic
from ospfn.io import write_strip_png


def test_failed_write_keeps_previous_version(tmp_path):
    target = tmp_path / "state.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        write_strip_png(tmp_path / "b.png", torch.zeros(3, 2, 4, 4))
    finally:
        os.umask(old)
    for name in ("a.txt", "b.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
