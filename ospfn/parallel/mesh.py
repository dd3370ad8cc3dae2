"""Parallel configuration and process groups: data parallel x Skiparse SP (S) x Ulysses SP (U).

Ranks are laid out as a (dp, skiparse_sp, sp) mesh with sp innermost: rank = d*S*U + s*U + u.  The
sequence-parallel (SP) group of a data-parallel replica is its S*U ranks; its Skiparse group (fixed u) has
S ranks, its Ulysses group (fixed s) U ranks.  Everything comes from torchrun's standard environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    >>> from ospfn.parallel import ParallelConfig
    >>> ParallelConfig(skiparse_sp=2, ulysses_sp=1).sp_size
    2
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["ParallelConfig", "ParallelState", "init_parallel", "check_model_parallel", "launch_device"]


@dataclass(frozen=True)
class ParallelConfig:
    """``skiparse_sp`` = S (shards the P^2 Skiparse slots; must divide P^2), ``ulysses_sp`` = U (shards
    sequences and exchanges heads; any size: head counts that do not divide it are padded)."""

    skiparse_sp: int = 1
    ulysses_sp: int = 1

    def __post_init__(self):
        for name in ("skiparse_sp", "ulysses_sp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ParallelConfig: {name} must be a positive int, got {v!r}")

    @property
    def sp_size(self) -> int:
        return self.skiparse_sp * self.ulysses_sp


@dataclass
class ParallelState:
    config: ParallelConfig
    world: int
    rank: int
    dp: int
    dp_rank: int
    sp_group: Optional[object]  # the S*U ranks of this data-parallel replica
    sp_rank: int  # s*U + u
    skiparse_group: Optional[object]
    s_rank: int
    ulysses_group: Optional[object]
    u_rank: int
    device: torch.device

    @property
    def S(self) -> int:
        return self.config.skiparse_sp

    @property
    def U(self) -> int:
        return self.config.ulysses_sp

    @property
    def sp_size(self) -> int:
        return self.config.sp_size

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "ParallelState":
        """The trivial mesh of one process (no groups): the model's single-process path."""
        return cls(ParallelConfig(), 1, 0, 1, 0, None, 0, None, 0, None, 0, torch.device(device))

    def tag(self, tag: str):
        """``comm_tag(tag)`` on a real mesh; nothing on the trivial one (no collectives to label)."""
        if self.sp_size == 1:
            return contextlib.nullcontext()
        from ospfn.parallel.comm import comm_tag

        return comm_tag(tag)


_BACKEND_OF = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def _npu_available() -> bool:
    """An Ascend NPU this process can use: ``torch_npu`` imports and reports a device."""
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ImportError:
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def launch_device(device: Optional[str] = None) -> tuple[str, str]:
    """(device type, process-group backend) of a launch: ``cuda`` + nccl when CUDA is available, else ``npu`` +
    hccl when ``torch_npu`` imports and has a device, else ``cpu`` + gloo.  An explicit ``device`` ("cpu",
    "cuda" or "npu") is checked against the machine (``ValueError`` before any process group exists)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else ("npu" if _npu_available() else "cpu")
    if device not in _BACKEND_OF:
        raise ValueError(f"init_parallel: device must be one of {sorted(_BACKEND_OF)} (a device type), got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("init_parallel: device 'cuda' requested but CUDA is not available here (torch.cuda.is_available() is False)")
    if device == "npu" and not _npu_available():
        raise ValueError("init_parallel: device 'npu' requested but no NPU is available (torch_npu missing or no device)")
    return device, _BACKEND_OF[device]


def world_from_env(default: Optional[int] = None, *, where: str = "init_parallel") -> int:
    """torchrun's ``WORLD_SIZE`` as a positive int (``default`` when unset; without a default an unset
    variable is a ``RuntimeError``); a malformed value is a ``ValueError`` naming ``where``."""
    text = os.environ.get("WORLD_SIZE")
    if text is None:
        if default is not None:
            return default
        raise RuntimeError(f"{where}: torch.distributed is not initialised and WORLD_SIZE is unset; launch with torchrun")
    try:
        world = int(text)
    except ValueError:
        world = 0
    if world < 1:
        raise ValueError(f"{where}: WORLD_SIZE must be a positive int (set by torchrun), got {text!r}")
    return world


def _check_world(world: int, config: ParallelConfig) -> None:
    S, U = config.skiparse_sp, config.ulysses_sp
    if world % (S * U):
        raise ValueError(
            f"init_parallel: world size {world} is not a multiple of skiparse_sp * ulysses_sp = {S} * {U} = {S * U}"
        )


def init_parallel(config: ParallelConfig, *, backend: Optional[str] = None, device: Optional[str] = None) -> ParallelState:
    """Initialise torch.distributed from the torchrun environment (if needed) and build the groups.

    The device comes from the launch (``launch_device``): cuda + nccl on CUDA machines (rank r on
    cuda:LOCAL_RANK), npu + hccl when ``torch_npu`` is present with a device, cpu + gloo otherwise; ``device``
    ("cpu", "cuda", "npu") overrides it.  With a process group already initialised, the device follows its
    backend.  Raises ``ValueError`` (the same message on every rank, before any collective) when the world size
    is not a multiple of S*U or the device cannot be used.
    """
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"init_parallel: config must be a ParallelConfig, got {type(config).__name__}")
    if not dist.is_initialized():
        _check_world(world_from_env(), config)  # before the rendezvous: every rank sees the same environment
        device, default_backend = launch_device(device)
        backend = backend or default_backend
        dist.init_process_group(backend)
    elif device is not None:
        device, _ = launch_device(device)
    world, rank = dist.get_world_size(), dist.get_rank()
    _check_world(world, config)
    S, U = config.skiparse_sp, config.ulysses_sp
    if device is None:
        device = {"nccl": "cuda", "hccl": "npu"}.get(dist.get_backend(), "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
        torch.cuda.set_device(dev)
    elif dev.type == "npu":
        dev = torch.device("npu", int(os.environ.get("LOCAL_RANK", rank % max(1, torch.npu.device_count()))))
        torch.npu.set_device(dev)
    SU = S * U
    dp = world // SU
    d, rem = divmod(rank, SU)
    s, u = divmod(rem, U)
    # every rank creates every group, in the same order
    sp_group = skiparse_group = ulysses_group = None
    for dd in range(dp):
        g = dist.new_group([dd * SU + i for i in range(SU)])
        if dd == d:
            sp_group = g
        for uu in range(U):
            g = dist.new_group([dd * SU + ss * U + uu for ss in range(S)])
            if dd == d and uu == u:
                skiparse_group = g
        for ss in range(S):
            g = dist.new_group([dd * SU + ss * U + uu for uu in range(U)])
            if dd == d and ss == s:
                ulysses_group = g
    return ParallelState(config, world, rank, dp, d, sp_group, rem, skiparse_group, s, ulysses_group, u, dev)


def check_model_parallel(cfg, state: ParallelState, grid: tuple[int, int, int]) -> None:
    """Raise ``ValueError`` if ``cfg`` at token ``grid`` cannot run under ``state`` (identical on every rank)."""
    from ospfn.ops import skiparse_layout

    S, U = state.S, state.U
    P = cfg.sparse_ratio
    sparse = cfg.skiparse_model_type == "dual_end" and P > 1
    if S > 1 and sparse and (P * P) % S:
        raise ValueError(f"skiparse_sp = {S} must divide sparse_ratio^2 = {P * P} (each rank keeps whole Skiparse sub-sequences)")
    if S > 1 and not sparse:
        raise ValueError(f"skiparse_sp = {S} needs a Skiparse model (skiparse_model_type='dual_end', sparse_ratio > 1)")
    T, H, W = grid
    N = T * H * W
    W_sp = S * U
    if N % W_sp:
        raise ValueError(f"the token grid {grid} ({N} tokens) cannot be split into skiparse_sp * ulysses_sp = {W_sp} equal sequence shards")
    if sparse:
        L = skiparse_layout(grid, P).seq
        if L % U:
            raise ValueError(f"Skiparse sub-sequences of {L} tokens (grid {grid}, ratio {P}) cannot be split into ulysses_sp = {U} equal shards")
