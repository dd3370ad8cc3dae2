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


def test_killed_writer_leaves_a_temporary_named_after_it(tmp_path):
    """SIGKILL inside ``atomic_path``: the temporary stays, is recognisably the dead writer's, and is the only thing
    ``stale_temporaries`` reports (also while the killed child is an unreaped zombie)."""
    import signal
    import subprocess
    import sys
    import time

    from ospfn._fs import pid_alive, stale_temporaries

    code = ("import sys, time; from ospfn._fs import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    open(tmp, 'w').write('half'); print(tmp, flush=True); time.sleep(60)\n")  # fmt: skip
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "latest")], stdout=subprocess.PIPE, text=True)
    tmp = p.stdout.readline().strip()
    assert f".latest.tmp-{p.pid}." in tmp
    (tmp_path / "other.txt").write_text("x")
    assert stale_temporaries(tmp_path) == [] and pid_alive(p.pid)  # a live writer's temporary is not stale
    os.kill(p.pid, signal.SIGKILL)
    for _ in range(100):  # not reaped yet: a zombie counts as dead
        if not pid_alive(p.pid):
            break
        time.sleep(0.05)
    assert not pid_alive(p.pid)
    assert [str(f) for f in stale_temporaries(tmp_path)] == [tmp]
    p.wait()
    p.stdout.close()
    assert [str(f) for f in stale_temporaries(tmp_path)] == [tmp]
    assert not (tmp_path / "latest").exists()


def test_pid_alive():
    from ospfn._fs import pid_alive

    assert pid_alive(os.getpid())
    assert not pid_alive(0) and not pid_alive(-5) and not pid_alive(2**62)
