"""Distributed execution on torch.distributed: Sparse Sequence Parallelism (SSP), Ulysses, accounting.

* ``ParallelConfig`` / ``init_parallel``: (dp, skiparse_sp, sp) groups from the torchrun environment.
* ``ospfn.model.forward(..., parallel=state)`` runs the same model on the SP group: Skiparse blocks keep whole
  sub-sequences per rank and re-lay-out the stream with ONE all-to-all (``relayout``); full blocks use
  Ulysses (``ulysses_attention``, four all-to-alls, heads padded when they do not divide the group).
* ``comm_stats()``: calls and bytes per collective kind, so the 4 -> 1 claim is measured.
* ``agree(ok, message)``: a failure only some ranks see is raised with the same message on every rank.
"""

from ospfn.parallel.comm import CommStats, agree, all_gather_seq, all_reduce_max, all_to_all, comm_stats, comm_tag, replicated_grad
from ospfn.parallel.layout import layout_ids, local_rows_of, relayout
from ospfn.parallel.mesh import ParallelConfig, ParallelState, check_model_parallel, init_parallel
from ospfn.parallel.ulysses import ulysses_attention

__all__ = [
    "ParallelConfig",
    "ParallelState",
    "init_parallel",
    "check_model_parallel",
    "comm_stats",
    "comm_tag",
    "CommStats",
    "all_to_all",
    "all_gather_seq",
    "all_reduce_max",
    "replicated_grad",
    "agree",
    "relayout",
    "layout_ids",
    "local_rows_of",
    "ulysses_attention",
    "sum_sp_grads",
]


def sum_sp_grads(params, state) -> None:
    """All-reduce (sum) the gradients of replicated parameters over the SP group: under sequence parallelism
    each rank's gradient covers its own tokens only.  ``params``: an iterable of tensors, a dict of them, or an
    object with a ``parameters()`` method (an ``nn.Module``, an ``ospfn.lora.LoraAdapter``: an adapter is
    replicated over the SP ranks like the base parameters).  Tensors without a gradient are skipped."""
    from collections.abc import Mapping

    import torch.distributed as dist

    if state.sp_size == 1:
        return
    if callable(getattr(params, "parameters", None)):
        params = params.parameters()
    elif isinstance(params, Mapping):
        params = params.values()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=state.sp_group)
