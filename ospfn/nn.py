"""``nn.Module`` shells over the functional DiT, for FSDP2 ``fully_shard``, per-block ``torch.compile``,
optimizers and ``state_dict`` tooling.

The shells hold the same parameters as the functional dict -- ``named_parameters()`` yields exactly the Wan2.1
names of ``ospfn.model.param_shapes`` -- and compute nothing of their own: ``DiT.forward`` calls
``ospfn.model.forward`` and each block module (``model.blocks[i]``) runs ``ospfn.model.dit.dit_block`` on its
own parameters, so ``fully_shard(model.blocks[i])`` gathers exactly that block's weights around its call and
``model.blocks[i].compile()`` compiles exactly one block (re-layouts and collectives stay between blocks).

The leaves (``model.blocks[0].self_attn.q`` ...) are ``ParamHolder`` modules, not ``nn.Linear``: they hold
``weight`` / ``bias`` and cannot be called, so a tool that wraps or hooks "Linear layers" (PEFT's LoRA,
forward hooks) cannot silently attach to a layer that never runs.  LoRA in ospfn is functional: the adapter
weights are part of the parameter dict and every block Linear runs through one function
(``ospfn.model.dit._linear``), which is where a low-rank delta is added.

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

__all__ = ["DiT", "DiTBlock", "ParamHolder"]


class ParamHolder(nn.Module):
    """Holds parameters of the functional model (a Linear's weight and bias, a norm weight, a modulation
    table); not a layer: calling it raises.  The computation is ``ospfn.model.dit``'s."""

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "ParamHolder holds parameters only and is never called: ospfn.model.dit computes with them "
            "(DiTBlock runs dit_block on the block's parameters)"
        )


class DiTBlock(nn.Module):
    """One DiT block; ``forward(x, bc, lay)`` runs ``ospfn.model.dit.dit_block`` on this module's parameters
    (``bc``: the call's ``BlockContext``, ``lay``: the layout's ``LayoutTables``)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor, bc: dit.BlockContext, lay: dit.LayoutTables) -> torch.Tensor:
        return dit.dit_block(x, dict(self.named_parameters()), bc, lay)


def _make_leaf(leaves: dict[str, tuple[int, ...]]) -> nn.Module:
    m = ParamHolder()
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

    def _run_block(self, i, x, bc, lay):
        return getattr(self.blocks, str(i))(x, bc, lay)

    def forward(self, x, t, context, *, image: Optional[dit.ImageCond] = None, run: Optional[dit.RunOptions] = None):
        """``ospfn.model.forward`` on this module's parameters, each block run by its ``DiTBlock``."""
        run = (run or dit.RunOptions()).replace(block_fn=self._run_block)
        return dit.forward(self.params(), self.cfg, x, t, context, image=image, run=run)

    def flashi2v_shift(self, s):
        return dit.flashi2v_shift(self.params(), self.cfg, s)
