"""Thin ``nn.Module`` shells over the functional DiT, for FSDP2 ``fully_shard``, ``torch.compile`` and PEFT.

The shells hold the same parameters as the functional dict -- ``named_parameters()`` yields exactly the Wan2.1
names of ``ospfn.model.param_shapes`` -- as real ``nn.Linear`` / ``nn.Conv3d`` modules where the parameter
is one, and call the pure functions of ``ospfn.model.dit``; they add no computation of their own.  Each block
is its own module (``model.blocks[i]``) whose forward runs that block, so ``fully_shard(model.blocks[i])``
gathers exactly that block's weights around its call.

    >>> import torch
    >>> from ospfn.model import DiTConfig
    >>> from ospfn.nn import DiT
    >>> net = DiT(DiTConfig.preset("tiny"))
    >>> sorted(n for n, _ in net.named_parameters())[:2]
    ['blocks.0.cross_attn.k.bias', 'blocks.0.cross_attn.k.weight']
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from ospfn.model import dit
from ospfn.model.config import DiTConfig
from ospfn.model.params import init_params, param_shapes

__all__ = ["DiT", "DiTBlock"]


class _Params(nn.Module):
    """A module that only holds parameters (norm weights, modulation tables)."""


class DiTBlock(nn.Module):
    """One DiT block; ``forward`` runs ``ospfn.model.dit._block`` on this module's parameters."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, x, e0, ctx, _params, cfg, i, rope, mask, batch, rt, rows="same"):
        prefix = f"blocks.{self.index}."
        own = {prefix + n: p for n, p in self.named_parameters()}
        return dit._block(x, e0, ctx, own, cfg, i, rope, mask, batch, rt, rows)


def _make_leaf(leaves: dict[str, tuple[int, ...]]) -> nn.Module:
    w = leaves.get("weight")
    if set(leaves) == {"weight", "bias"} and len(w) == 2:
        return nn.Linear(w[1], w[0], bias=True)
    if set(leaves) == {"weight", "bias"} and len(w) == 5:
        return nn.Conv3d(w[1], w[0], kernel_size=tuple(w[2:]), bias=True)
    m = _Params()
    for name, shape in leaves.items():
        m.register_parameter(name, nn.Parameter(torch.empty(shape)))
    return m


class DiT(nn.Module):
    """Module form of the DiT.  ``DiT(cfg)`` initialises like ``init_params``; ``DiT(cfg, params)`` wraps
    existing tensors (no copy: the module's parameters ARE those tensors)."""

    def __init__(self, cfg: DiTConfig, params: Optional[dict[str, torch.Tensor]] = None, *, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device="cpu") -> None:  # fmt: skip
        super().__init__()
        if not isinstance(cfg, DiTConfig):
            raise TypeError(f"DiT: cfg must be a DiTConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        shapes = param_shapes(cfg)
        groups: dict[str, dict[str, tuple]] = defaultdict(dict)
        for name, shape in shapes.items():
            mod, _, leaf = name.rpartition(".")
            groups[mod][leaf] = shape
        with torch.device("meta"):
            for mod_path, leaves in sorted(groups.items(), key=lambda kv: kv[0].count(".")):
                parent = self
                parts = mod_path.split(".") if mod_path else []
                for depth, seg in enumerate(parts[:-1]):
                    if not hasattr(parent, seg) or not isinstance(getattr(parent, seg), nn.Module):
                        child = DiTBlock(int(seg)) if parts[0] == "blocks" and depth == 1 else nn.Module()
                        parent.add_module(seg, child)
                    parent = getattr(parent, seg)
                if parts:
                    if len(parts) == 2 and parts[0] == "blocks" and not hasattr(parent, parts[-1]):
                        parent.add_module(parts[-1], DiTBlock(int(parts[-1])))
                    if hasattr(parent, parts[-1]) and isinstance(getattr(parent, parts[-1]), nn.Module):
                        target = getattr(parent, parts[-1])  # e.g. "head" holds "modulation" and "head"
                        for leaf, shape in leaves.items():
                            target.register_parameter(leaf, nn.Parameter(torch.empty(shape)))
                    else:
                        parent.add_module(parts[-1], _make_leaf(leaves))
        if params is None:
            params = init_params(cfg, seed=seed, dtype=dtype, device=device)
        missing = set(shapes) - set(params)
        if missing:
            raise KeyError(f"DiT: params lacks {sorted(missing)[:10]}")
        self.load_state_dict({k: params[k] for k in shapes}, strict=True, assign=True)

    @property
    def blocks_list(self) -> list[DiTBlock]:
        return [getattr(self.blocks, str(i)) for i in range(self.cfg.num_layers)]

    def params(self) -> dict[str, torch.Tensor]:
        """The parameter dict in Wan names (the live tensors, not copies)."""
        return dict(self.named_parameters())

    def _run_block(self, i, x, *args):
        return getattr(self.blocks, str(i))(x, *args)

    def forward(self, x, t, context, **kwargs):
        return dit.forward(self.params(), self.cfg, x, t, context, block_fn=self._run_block, **kwargs)

    def flashi2v_shift(self, s):
        return dit.flashi2v_shift(self.params(), self.cfg, s)
