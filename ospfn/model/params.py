"""Parameter names, shapes and initialisation of the DiT (Wan2.1 original key names, docs/dit.md#checkpoint-formats)."""

from __future__ import annotations

import math

import torch

from ospfn.model.config import DiTConfig

__all__ = ["param_shapes", "expected_shapes", "init_params", "keeps_fp32", "block_linear_names", "add_flashi2v_branches",
           "FLASHI2V_BRANCH_KEYS"]

# The FlashI2V additions to the T2V network (docs/flashi2v.md): the Fourier embedding and phi (latent shifting)
FLASHI2V_BRANCH_KEYS = (
    "fourier_embedding.0.weight", "fourier_embedding.0.bias", "fourier_embedding.1.weight", "fourier_embedding.1.bias",
    "learnable_proj.proj.0.weight", "learnable_proj.proj.0.bias", "learnable_proj.proj.2.weight", "learnable_proj.proj.2.bias",
)  # fmt: skip
# zero at initialisation (with every bias), so both branches output zero and the model equals the T2V model
_FLASHI2V_ZERO = ("fourier_embedding.1.weight", "learnable_proj.proj.2.weight")

# Linears inside the blocks: the ones HiF8 training quantises (docs/hif8.md#training-with-hif8).
_BLOCK_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)  # fmt: skip


def block_linear_names(cfg: DiTConfig) -> list[str]:
    """Fully qualified names (without .weight/.bias) of the Linears inside DiT blocks."""
    return [f"blocks.{i}.{n}" for i in range(cfg.num_layers) for n in _BLOCK_LINEARS]


def param_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``cfg``'s model with its shape, in Wan2.1 original naming (a fresh dict)."""
    if not isinstance(cfg, DiTConfig):
        raise TypeError(f"param_shapes: cfg must be a DiTConfig, got {type(cfg).__name__}")
    return dict(expected_shapes(cfg))


# architecture fields -> the shapes table, shared (read-only) by every forward call of that architecture; a plain
# dict keyed by plain values (not by the config object), so torch.compile traces a lookup without a graph break
_SHAPES: dict[tuple, dict[str, tuple[int, ...]]] = {}


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """``param_shapes(cfg)`` computed once per architecture and cached; the dict is shared: do not modify it."""
    key = (cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.in_dim, cfg.out_dim, cfg.text_dim, cfg.freq_dim, cfg.patch_size,
           cfg.i2v, cfg.conv3x3x3_proj)  # fmt: skip
    s = _SHAPES.get(key)
    if s is None:
        s = _shapes_of(*key)
        if not torch.compiler.is_compiling():  # no Python state written while dynamo traces
            _SHAPES[key] = s
    return s


def _shapes_of(C, F, num_layers, in_dim, out_dim, text_dim, freq_dim, patch_size, i2v, conv3x3x3_proj):
    pt, ph, pw = patch_size
    s: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (C, in_dim, pt, ph, pw),
        "patch_embedding.bias": (C,),
        "text_embedding.0.weight": (C, text_dim),
        "text_embedding.0.bias": (C,),
        "text_embedding.2.weight": (C, C),
        "text_embedding.2.bias": (C,),
        "time_embedding.0.weight": (C, freq_dim),
        "time_embedding.0.bias": (C,),
        "time_embedding.2.weight": (C, C),
        "time_embedding.2.bias": (C,),
        "time_projection.1.weight": (6 * C, C),
        "time_projection.1.bias": (6 * C,),
    }
    for i in range(num_layers):
        b = f"blocks.{i}."
        s[b + "modulation"] = (1, 6, C)
        for att in ("self_attn", "cross_attn"):
            for p in ("q", "k", "v", "o"):
                s[f"{b}{att}.{p}.weight"] = (C, C)
                s[f"{b}{att}.{p}.bias"] = (C,)
            s[f"{b}{att}.norm_q.weight"] = (C,)
            s[f"{b}{att}.norm_k.weight"] = (C,)
        s[b + "norm3.weight"] = (C,)
        s[b + "norm3.bias"] = (C,)
        s[b + "ffn.0.weight"] = (F, C)
        s[b + "ffn.0.bias"] = (F,)
        s[b + "ffn.2.weight"] = (C, F)
        s[b + "ffn.2.bias"] = (C,)
    s["head.head.weight"] = (out_dim * pt * ph * pw, C)
    s["head.head.bias"] = (out_dim * pt * ph * pw,)
    s["head.modulation"] = (1, 2, C)
    if i2v == "flashi2v":
        k = (3, 3, 3) if conv3x3x3_proj else (1, 3, 3)
        s["fourier_embedding.0.weight"] = (C, in_dim, pt, ph, pw)
        s["fourier_embedding.0.bias"] = (C,)
        s["fourier_embedding.1.weight"] = (C, C, 1, 1, 1)
        s["fourier_embedding.1.bias"] = (C,)
        s["learnable_proj.proj.0.weight"] = (4 * in_dim, in_dim, *k)
        s["learnable_proj.proj.0.bias"] = (4 * in_dim,)
        s["learnable_proj.proj.2.weight"] = (in_dim, 4 * in_dim, *k)
        s["learnable_proj.proj.2.bias"] = (in_dim,)
    return s


def keeps_fp32(name: str) -> bool:
    """Parameters kept in fp32 when the rest of the model is bf16/fp16: modulation tables and norms."""
    return name.endswith("modulation") or ".norm" in name


def _xavier(shape, g, fan_shape=None):
    fan_out, fan_in = fan_shape or (shape[0], math.prod(shape[1:]))
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def init_params(cfg: DiTConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    """Fresh parameters with Wan2.1's initialisation (and the FlashI2V branches zero-initialised).

    Linears: Xavier-uniform weights, zero biases; text and time embeddings: N(0, 0.02); patch (and Fourier)
    embeddings: Xavier-uniform on the weight flattened to (dim, in*kt*kh*kw); modulation tables:
    N(0, 1)/sqrt(dim); RMS/LayerNorm weights 1; the output head zero; FlashI2V: the last conv of phi and
    the 1x1x1 conv of the Fourier embedding zero, so the model equals the T2V model at initialisation.
    Random numbers come from a CPU generator seeded with ``seed`` (same values on every device).  With a
    half ``dtype``, modulation tables and norm weights stay fp32 (see ``keeps_fp32``).
    """
    if not isinstance(cfg, DiTConfig):
        raise TypeError(f"init_params: cfg must be a DiTConfig, got {type(cfg).__name__}")
    g = torch.Generator().manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".bias") or name.startswith("head.head.") or name in _FLASHI2V_ZERO:
            t = torch.zeros(shape)
        elif ".norm" in name:
            t = torch.ones(shape)
        elif name.endswith("modulation"):
            t = torch.randn(shape, generator=g) / math.sqrt(cfg.dim)
        elif name.startswith(("text_embedding.", "time_embedding.")):
            t = torch.randn(shape, generator=g) * 0.02
        else:  # Linears, patch / Fourier embedding, phi's first conv
            t = _xavier(shape, g)
        target = torch.float32 if (dtype in (torch.bfloat16, torch.float16) and keeps_fp32(name)) else dtype
        out[name] = t.to(device=device, dtype=target)
    return out


def add_flashi2v_branches(params: dict[str, torch.Tensor], cfg: DiTConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Text-to-video parameters plus freshly initialised FlashI2V branches: the start of FlashI2V training from
    Wan2.1-T2V weights (as in the paper).

    ``params`` holds a T2V model (the architecture of ``cfg`` without the FlashI2V branches); ``cfg`` is the
    FlashI2V config (``i2v="flashi2v"``).  The eight ``FLASHI2V_BRANCH_KEYS`` are created with ``init_params``'s
    FlashI2V initialisation: Xavier-uniform on the first conv of each branch (``fourier_embedding.0``,
    ``learnable_proj.proj.0``), zero on the last one (``fourier_embedding.1``, ``learnable_proj.proj.2``) and on
    every bias.  So the Fourier embedding adds zero and phi is zero: the returned model computes exactly what
    the T2V model computes, for any image condition.  The random numbers come from a CPU generator seeded with
    ``seed`` and drawn for these tensors only; they land on the device and in the dtype of
    ``params["patch_embedding.weight"]``.  Returns a new dict (the T2V tensors are shared, not copied).

    ``ValueError`` if ``cfg`` is not a FlashI2V config, if ``params`` already holds any branch tensor, or lacks
    ``patch_embedding.weight``.
    """
    fn = "add_flashi2v_branches"
    if not isinstance(cfg, DiTConfig):
        raise TypeError(f"{fn}: cfg must be a DiTConfig, got {type(cfg).__name__}")
    if cfg.i2v != "flashi2v":
        raise ValueError(f"{fn}: cfg must be a FlashI2V config (i2v='flashi2v'), got i2v={cfg.i2v!r}")
    if not isinstance(params, dict):
        raise TypeError(f"{fn}: params must be a dict of tensors, got {type(params).__name__}")
    present = [k for k in FLASHI2V_BRANCH_KEYS if k in params]
    if present:
        raise ValueError(f"{fn}: params already hold FlashI2V branch tensors {present}; they are created only for "
                         "text-to-video weights")  # fmt: skip
    ref = params.get("patch_embedding.weight")
    if not isinstance(ref, torch.Tensor):
        raise ValueError(f"{fn}: params lack the tensor 'patch_embedding.weight' (a text-to-video DiT's parameters are expected)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{fn}: seed must be an int, got {type(seed).__name__}")
    shapes = expected_shapes(cfg)
    g = torch.Generator().manual_seed(seed)
    out = dict(params)
    for name in FLASHI2V_BRANCH_KEYS:
        shape = shapes[name]
        t = torch.zeros(shape) if name.endswith(".bias") or name in _FLASHI2V_ZERO else _xavier(shape, g)
        out[name] = t.to(device=ref.device, dtype=ref.dtype)
    return out
