"""Atomic file writes: write a temporary file next to the target, then rename it into place.

A reader never sees a half-written file and a crash leaves the previous version intact.  Temporary files get
the permissions a plain ``open(path, "w")`` would give (``tempfile.mkstemp`` alone creates them 0600).

A temporary is named ``.<name>.tmp-<pid>.<random><suffix>`` after the process writing it, so that a later run can
tell the leftovers of a killed writer (``stale_temporaries``) from the files a live writer is still producing.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

# .<name>.tmp-<pid>.<8 random chars from tempfile><suffix>
_ATOMIC_TMP = re.compile(r"^\..+\.tmp-(?P<pid>\d+)\.[a-z0-9_]{8}(\.\w+)?$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the current umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path, *, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path in ``path``'s directory; on success rename it to ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())  # after writing: some writers replace the file they are given
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie (``os.kill(pid, 0)`` semantics).

    Our own pid is alive; a pid owned by another user is alive (``EPERM``).  A process on another host that
    shares the file system cannot be seen: its pid is judged on this host.
    """
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # larger than any pid_t
        return False
    try:  # a killed child its parent has not waited for yet is dead for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def stale_temporaries(directory) -> list[Path]:
    """The ``atomic_path`` temporaries in ``directory`` whose writer is dead (not removed), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for p in directory.iterdir():
        m = _ATOMIC_TMP.match(p.name)
        if m and p.is_file() and not p.is_symlink() and not pid_alive(int(m.group("pid"))):
            out.append(p)
    return sorted(out)
