"""Folding adapters into the weights and out again (docs/lora.md#merge-and-unmerge).

``merge_lora(params, lora, weight)``: for every adapted module ``W + weight * w_j * scale_j * B_j @ A_j`` (and
``bias + weight * w_j * lora_bias_j``) summed over the adapters, in fp32, cast back to the parameter's dtype; a
new dict, the input untouched.  ``unmerge_lora`` subtracts the same deltas.  A merged model runs at the base
model's cost and is what ``forward(params, ..., lora=adapter)`` computes, up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ospfn.lora.adapter import _parse, lora_pairs

__all__ = ["merge_lora", "unmerge_lora", "lora_delta"]


def _deltas(params, lora, weight, fn: str) -> dict[str, torch.Tensor]:
    """{parameter key: fp32 delta} summed over the adapters, each checked against ``params``."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{fn}: params must be a dict of tensors (from init_params or load_checkpoint), got {type(params).__name__}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise TypeError(f"{fn}: weight must be a finite Python number, got {weight!r}")
    pairs = lora_pairs(lora, fn, "adapter_or_list", float(weight))
    if not pairs:
        raise ValueError(f"{fn}: adapter_or_list must name at least one LoraAdapter, got {lora!r}")
    out: dict[str, torch.Tensor] = {}
    for j, (adapter, w) in enumerate(pairs):
        arg = "adapter_or_list" if len(pairs) == 1 else f"adapter_or_list[{j}]"
        mods = _parse(adapter.weights, adapter.config, fn, arg + ".weights")
        missing = [f"blocks.{i}.{n}.weight" for (i, n) in mods if not isinstance(params.get(f"blocks.{i}.{n}.weight"), torch.Tensor)]
        if missing:
            raise ValueError(f"{fn}: params has no tensor for {len(missing)} module(s) {arg} adapts: {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''} (is it the parameter dict of the adapter's model?)")  # fmt: skip
        for (i, n), (a, b, bias) in mods.items():
            wkey, bkey = f"blocks.{i}.{n}.weight", f"blocks.{i}.{n}.bias"
            W = params[wkey]
            if W.shape != (b.shape[0], a.shape[1]):
                raise ValueError(f"{fn}: {arg}: blocks.{i}.{n} has lora_B @ lora_A of shape {(b.shape[0], a.shape[1])} but "
                                 f"params[{wkey!r}] is {tuple(W.shape)}")  # fmt: skip
            coef = w * adapter.config.scale
            d = torch.mm(b.detach().to(W.device, torch.float32), a.detach().to(W.device, torch.float32)) * coef
            out[wkey] = d if wkey not in out else out[wkey] + d
            if bias is not None:
                if not isinstance(params.get(bkey), torch.Tensor):
                    raise ValueError(f"{fn}: {arg} has blocks.{i}.{n}.lora_bias but params has no tensor {bkey!r}")
                db = bias.detach().to(params[bkey].device, torch.float32) * w
                out[bkey] = db if bkey not in out else out[bkey] + db
    return out


def _apply(params, deltas, sign: float) -> dict[str, torch.Tensor]:
    new = dict(params)
    with torch.no_grad():
        for k, d in deltas.items():
            p = params[k]
            new[k] = (p.detach().float() + sign * d).to(p.dtype)
    return new


def merge_lora(params: dict, adapter_or_list, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """``params`` with the adapter(s) folded in: a new dict whose adapted ``.weight`` (and, for adapters with
    ``lora_bias``, ``.bias``) entries are new tensors ``W + weight * w_j * scale_j * B_j @ A_j`` (``b + weight *
    w_j * lora_bias_j``), computed in fp32 and cast to the parameter's dtype and device; every other entry is
    the input's tensor (shared, not copied).  The input is not modified and the results carry no autograd
    history.

    ``adapter_or_list``: a ``LoraAdapter``, an ``(adapter, w)`` pair, or a list of adapters and pairs (bare
    adapters weigh 1); several adapters add up.  ``weight`` multiplies every adapter's weight.

    >>> import torch
    >>> from ospfn.model import DiTConfig, init_params
    >>> from ospfn.lora import LoraConfig, init_lora
    >>> cfg = DiTConfig.preset("tiny")
    >>> params = init_params(cfg)
    >>> adapter = init_lora(cfg, LoraConfig(rank=2, alpha=2.0))
    >>> _ = adapter.weights["blocks.0.self_attn.q.lora_B"].fill_(0.5)   # a trained-looking B
    >>> merged = merge_lora(params, adapter)
    >>> A, B = adapter.weights["blocks.0.self_attn.q.lora_A"], adapter.weights["blocks.0.self_attn.q.lora_B"]
    >>> torch.allclose(merged["blocks.0.self_attn.q.weight"], params["blocks.0.self_attn.q.weight"] + 1.0 * B @ A)
    True
    >>> merged["blocks.0.ffn.0.weight"] is params["blocks.0.ffn.0.weight"]   # not adapted: shared
    True
    """
    return _apply(params, _deltas(params, adapter_or_list, weight, "merge_lora"), 1.0)


def unmerge_lora(params: dict, adapter_or_list, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The inverse of ``merge_lora(params, adapter_or_list, weight)``: subtracts the same deltas (fp32, cast
    back), so ``unmerge_lora(merge_lora(p, a), a)`` equals ``p`` up to the rounding of the cast (exact
    arithmetic is not restored bit for bit: ``(W + d) - d`` rounds).  A new dict; the input is not modified."""
    return _apply(params, _deltas(params, adapter_or_list, weight, "unmerge_lora"), -1.0)


def lora_delta(params: dict, adapter_or_list, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The fp32 deltas ``merge_lora`` adds, ``{parameter key: delta}`` (only the adapted keys)."""
    return _deltas(params, adapter_or_list, weight, "lora_delta")
