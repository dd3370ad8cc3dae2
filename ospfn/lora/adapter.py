"""LoRA adapters as data: a ``LoraConfig`` and a flat dict of low-rank tensors (docs/lora.md).

A targeted block Linear ``blocks.{i}.{name}`` (``W`` [out, in], bias ``b``) becomes

    y = x W^T + b + weight * scale * (x A^T) B^T  (+ weight * lora_bias)

with ``A = weights["blocks.{i}.{name}.lora_A"]`` [r, in], ``B = weights["blocks.{i}.{name}.lora_B"]`` [out, r],
an optional bias delta ``weights["blocks.{i}.{name}.lora_bias"]`` [out] (not scaled), ``scale = alpha / r`` and
``weight`` the per-call weight of the adapter (1 unless given).  ``ospfn.model.forward(..., lora=adapter)`` adds
the delta inside the one function every block Linear runs through; ``merge_lora`` folds it into the weights.

This module imports nothing of ``ospfn.model`` at import time (``ospfn.model.dit`` imports it lazily, when a
call passes ``lora=``), so either package may be imported first.

    >>> import torch
    >>> from ospfn.model import DiTConfig
    >>> from ospfn.lora import LoraConfig, init_lora
    >>> adapter = init_lora(DiTConfig.preset("tiny"), LoraConfig(rank=4, alpha=8.0), seed=0)
    >>> adapter.scale, len(adapter.modules()), adapter.weights["blocks.0.self_attn.q.lora_A"].shape
    (2.0, 64, torch.Size([4, 64]))
    >>> float(adapter.weights["blocks.0.self_attn.q.lora_B"].abs().max())  # B = 0: the adapter starts as a no-op
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch

__all__ = [
    "LoraConfig",
    "LoraAdapter",
    "DEFAULT_TARGETS",
    "LORA_MODULES",
    "LORA_INITS",
    "init_lora",
    "lora_targets",
    "lora_pairs",
]

# every Linear inside a DiT block, by its name inside the block (Wan2.1 original names), with its (in, out)
# features as DiTConfig fields
_FEATURES = {
    "self_attn.q": ("dim", "dim"),
    "self_attn.k": ("dim", "dim"),
    "self_attn.v": ("dim", "dim"),
    "self_attn.o": ("dim", "dim"),
    "cross_attn.q": ("dim", "dim"),
    "cross_attn.k": ("dim", "dim"),  # reads the embedded context tokens, which have dim features
    "cross_attn.v": ("dim", "dim"),
    "cross_attn.o": ("dim", "dim"),
    "ffn.0": ("dim", "ffn_dim"),
    "ffn.2": ("ffn_dim", "dim"),
}
LORA_MODULES: tuple[str, ...] = tuple(_FEATURES)
DEFAULT_TARGETS: tuple[str, ...] = LORA_MODULES[:8]  # self- and cross-attention q, k, v, o (OSP-Next's RL); no FFN
LORA_INITS = ("gaussian", "kaiming", "zeros")
_KINDS = ("lora_A", "lora_B", "lora_bias")


@dataclass(frozen=True)
class LoraConfig:
    """What an adapter is: ``rank`` r, ``alpha`` (scale = alpha / r), the targeted Linears of every block
    (names inside a block, from ``LORA_MODULES``; default ``DEFAULT_TARGETS``, self/cross-attention q, k, v, o)
    and the initialisation ``init_lora`` uses:

    * ``"gaussian"`` (PEFT ``init_lora_weights="gaussian"``, OSP-Next's RL): A ~ N(0, std = 1 / r), B = 0;
    * ``"kaiming"`` (PEFT's default): A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with a = sqrt(5)), B = 0;
    * ``"zeros"``: A = 0 and B = 0 (a placeholder to fill, e.g. by a loader; both gradients are zero, so it does
      not train from scratch).

    Frozen and validated on construction (``targets`` may be given as any sequence; it is stored as a tuple).

    >>> LoraConfig(rank=32, alpha=64.0).scale
    2.0
    >>> LoraConfig(targets=("self_attn.q", "attn1.to_q"))
    Traceback (most recent call last):
      ...
    ValueError: LoraConfig: targets has unknown module name(s) ['attn1.to_q']; allowed: the block Linears ('self_attn.q', 'self_attn.k', 'self_attn.v', 'self_attn.o', 'cross_attn.q', 'cross_attn.k', 'cross_attn.v', 'cross_attn.o', 'ffn.0', 'ffn.2')
    """

    rank: int = 32
    alpha: float = 64.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    init: str = "gaussian"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig: rank must be a positive int, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoraConfig: alpha must be a finite number > 0 (scale = alpha / rank), got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if isinstance(self.targets, str) or not isinstance(self.targets, (tuple, list)):
            raise TypeError(f"LoraConfig: targets must be a tuple of block Linear names such as {DEFAULT_TARGETS[:2]}, "
                            f"got {self.targets!r}")  # fmt: skip
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in _FEATURES]
        if unknown:
            raise ValueError(f"LoraConfig: targets has unknown module name(s) {unknown}; allowed: the block Linears {LORA_MODULES}")
        if not targets:
            raise ValueError(f"LoraConfig: targets must name at least one block Linear of {LORA_MODULES}, got ()")
        dup = sorted({t for t in targets if targets.count(t) > 1})
        if dup:
            raise ValueError(f"LoraConfig: targets names {dup} more than once")
        object.__setattr__(self, "targets", targets)
        if self.init not in LORA_INITS:
            raise ValueError(f"LoraConfig: init must be one of {LORA_INITS}, got {self.init!r}")

    @property
    def scale(self) -> float:
        """alpha / rank: the factor of the low-rank delta ``B @ A``."""
        return self.alpha / self.rank

    def replace(self, **changes) -> "LoraConfig":
        """A copy with ``changes`` applied (validated)."""
        import dataclasses

        return dataclasses.replace(self, **changes)


def _features(model_cfg, name: str) -> tuple[int, int]:
    fin, fout = _FEATURES[name]
    return getattr(model_cfg, fin), getattr(model_cfg, fout)


def _check_model_cfg(model_cfg, fn: str) -> None:
    from ospfn.model.config import DiTConfig

    if not isinstance(model_cfg, DiTConfig):
        raise TypeError(f"{fn}: model_cfg must be an ospfn.model.DiTConfig, got {type(model_cfg).__name__}")


def lora_targets(model_cfg, lora_cfg: LoraConfig) -> list[tuple[str, int, int]]:
    """The Linears an adapter of ``lora_cfg`` covers in a model of ``model_cfg``: ``(module name, in, out)`` for
    every block (ascending) and target (in ``lora_cfg.targets`` order), e.g. ``("blocks.0.self_attn.q", 1536, 1536)``.

    >>> from ospfn.model import DiTConfig
    >>> lora_targets(DiTConfig.preset("tiny"), LoraConfig(rank=2, targets=("ffn.0", "ffn.2")))[:2]
    [('blocks.0.ffn.0', 64, 128), ('blocks.0.ffn.2', 128, 64)]
    """
    _check_model_cfg(model_cfg, "lora_targets")
    if not isinstance(lora_cfg, LoraConfig):
        raise TypeError(f"lora_targets: lora_cfg must be an ospfn.lora.LoraConfig, got {type(lora_cfg).__name__}")
    return [(f"blocks.{i}.{n}", *_features(model_cfg, n)) for i in range(model_cfg.num_layers) for n in lora_cfg.targets]


# ----------------------------------------------------------------------------------------------------------
# the adapter


def _parse(weights, config: LoraConfig, fn: str, arg: str) -> dict[tuple[int, str], list]:
    """Group ``weights`` by module: {(block, name): [A, B, bias or None]}, checking the keys, the tensors and the
    shapes that do not depend on a model (A [rank, in], B [out, rank], bias [out]).  Raises naming ``arg``."""
    if not isinstance(weights, Mapping):
        raise TypeError(f"{fn}: {arg} must be a dict of tensors keyed 'blocks.{{i}}.{{name}}.lora_A' / '.lora_B' / '.lora_bias', "
                        f"got {type(weights).__name__}")  # fmt: skip
    mods: dict[tuple[int, str], list] = {}
    malformed, unknown, untargeted = [], [], []
    for key, v in weights.items():
        ok = isinstance(key, str) and key.startswith("blocks.")
        idx, _, tail = key[7:].partition(".") if ok else ("", "", "")
        name, _, kind = tail.rpartition(".")
        if not (ok and idx.isdigit() and kind in _KINDS and name):
            malformed.append(key)
            continue
        if name not in _FEATURES:
            unknown.append(key)
            continue
        if name not in config.targets:
            untargeted.append(key)
            continue
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{fn}: {arg}[{key!r}] must be a torch.Tensor, got {type(v).__name__}")
        if not v.dtype.is_floating_point:
            raise TypeError(f"{fn}: {arg}[{key!r}] must be a floating-point tensor, got {v.dtype}")
        mods.setdefault((int(idx), name), [None, None, None])[_KINDS.index(kind)] = v
    if malformed:
        raise ValueError(f"{fn}: {arg} has {len(malformed)} key(s) not of the form 'blocks.{{i}}.{{name}}.lora_A' / '.lora_B' / "
                         f"'.lora_bias': {malformed[:20]}{' ...' if len(malformed) > 20 else ''}")  # fmt: skip
    if unknown:
        raise ValueError(f"{fn}: {arg} has {len(unknown)} key(s) of unknown module names: {unknown[:20]}"
                         f"{' ...' if len(unknown) > 20 else ''}; allowed names inside a block: {LORA_MODULES}")  # fmt: skip
    if untargeted:
        raise ValueError(f"{fn}: {arg} has {len(untargeted)} key(s) of modules outside config.targets = {config.targets}: "
                         f"{untargeted[:20]}{' ...' if len(untargeted) > 20 else ''}")  # fmt: skip
    r = config.rank
    for (i, name), (a, b, bias) in mods.items():
        key = f"blocks.{i}.{name}"
        if a is None or b is None:
            raise ValueError(f"{fn}: {arg} has {key}.{'lora_B' if a is None else 'lora_A'} without {key}.{'lora_A' if a is None else 'lora_B'} "
                             "(a module needs both, and lora_bias needs them too)")  # fmt: skip
        if a.dim() != 2 or a.shape[0] != r:
            raise ValueError(f"{fn}: {arg}[{key + '.lora_A'!r}] must be [rank={r}, in], got {tuple(a.shape)}")
        if b.dim() != 2 or b.shape[1] != r:
            raise ValueError(f"{fn}: {arg}[{key + '.lora_B'!r}] must be [out, rank={r}], got {tuple(b.shape)}")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != b.shape[0]):
            raise ValueError(f"{fn}: {arg}[{key + '.lora_bias'!r}] must be [out={b.shape[0]}] like lora_B's rows, got {tuple(bias.shape)}")
    return mods


def _check_against(mods, model_cfg, device, fn: str, arg: str) -> None:
    """The parsed modules fit ``model_cfg`` (block index, in / out features) and lie on ``device`` (None: any)."""
    L = model_cfg.num_layers
    beyond = sorted({i for i, _ in mods if i >= L})
    if beyond:
        raise ValueError(f"{fn}: {arg} has block indices {beyond[:10]} but the model has num_layers = {L} (blocks 0..{L - 1})")
    for (i, name), (a, b, bias) in mods.items():
        fin, fout = _features(model_cfg, name)
        key = f"blocks.{i}.{name}"
        if a.shape[1] != fin or b.shape[0] != fout:
            raise ValueError(f"{fn}: {arg}: {key} is a Linear {fin} -> {fout} in this model (DiTConfig(dim={model_cfg.dim}, "
                             f"ffn_dim={model_cfg.ffn_dim})) but its lora_A is {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                             f"(expected [rank, {fin}] and [{fout}, rank])")  # fmt: skip
        if device is not None:
            for kind, v in zip(_KINDS, (a, b, bias)):
                if v is not None and v.device != device:
                    raise ValueError(f"{fn}: {arg}[{key + '.' + kind!r}] must be on x's device {device}, got {v.device} "
                                     f"(move the adapter with adapter.to({str(device)!r}))")  # fmt: skip


def _sort_key(key: str):
    idx, _, tail = key[7:].partition(".")
    name, _, kind = tail.rpartition(".")
    return int(idx), LORA_MODULES.index(name), _KINDS.index(kind)


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A LoRA adapter: its ``config`` and its ``weights``, a flat dict keyed ``"blocks.{i}.{name}.lora_A"`` [r, in],
    ``".lora_B"`` [out, r] and optionally ``".lora_bias"`` [out] (a bias delta, added unscaled).  Modules may be any
    subset of (block, target); every module present has both A and B.  The delta of a module is
    ``scale * B @ A`` (``scale = config.alpha / config.rank``).

    Validated on construction (key form, names within ``config.targets``, floating tensors, shapes against the
    rank); ``check(model_cfg)`` validates against a model, and ``ospfn.model.forward(..., lora=)`` validates
    every call.  ``weights`` is a shallow copy of the mapping given (the tensors themselves are shared).
    Comparison is by identity.
    """

    config: LoraConfig
    weights: dict = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.config, LoraConfig):
            raise TypeError(f"LoraAdapter: config must be an ospfn.lora.LoraConfig, got {type(self.config).__name__}")
        _parse(self.weights, self.config, "LoraAdapter", "weights")
        object.__setattr__(self, "weights", {k: self.weights[k] for k in sorted(self.weights, key=_sort_key)})

    def __repr__(self) -> str:
        first = next(iter(self.weights.values()), None)
        where = "" if first is None else f", dtype={first.dtype}, device={first.device}"
        return f"LoraAdapter(rank={self.config.rank}, alpha={self.config.alpha}, modules={len(self.modules())}{where})"

    @property
    def scale(self) -> float:
        """``config.alpha / config.rank``."""
        return self.config.scale

    def modules(self) -> list[str]:
        """The adapted Linears, ``"blocks.{i}.{name}"``, in block then ``LORA_MODULES`` order."""
        return [k[: -len(".lora_A")] for k in self.weights if k.endswith(".lora_A")]

    def parameters(self) -> list[torch.Tensor]:
        """The tensors, in key order (block, module, A / B / bias): what an optimizer or ``sum_sp_grads`` takes."""
        return list(self.weights.values())

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.weights.items())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A flat ``{key: tensor}`` dict (a new dict, the same tensors)."""
        return dict(self.weights)

    def numel(self) -> int:
        return sum(v.numel() for v in self.weights.values())

    def check(self, model_cfg) -> "LoraAdapter":
        """Raise unless the adapter fits a model of ``model_cfg`` (block indices, in / out features); returns self."""
        _check_model_cfg(model_cfg, "LoraAdapter.check")
        _check_against(_parse(self.weights, self.config, "LoraAdapter.check", "weights"), model_cfg, None, "LoraAdapter.check", "weights")
        return self

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "LoraAdapter":
        """A new adapter with every tensor moved / cast (``Tensor.to`` semantics: unchanged tensors are shared)."""
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"LoraAdapter.to: dtype must be a floating torch.dtype, got {dtype!r}")
        return LoraAdapter(self.config, {k: v.to(device=device, dtype=dtype) for k, v in self.weights.items()})

    def requires_grad_(self, requires_grad: bool = True) -> "LoraAdapter":
        """Set ``requires_grad`` on every tensor in place; returns self."""
        for v in self.weights.values():
            v.requires_grad_(requires_grad)
        return self

    def detach(self) -> "LoraAdapter":
        return LoraAdapter(self.config, {k: v.detach() for k, v in self.weights.items()})

    def clone(self) -> "LoraAdapter":
        """A copy with its own tensors (detached)."""
        return LoraAdapter(self.config, {k: v.detach().clone() for k, v in self.weights.items()})


def init_lora(model_cfg, lora_cfg: LoraConfig, *, seed: int = 0, device=None, dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """A fresh adapter over every block and target of ``model_cfg`` (``lora_targets``), initialised as
    ``lora_cfg.init`` says (B = 0 for every init: the model is unchanged until B trains).

    Deterministic per ``seed``: the values are drawn on the CPU in fp32 from one generator, module by module,
    then moved to ``device`` (default CPU) and cast to ``dtype`` (a floating dtype), so a seed gives the same
    adapter on every device.
    """
    _check_model_cfg(model_cfg, "init_lora")
    if not isinstance(lora_cfg, LoraConfig):
        raise TypeError(f"init_lora: lora_cfg must be an ospfn.lora.LoraConfig, got {type(lora_cfg).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"init_lora: seed must be an int, got {seed!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"init_lora: dtype must be a floating torch.dtype, got {dtype!r}")
    g = torch.Generator().manual_seed(seed)
    r = lora_cfg.rank
    weights = {}
    for module, fin, fout in lora_targets(model_cfg, lora_cfg):
        if lora_cfg.init == "gaussian":
            a = torch.randn((r, fin), generator=g) / r
        elif lora_cfg.init == "kaiming":  # kaiming_uniform(a=sqrt(5)): gain sqrt(2 / 6), bound gain * sqrt(3 / fan_in)
            a = (torch.rand((r, fin), generator=g) * 2 - 1) / math.sqrt(fin)
        else:
            a = torch.zeros(r, fin)
        weights[module + ".lora_A"] = a.to(device=device, dtype=dtype)
        weights[module + ".lora_B"] = torch.zeros(fout, r, device=device, dtype=dtype)
    return LoraAdapter(lora_cfg, weights)


# ----------------------------------------------------------------------------------------------------------
# what forward and merge_lora take


def lora_pairs(lora, fn: str, arg: str = "lora", default_weight: float = 1.0) -> list[tuple[LoraAdapter, float]]:
    """Normalise a ``lora=`` argument to ``[(adapter, weight), ...]``: None -> []; a ``LoraAdapter`` -> weight
    ``default_weight``; one ``(LoraAdapter, weight)`` tuple; or a list / tuple of adapters and pairs (each
    pair's weight is multiplied by ``default_weight``).  Weights are finite real Python numbers."""
    if lora is None:
        return []
    if isinstance(lora, LoraAdapter):
        return [(lora, default_weight)]
    allowed = "None, a LoraAdapter, a (LoraAdapter, weight) pair, or a list of LoraAdapters / (LoraAdapter, weight) pairs"
    if not isinstance(lora, (list, tuple)):
        raise TypeError(f"{fn}: {arg} must be {allowed}, got {type(lora).__name__}")
    if isinstance(lora, tuple) and len(lora) == 2 and isinstance(lora[0], LoraAdapter) and not isinstance(lora[1], LoraAdapter):
        lora = [lora]  # one (adapter, weight) pair (a list is always a list of adapters / pairs)
    out = []
    for j, item in enumerate(lora):
        if isinstance(item, LoraAdapter):
            out.append((item, default_weight))
            continue
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], LoraAdapter)):
            raise TypeError(f"{fn}: {arg}[{j}] must be a LoraAdapter or a (LoraAdapter, weight) pair, got "
                            f"{type(item).__name__ if not isinstance(item, (list, tuple)) else [type(v).__name__ for v in item]}")  # fmt: skip
        w = item[1]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise TypeError(f"{fn}: the weight of {arg}[{j}] must be a finite Python number, got {w!r}")
        out.append((item[0], float(w) * default_weight))
    return out


def block_lora_tables(lora, model_cfg, device, fn: str = "forward") -> Optional[list[dict]]:
    """What ``ospfn.model.forward`` adds to each block's parameter dict for ``lora=``: per block a dict
    ``{name + ".lora": ((A, B, bias or None, weight * scale, weight), ...)}`` (one term per adapter that covers
    the module, in the order given), or None when no adapter has a non-zero weight (the base model, no extra
    work).  Validates every adapter against ``model_cfg`` and ``device`` first."""
    pairs = lora_pairs(lora, fn)
    parsed = []
    for j, (adapter, w) in enumerate(pairs):
        arg = "lora" if isinstance(lora, LoraAdapter) else f"lora[{j}]"
        mods = _parse(adapter.weights, adapter.config, fn, arg + ".weights")
        _check_against(mods, model_cfg, device, fn, arg + ".weights")
        if w != 0.0:
            parsed.append((mods, adapter.config.scale * w, w))
    if not parsed:
        return None
    tables: list[dict] = [{} for _ in range(model_cfg.num_layers)]
    for mods, coef, w in parsed:
        for (i, name), (a, b, bias) in mods.items():
            key = name + ".lora"
            tables[i][key] = tables[i].get(key, ()) + ((a, b, bias, coef, w),)
    return tables


def block_terms(block_params: dict, scale: float, weight: float) -> dict:
    """The ``nn`` shells' version of ``block_lora_tables`` for one block: replace the adapter entries of a block's
    parameter dict (``"self_attn.q.lora_A"``, ``".lora_B"``, ``".lora_bias"``, the block's module parameters) by
    the ``name + ".lora"`` terms ``forward`` reads, in place; with ``weight == 0`` just drop them.  Returns the dict."""
    found: dict[str, list] = {}
    for key in [k for k in block_params if k.endswith(_KINDS)]:
        name, _, kind = key.rpartition(".")
        if kind in _KINDS:
            found.setdefault(name, [None, None, None])[_KINDS.index(kind)] = block_params.pop(key)
    if weight != 0.0:
        for name, (a, b, bias) in found.items():
            block_params[name + ".lora"] = ((a, b, bias, scale * weight, weight),)
    return block_params
