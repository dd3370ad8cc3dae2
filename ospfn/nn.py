"""``nn.Module`` shells over the functional DiT, for FSDP2 ``fully_shard``, per-block ``torch.compile``,
optimizers and ``state_dict`` tooling.

The shells hold the same parameters as the functional dict -- ``named_parameters()`` yields exactly the Wan2.1
names of ``ospfn.model.param_shapes`` -- and compute nothing of their own: ``DiT.forward`` calls
``ospfn.model.forward`` and each block module (``model.blocks[i]``) runs ``ospfn.model.dit.dit_block`` on its
own parameters, so ``fully_shard(model.blocks[i])`` gathers exactly that block's weights around its call and
``model.blocks[i].compile()`` compiles exactly one block (re-layouts and collectives stay between blocks).

The leaves (``model.blocks[0].self_attn.q`` ...) are ``ParamHolder`` modules, not ``nn.Linear``: they hold
``weight`` / ``bias`` and cannot be called, so a tool that wraps or hooks "Linear layers" (PEFT's LoRA,
forward hooks) cannot silently attach to a layer that never runs.  LoRA in ospfn is functional: every block
Linear runs through one function (``ospfn.model.dit._linear``), which is where a low-rank delta is added.
``DiT(cfg, params, lora=adapter)`` registers the adapter's tensors as parameters of the leaves they adapt,
under the adapter's own keys (``blocks.0.self_attn.q.lora_A`` ...), so ``fully_shard(model.blocks[i])``
shards them with the block and ``freeze_base()`` leaves only them trainable (docs/lora.md#fsdp2-and-the-module-shells).

    >>> import torch
    >>> from ospfn.model import DiTConfig
    >>> from ospfn.nn import DiT
    >>> net = DiT(DiTConfig.preset("tiny"))
    >>> sorted(n for n, _ in net.named_parameters())[:2]
    ['blocks.0.cross_attn.k.bias', 'blocks.0.cross_attn.k.weight']
"""

from __future__ import annotations

import functools
import math
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
    """One DiT block; ``forward(x, bc, lay, lora_weight=1.0)`` runs ``ospfn.model.dit.dit_block`` on this
    module's parameters (``bc``: the call's ``BlockContext``, ``lay``: the layout's ``LayoutTables``).  With a
    LoRA adapter attached (``lora_scale`` set, the ``lora_A`` / ``lora_B`` / ``lora_bias`` parameters on the
    leaves) each adapted Linear gains ``lora_weight * lora_scale * B A`` (``lora_weight = 0``: the base block)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.lora_scale: Optional[float] = None

    def forward(self, x: torch.Tensor, bc: dit.BlockContext, lay: dit.LayoutTables, lora_weight: float = 1.0) -> torch.Tensor:
        p = dict(self.named_parameters())
        if self.lora_scale is not None:
            from ospfn.lora.adapter import block_terms

            block_terms(p, self.lora_scale, lora_weight)
        return dit.dit_block(x, p, bc, lay)


def _make_leaf(leaves: dict[str, tuple[int, ...]]) -> nn.Module:
    m = ParamHolder()
    for name, shape in leaves.items():
        m.register_parameter(name, nn.Parameter(torch.empty(shape)))
    return m


class DiT(nn.Module):
    """Module form of the DiT.  ``DiT(cfg)`` initialises like ``init_params``; ``DiT(cfg, params)`` wraps
    existing tensors (no copy: the module's parameters ARE those tensors).

    ``lora``: an ``ospfn.lora.LoraAdapter`` to attach (checked against ``cfg``): its tensors become parameters
    of the leaves they adapt, under the adapter's keys (no copy either), and every call adds the adapter with
    weight ``forward(..., lora_weight=1.0)`` (0: the base model, e.g. the RL reference).  ``freeze_base()``
    makes only the adapter trainable; ``lora_adapter()`` gives it back as a ``LoraAdapter``."""

    def __init__(self, cfg: DiTConfig, params: Optional[dict[str, torch.Tensor]] = None, *, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device="cpu", lora=None) -> None:  # fmt: skip
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
        self.lora_config = None
        if lora is not None:
            self._attach_lora(lora)

    def _attach_lora(self, adapter) -> None:
        from ospfn.lora.adapter import LoraAdapter

        if not isinstance(adapter, LoraAdapter):
            raise TypeError(f"DiT: lora must be an ospfn.lora.LoraAdapter or None, got {type(adapter).__name__}")
        adapter.check(self.cfg)
        for key, t in adapter.weights.items():
            module, _, leaf = key.rpartition(".")
            self.get_submodule(module).register_parameter(leaf, nn.Parameter(t, requires_grad=True))
        self.lora_config = adapter.config
        for block in self.blocks_list:
            block.lora_scale = adapter.config.scale

    @staticmethod
    def _is_lora(name: str) -> bool:
        return name.endswith((".lora_A", ".lora_B", ".lora_bias"))

    def named_lora_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The attached adapter's parameters under the adapter's keys (after ``fully_shard``: the sharded ones)."""
        return [(n, p) for n, p in self.named_parameters() if self._is_lora(n)]

    def lora_parameters(self) -> list[nn.Parameter]:
        """The attached adapter's parameters (what a LoRA optimizer takes); [] without an adapter."""
        return [p for _, p in self.named_lora_parameters()]

    def lora_adapter(self):
        """The attached adapter as an ``ospfn.lora.LoraAdapter`` over the live parameters (under FSDP2 they are
        DTensors: take ``.full_tensor()`` of each to save); None without an adapter."""
        from ospfn.lora.adapter import LoraAdapter

        if self.lora_config is None:
            return None
        return LoraAdapter(self.lora_config, dict(self.named_lora_parameters()))

    def freeze_base(self) -> "DiT":
        """Only the adapter trains: ``requires_grad`` False on every base parameter, True on the adapter's.
        Returns self."""
        if self.lora_config is None:
            raise ValueError("DiT.freeze_base: no LoRA adapter is attached (build the module with DiT(cfg, params, lora=adapter))")
        for n, p in self.named_parameters():
            p.requires_grad_(self._is_lora(n))
        return self

    @property
    def blocks_list(self) -> list[DiTBlock]:
        return [getattr(self.blocks, str(i)) for i in range(self.cfg.num_layers)]

    def params(self) -> dict[str, torch.Tensor]:
        """The parameter dict in Wan names (the live tensors, not copies); the base model's only (an attached
        adapter is ``lora_adapter()``)."""
        return {n: p for n, p in self.named_parameters() if not self._is_lora(n)}

    def _run_block(self, i, x, bc, lay, lora_weight: float = 1.0):
        if lora_weight == 1.0:  # the plain call: a per-block compiled graph keeps its default signature
            return getattr(self.blocks, str(i))(x, bc, lay)
        return getattr(self.blocks, str(i))(x, bc, lay, lora_weight=lora_weight)

    def forward(self, x, t, context, *, image: Optional[dit.ImageCond] = None, run: Optional[dit.RunOptions] = None,
                lora_weight: float = 1.0):  # fmt: skip
        """``ospfn.model.forward`` on this module's parameters, each block run by its ``DiTBlock``.
        ``lora_weight``: the weight of the attached adapter for this call (0: the base model); ignored
        without one."""
        if isinstance(lora_weight, bool) or not isinstance(lora_weight, (int, float)) or not math.isfinite(lora_weight):
            raise TypeError(f"DiT.forward: lora_weight must be a finite Python number, got {lora_weight!r}")
        block_fn = self._run_block if lora_weight == 1.0 else functools.partial(self._run_block, lora_weight=float(lora_weight))
        run = (run or dit.RunOptions()).replace(block_fn=block_fn)
        return dit.forward(self.params(), self.cfg, x, t, context, image=image, run=run)

    def flashi2v_shift(self, s):
        return dit.flashi2v_shift(self.params(), self.cfg, s)
