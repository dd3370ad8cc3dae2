"""Collectives used by ospfn's sequence parallelism, as autograd Functions, with communication accounting.

Every collective ospfn issues goes through this module, so ``comm_stats()`` can count calls and bytes per
collective kind (and per tag, e.g. the block that issued it): volume claims are measured, not asserted.

    >>> from ospfn.parallel import comm_stats
    >>> with comm_stats() as st:                 # doctest: +SKIP
    ...     forward(params, cfg, x, t, ctx, parallel=state)
    >>> st.calls("ssp"), st.bytes("ulysses")      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["CommStats", "comm_stats", "comm_tag", "all_to_all", "all_gather_seq", "all_reduce_max", "replicated_grad", "agree"]

_active: list["CommStats"] = []
_tag: contextvars.ContextVar[str] = contextvars.ContextVar("ospfn_comm_tag", default="")


@dataclass
class CommStats:
    """Per (kind, tag): number of calls, bytes this rank handed to the collective, bytes that left the rank."""

    records: dict = field(default_factory=lambda: defaultdict(lambda: {"calls": 0, "bytes": 0, "bytes_to_others": 0}))

    def add(self, kind: str, tag: str, nbytes: int, to_others: int) -> None:
        r = self.records[(kind, tag)]
        r["calls"] += 1
        r["bytes"] += nbytes
        r["bytes_to_others"] += to_others

    def _sum(self, field_: str, kind: Optional[str], tags) -> int:
        return sum(
            v[field_]
            for (k, t), v in self.records.items()
            if (kind is None or k == kind) and (tags is None or (t in tags if not callable(tags) else tags(t)))
        )

    def calls(self, kind: Optional[str] = None, tags=None) -> int:
        """Calls of ``kind`` (all kinds if None) whose tag is in ``tags`` (a set, or a predicate)."""
        return self._sum("calls", kind, tags)

    def bytes(self, kind: Optional[str] = None, tags=None) -> int:
        return self._sum("bytes", kind, tags)

    def bytes_to_others(self, kind: Optional[str] = None, tags=None) -> int:
        return self._sum("bytes_to_others", kind, tags)

    def summary(self) -> dict:
        out: dict = defaultdict(lambda: {"calls": 0, "bytes": 0, "bytes_to_others": 0})
        for (k, _), v in self.records.items():
            for f_, n in v.items():
                out[k][f_] += n
        return dict(out)


@contextlib.contextmanager
def comm_stats():
    """Record every ospfn collective issued inside the block (this rank's view)."""
    st = CommStats()
    _active.append(st)
    try:
        yield st
    finally:
        _active.remove(st)


@contextlib.contextmanager
def comm_tag(tag: str):
    """Label the collectives issued inside the block (e.g. "block7:token")."""
    tok = _tag.set(tag)
    try:
        yield
    finally:
        _tag.reset(tok)


def _record(kind: str, nbytes: int, to_others: int) -> None:
    if _active:
        tag = _tag.get()
        for st in _active:
            st.add(kind, tag, nbytes, to_others)


def _a2a(x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group, kind: str) -> torch.Tensor:
    """all_to_all_single along dim 0 with explicit split sizes (in rows)."""
    rank = dist.get_rank(group)
    row = x[0].numel() * x.element_size() if x.shape[0] else 0
    _record(kind, x.numel() * x.element_size(), (sum(send) - send[rank]) * row)
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(recv), input_split_sizes=list(send), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, recv, group, kind):
        ctx.send, ctx.recv, ctx.group, ctx.kind = send, recv, group, kind
        return _a2a(x, send, recv, group, kind)

    @staticmethod
    def backward(ctx, g):
        return _a2a(g, ctx.recv, ctx.send, ctx.group, ctx.kind + "_bwd"), None, None, None, None


def all_to_all(x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group, kind: str = "all_to_all") -> torch.Tensor:
    """Differentiable ``all_to_all_single`` on dim 0: row block i of ``x`` (``send[i]`` rows) goes to rank i;
    the result stacks the ``recv[j]`` rows received from each rank j.  The backward is the reverse exchange."""
    return _AllToAll.apply(x, tuple(int(s) for s in send), tuple(int(r) for r in recv), group, kind)


class _AllGatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        world = dist.get_world_size(group)
        ctx.rank, ctx.size = dist.get_rank(group), x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(world)]
        _record("all_gather", x.numel() * x.element_size(), x.numel() * x.element_size() * (world - 1))
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, g):
        # every rank of the group computes the same downstream loss, so each keeps the gradient of its own
        # slice; parameter gradients are then partial per rank and are summed over the group
        return g.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size).contiguous(), None, None


def all_gather_seq(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate equal shards along ``dim`` from every rank of ``group`` (differentiable, see backward)."""
    return _AllGatherSeq.apply(x, dim, group)


def all_reduce_max(x: torch.Tensor, group, kind: str = "all_reduce_max") -> torch.Tensor:
    """The element-wise MAX of ``x`` over ``group`` (a new tensor; not differentiable), accounted as ``kind``
    (the HiF8 quantisers use ``"amax"``)."""
    out = x.detach().clone()
    nbytes = out.numel() * out.element_size()
    _record(kind, nbytes, nbytes)
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


class _ReplicatedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        world = dist.get_world_size(ctx.group)
        _record("grad_allreduce", g.numel() * g.element_size(), g.numel() * g.element_size())
        dist.all_reduce(g, group=ctx.group)
        return g / world, None


def replicated_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Identity whose backward replaces this rank's partial gradient by the group mean of the partials.

    For a tensor computed identically on every rank of the SP group (e.g. text keys/values) whose gradient
    each rank only knows in part: ops upstream then see the full gradient / world size -- which a non-linear
    backward (HiF8 gradient quantisation, scale-invariant) needs to act like one process; summing parameter
    gradients over the group afterwards stays exact.
    """
    return _ReplicatedGrad.apply(x, group)


def agree(ok: bool, message: str = "", *, group=None, error: type[Exception] = RuntimeError) -> None:
    """Collective verdict on a step that may fail on some ranks only (a file one rank cannot read, a
    directory rank 0 cannot create): every rank of ``group`` says whether its part went well and, when any
    did not, every rank raises ``error("rank R: <message of R>")`` for the first failing rank R -- the same
    message everywhere, instead of one rank's exception and the others' "Connection closed by peer" (or a
    hang) at the next collective.  Nothing collective may run between the failure and this call.

    Without an initialised process group (or with one rank) it raises ``error(message)`` when not ``ok``.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        if not ok:
            raise error(message)
        return
    verdicts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(verdicts, (bool(ok), str(message)), group=group)
    failed = [(r, msg) for r, (good, msg) in enumerate(verdicts) if not good]
    if failed:
        rank, msg = failed[0]
        if group is not None:
            rank = dist.get_global_rank(group, rank)
        more = f" (and {len(failed) - 1} more rank{'s' if len(failed) > 2 else ''})" if len(failed) > 1 else ""
        raise error(f"rank {rank}: {msg}{more}")
