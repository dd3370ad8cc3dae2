"""Run a function on N gloo ranks (loopback) in spawned processes, with a hard timeout.

``run_ranks(fn, world, *args)`` calls ``fn(rank, world, *args)`` in each process after
``init_process_group("gloo")`` and returns the list of per-rank return values (pickled through files).
An exception on any rank is re-raised here with that rank's traceback; a hang is killed after ``timeout``.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, outdir, fn, args):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = None
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = ("ok", fn(rank, world, *args))
    except BaseException as e:  # report, do not hang the others
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn, world: int, *args, timeout: float = 240.0):
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = _free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, outdir, fn, args), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        if alive:
            raise TimeoutError(f"{len(alive)} of {world} ranks did not finish within {timeout} s (hang?)")
        results = []
        for r in range(world):
            path = os.path.join(outdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            with open(path, "rb") as f:
                results.append(pickle.load(f))
    errors = [(r, msg) for r, (status, msg) in enumerate(results) if status == "error"]
    if errors:
        raise RuntimeError("\n".join(f"rank {r}: {msg}" for r, msg in errors))
    return [v for _, v in results]
