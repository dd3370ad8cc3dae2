"""Ulysses sequence parallelism: all-to-all from sequence shards to head shards, attention, and back.

Four all-to-alls per call (q, k, v in, output back), each of this rank's q size.  Head counts that do not
divide the group are padded with zero heads (their outputs are dropped), so Wan-1.3B's 12 heads run on 8
ranks -- an improvement over the reference, which required n_heads % U == 0.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ospfn.parallel.comm import all_to_all

__all__ = ["ulysses_attention"]


def _seq_to_heads(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """[B, n, Hp, D] (sequence shard) -> [B, world*n, Hp/world, D] (all tokens, head shard)."""
    B, n, Hp, D = x.shape
    h = Hp // world
    send = x.reshape(B, n, world, h, D).permute(2, 0, 1, 3, 4).reshape(world * B, n, h, D)
    recv = all_to_all(send, [B] * world, [B] * world, group, kind="ulysses")  # [world(src), B, n, h, D]
    return recv.view(world, B, n, h, D).permute(1, 0, 2, 3, 4).reshape(B, world * n, h, D)


def _heads_to_seq(x: torch.Tensor, world: int, group) -> torch.Tensor:
    """[B, world*n, h, D] (head shard) -> [B, n, world*h, D] (sequence shard)."""
    B, Nt, h, D = x.shape
    n = Nt // world
    send = x.reshape(B, world, n, h, D).permute(1, 0, 2, 3, 4).reshape(world * B, n, h, D)
    recv = all_to_all(send, [B] * world, [B] * world, group, kind="ulysses")  # [world(head block), B, n, h, D]
    return recv.view(world, B, n, h, D).permute(1, 2, 0, 3, 4).reshape(B, n, world * h, D)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group,
    key_mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention over the sequence sharded across ``group`` (this rank: [B, n, H, D] of each of q, k, v).

    ``key_mask`` covers the WHOLE sequence [B, world*n] (True = real key).  Returns this rank's [B, n, H, D].
    """
    from ospfn.ops import attention

    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        return attention(q, k, v, key_mask=key_mask, backend=backend)
    H = q.shape[2]
    Hp = -(-H // world) * world
    if Hp != H:
        pad = (0, 0, 0, Hp - H)
        q, k, v = (torch.nn.functional.pad(t, pad) for t in (q, k, v))
    qh, kh, vh = (_seq_to_heads(t, world, group) for t in (q, k, v))
    o = attention(qh, kh, vh, key_mask=key_mask, backend=backend)
    return _heads_to_seq(o, world, group)[:, :, :H]
