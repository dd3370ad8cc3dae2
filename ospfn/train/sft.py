"""SFT recipe pieces: the YAML schema, data order, building blocks of one training step.

``recipes/train.py`` is the loop; the decisions that make a run reproducible and resumable live here:
the data order is a function of (seed, global sample position), the noise of every micro-step is drawn
from a generator seeded by (seed, step, micro-step), and everything else is in the checkpoint.

Every section checks its values on construction, so ``load_config(path, SFTConfig)`` rejects anything torch
would reject later (or that would allocate absurd amounts of memory) with the key path:
``optim.betas[1] must be a number in [0, 1), got 1.0``.  ``SFTConfig`` then checks what spans sections: the
DiT built from ``model`` (``derive_configs``), ``data.size`` against the VAE stride and patch, the memory of
one sample and one micro-batch, whether the ``parallel`` section can split the token grid, and that the real
encoders (``text.kind: umt5`` / ``qwen_vl``, ``vae.kind: wan``) are only used through a latent cache (``data.kind:
latents``, written by ``recipes/prepare_data.py``; docs/training.md#latent-cache).

``text.kind: qwen_vl`` is Uniworld-OSP2.0 (docs/i2sv.md#vlm-conditioning-uniworld-osp20): a frozen Qwen2.5-VL reads
the first frame and the caption (its features are in the cache), the ``adapter`` section's VLM adapter
(``ospfn.model.vlm``) maps them to the DiT's context and is trained; ``model.train: false`` freezes the DiT.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from ospfn.lora.adapter import DEFAULT_TARGETS, LORA_INITS, LORA_MODULES

__all__ = ["SFTConfig", "LoraSection", "AdapterSection", "resume_conflicts", "sample_order", "step_generator", "split_params",
           "join_params", "dit_trained", "adapter_config_of", "export_uniworld", "TEXT_KINDS"]

# Limits of values that are legal but absurd: each would make the run allocate far more than any machine has.
MAX_NUM_SAMPLES = 100_000_000  # the data order is a permutation of all samples (8 bytes each), drawn every step
MAX_SAMPLE_BYTES = 16 * 2**30  # one fp32 video [3, frames, H, W]
MAX_BATCH_BYTES = 64 * 2**30  # one micro-batch of videos on one rank
MAX_SEED = 2**32 - 1
DERIVED_OVERRIDES = ("in_dim", "out_dim", "i2v", "text_len")  # set from the VAE, train.task and text.text_len


def _int(key: str, value, lo: int, hi=None) -> int:
    from ospfn.train.config import int_arg

    return int_arg(lo, hi).check(value, key)


def _num(key: str, value, lo=None, hi=None, **open_bounds) -> float:
    from ospfn.train.config import float_arg

    return float_arg(lo, hi, **open_bounds).check(value, key)


def _hw(key: str, value) -> None:
    from ospfn.train.config import MAX_SIDE

    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{key} must be an [H, W] pair of ints in [1, {MAX_SIDE}], got {value!r}")
    for i, v in enumerate(value):
        _int(f"{key}[{i}]", v, 1, MAX_SIDE)


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


@dataclass(frozen=True)
class ModelSection:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)
    checkpoint: Optional[str] = None  # initial DiT weights (any format load_checkpoint reads)
    # train the DiT (true) or keep it frozen (false: model.checkpoint is required); unset: true, or false with a
    # lora section (an adapter run); see dit_trained
    train: Optional[bool] = None

    def __post_init__(self):
        from ospfn.model.config import PRESETS, DiTConfig

        if self.train is not None and not isinstance(self.train, bool):
            raise ValueError(f"model.train must be true, false or null, got {type(self.train).__name__} {self.train!r}")

        if self.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"model.overrides must be a mapping of DiTConfig fields, got {type(self.overrides).__name__} {self.overrides!r}")
        allowed = sorted(f.name for f in dataclasses.fields(DiTConfig) if f.name != "extra" and f.name not in DERIVED_OVERRIDES)
        for key in self.overrides:
            if key in DERIVED_OVERRIDES:
                raise ValueError(f"model.overrides.{key} is derived (VAE channels / train.task / text.text_len); remove it")
            if key not in allowed:
                raise ValueError(f"model.overrides.{key} is not a DiTConfig field; allowed: {allowed}")
        if self.checkpoint is not None and (not isinstance(self.checkpoint, str) or not self.checkpoint.strip()):
            raise ValueError(f"model.checkpoint must be a path or null, got {self.checkpoint!r}")


def _opt_path(key: str, value) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{key} must be a path or null, got {value!r}")


TEXT_KINDS = ("tiny", "umt5", "qwen_vl")
QWEN_VL_DEFAULTS = {"text_len": 1024, "text_only": False, "image_size": (240, 416), "max_caption_tokens": 512}
_QWEN_VL_ONLY = ("text_only", "image_size", "max_caption_tokens")


@dataclass(frozen=True)
class TextSection:
    """``tiny``: the small trainable encoder (``vocab``, ``heads``); ``umt5``: UMT5-XXL (transformers), whose
    features are read from a latent cache.  ``path``: the weights ``recipes/prepare_data.py`` encodes with
    (umt5: a diffusers pipeline or ``text_encoder`` directory, or Wan's ``.pth`` with ``tokenizer`` = the
    google/umt5-xxl folder; tiny: a ``text_encoder.safetensors`` or a pipeline directory holding one, else
    the seeded initialisation a run from videos starts with).

    ``qwen_vl``: Uniworld-OSP2.0's frozen Qwen2.5-VL (``ospfn.model.vlm.QwenVLEncoder``; ``path`` a local
    Qwen2.5-VL directory), read from a latent cache: ``text_len`` is the padded sequence length (default 1024),
    ``image_size`` the [H, W] the first frame is resized to ([240, 416]), ``max_caption_tokens`` the caption's
    cut (512), ``text_only`` the released code's language-tower-only mode (false).  ``text_len`` unset is 16
    for the other kinds; the three qwen_vl keys apply to that kind only."""

    kind: Literal["tiny", "umt5", "qwen_vl"] = "tiny"
    text_len: Optional[int] = None
    vocab: int = 1024
    heads: int = 2
    train: bool = True
    path: Optional[str] = None
    tokenizer: Optional[str] = None
    text_only: Optional[bool] = None
    image_size: Optional[tuple[int, int]] = None
    max_caption_tokens: Optional[int] = None

    def __post_init__(self):
        if self.kind not in TEXT_KINDS:
            raise ValueError(f"text.kind must be one of {list(TEXT_KINDS)}, got {self.kind!r}")
        if self.text_len is None:
            object.__setattr__(self, "text_len", QWEN_VL_DEFAULTS["text_len"] if self.kind == "qwen_vl" else 16)
        _int("text.text_len", self.text_len, 1, 65536)
        _int("text.vocab", self.vocab, 2, 2**24)  # token ids hash into [1, vocab); 0 is end-of-text
        _int("text.heads", self.heads, 1, 1024)
        _opt_path("text.path", self.path)
        _opt_path("text.tokenizer", self.tokenizer)
        if self.tokenizer is not None and self.kind != "umt5":
            raise ValueError(f"text.tokenizer applies to text.kind 'umt5' only (the tiny encoder has no tokenizer files), got {self.tokenizer!r}")
        if self.kind != "qwen_vl":
            for key in _QWEN_VL_ONLY:
                if getattr(self, key) is not None:
                    raise ValueError(f"text.{key} applies to text.kind 'qwen_vl' only (the Qwen2.5-VL encoder), got {getattr(self, key)!r} "
                                     f"with text.kind {self.kind!r}")  # fmt: skip
            return
        for key in _QWEN_VL_ONLY:
            if getattr(self, key) is None:
                object.__setattr__(self, key, QWEN_VL_DEFAULTS[key])
        if not isinstance(self.text_only, bool):
            raise ValueError(f"text.text_only must be true or false, got {type(self.text_only).__name__} {self.text_only!r}")
        _hw("text.image_size", self.image_size)
        object.__setattr__(self, "image_size", tuple(self.image_size))
        _int("text.max_caption_tokens", self.max_caption_tokens, 1, 65536)
        if self.max_caption_tokens >= self.text_len:
            raise ValueError(f"text.max_caption_tokens must be < text.text_len = {self.text_len} (the chat turn also holds the "
                             f"template and the image tokens), got {self.max_caption_tokens}")  # fmt: skip


WAN_VAE = {"latent_channels": 16, "stride": (4, 8, 8)}  # the Wan2.1 VAE (docs/real_stack.md#wan21-vae)


@dataclass(frozen=True)
class VAESection:
    """``pixel``: the lossless space-to-depth "VAE" (``spatial``: its factor, 4 when null); ``wan``: the Wan2.1
    VAE (16 channels, stride 4 x 8 x 8), read from a latent cache; ``path`` is what ``recipes/prepare_data.py``
    encodes with (a diffusers pipeline or ``vae`` directory, or Wan's ``Wan2.1_VAE.pth``)."""

    kind: Literal["pixel", "wan"] = "pixel"
    spatial: Optional[int] = None
    path: Optional[str] = None

    def __post_init__(self):
        if self.kind not in ("pixel", "wan"):
            raise ValueError(f"vae.kind must be one of ['pixel', 'wan'], got {self.kind!r}")
        if self.spatial is not None:
            _int("vae.spatial", self.spatial, 1, 64)
        if self.kind == "wan" and self.spatial not in (None, WAN_VAE["stride"][1]):
            raise ValueError(f"vae.spatial is fixed at 8 for vae.kind 'wan' (the Wan2.1 VAE); remove it, got {self.spatial!r}")
        _opt_path("vae.path", self.path)
        if self.path is not None and self.kind != "wan":
            raise ValueError(f"vae.path applies to vae.kind 'wan' only (the pixel VAE has no weights), got {self.path!r}")

    @property
    def stride(self) -> tuple[int, int, int]:
        """(time, height, width) stride of the latents."""
        if self.kind == "wan":
            return WAN_VAE["stride"]
        s = 4 if self.spatial is None else self.spatial
        return (1, s, s)

    @property
    def latent_channels(self) -> int:
        return WAN_VAE["latent_channels"] if self.kind == "wan" else 3 * self.stride[1] ** 2


@dataclass(frozen=True)
class DataSection:
    kind: Literal["synthetic", "video", "latents"] = "synthetic"
    num_samples: int = 20000
    frames: int = 9
    size: tuple[int, int] = (32, 32)
    seed: int = 0
    index: Optional[str] = None  # kind=video: OSP-Next index file; kind=latents: the corpus prepare_data.py encodes
    train_fps: int = 16
    buckets: list = field(default_factory=lambda: [[480, 832]])
    num_workers: int = 0
    cache: Optional[str] = None  # kind=latents: the latent cache directory (recipes/prepare_data.py writes it)
    # kind=synthetic: null (plain clips), "all" or a list of style names (ospfn.styles.STYLES): image-to-stylised-video
    # clips, plain first frame then the stylised object; the caption is wrapped in the style's template for training
    styles: Union[str, list, None] = None

    def __post_init__(self):
        if self.kind not in ("synthetic", "video", "latents"):
            raise ValueError(f"data.kind must be one of ['synthetic', 'video', 'latents'], got {self.kind!r}")
        _int("data.num_samples", self.num_samples, 1, MAX_NUM_SAMPLES)
        _int("data.frames", self.frames, 1, 100_000)
        _hw("data.size", self.size)
        _int("data.seed", self.seed, 0, MAX_SEED)
        _int("data.train_fps", self.train_fps, 1, 1000)
        _int("data.num_workers", self.num_workers, 0, 1024)
        if not isinstance(self.buckets, (list, tuple)) or not self.buckets:
            raise ValueError(f"data.buckets must be a non-empty list of [H, W] pairs, got {self.buckets!r}")
        for i, b in enumerate(self.buckets):
            _hw(f"data.buckets[{i}]", b)
        if self.kind == "video" and (not isinstance(self.index, str) or not self.index.strip()):
            raise ValueError(f"data.index must name the OSP-Next index file when data.kind is 'video', got {self.index!r}")
        _opt_path("data.index", self.index)
        if self.kind == "latents" and self.cache is None:
            raise ValueError("data.cache must name the latent cache directory when data.kind is 'latents' (recipes/prepare_data.py writes it)")
        _opt_path("data.cache", self.cache)
        if self.cache is not None and self.kind != "latents":
            raise ValueError(f"data.cache applies to data.kind 'latents' only, got data.kind {self.kind!r}")
        check_styles("data.styles", self.styles)
        if self.styles is not None and self.kind != "synthetic":
            raise ValueError(f"data.styles applies to data.kind 'synthetic' only (real corpora carry a style field per clip), "
                             f"got data.kind {self.kind!r}")  # fmt: skip
        per_sample = 3 * self.frames * max(h * w for h, w in self.sizes()) * 4
        if per_sample > MAX_SAMPLE_BYTES:
            raise ValueError(
                f"data.frames x data.{'size' if self.kind == 'synthetic' else 'buckets'} make one fp32 video of {_gib(per_sample)} "
                f"({self.frames} frames); at most {_gib(MAX_SAMPLE_BYTES)} per sample"
            )

    def sizes(self) -> list[tuple[int, int]]:
        """The (H, W) sizes a sample can have: ``size`` for synthetic data, the ``buckets`` for video (and for the
        videos a latent cache was made from)."""
        return [tuple(self.size)] if self.kind == "synthetic" else [tuple(b) for b in self.buckets]


def check_styles(key: str, value) -> None:
    """``null``, ``"all"`` or a non-empty list of distinct style names (any spelling ``ospfn.styles.style_id`` takes)."""
    from ospfn.styles import STYLES, style_name

    if value is None or value == "all":
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{key} must be null, 'all' or a non-empty list of style names ({', '.join(STYLES)}), got {value!r}")
    names = []
    for i, v in enumerate(value):
        try:
            names.append(style_name(v))
        except (TypeError, ValueError):
            raise ValueError(f"{key}[{i}]: unknown style {v!r}; the 12 styles are: {', '.join(STYLES)}") from None
    if len(set(names)) != len(names):
        raise ValueError(f"{key} names a style twice: {list(value)}")


@dataclass(frozen=True)
class OptimSection:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-15
    warmup_steps: int = 0
    branch_lr_mult: float = 1.0  # lr multiplier of the zero-initialised FlashI2V branches (phi, Fourier embedding)
    ema_decay: float = 0.999
    adaptive_clip: bool = True
    clip_initial: float = 1.0
    clip_decay: float = 0.99
    clip_k: float = 3.0

    def __post_init__(self):
        check_optim(self)
        _int("optim.warmup_steps", self.warmup_steps, 0)
        _num("optim.branch_lr_mult", self.branch_lr_mult, 0)


def check_optim(sec) -> None:
    """Validate the AdamW / EMA / clipping keys an ``optim`` section shares with the RL config's (lr,
    weight_decay, betas, eps, ema_decay, adaptive_clip, clip_initial, clip_decay, clip_k)."""
    _num("optim.lr", sec.lr, 0, lo_open=True)
    _num("optim.weight_decay", sec.weight_decay, 0)
    if not isinstance(sec.betas, (list, tuple)) or len(sec.betas) != 2:
        raise ValueError(f"optim.betas must be a pair [beta1, beta2] of numbers in [0, 1), got {sec.betas!r}")
    for i, b in enumerate(sec.betas):
        _num(f"optim.betas[{i}]", b, 0, 1, hi_open=True)
    _num("optim.eps", sec.eps, 0, lo_open=True)
    _num("optim.ema_decay", sec.ema_decay, 0, 1, hi_open=True)
    if not isinstance(sec.adaptive_clip, bool):
        raise ValueError(f"optim.adaptive_clip must be true or false, got {type(sec.adaptive_clip).__name__} {sec.adaptive_clip!r}")
    _num("optim.clip_initial", sec.clip_initial, 0, lo_open=True)
    _num("optim.clip_decay", sec.clip_decay, 0, 1, hi_open=True)
    _num("optim.clip_k", sec.clip_k, 0)


@dataclass(frozen=True)
class LoraSection:
    """The trained adapter: rank, alpha, targets (in-block Linear names), init and seed (``ospfn.lora``); shared by the
    SFT config (``lora:``, adapter-only fine-tuning) and the RL config."""

    rank: int = 32
    alpha: float = 64.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    init: str = "gaussian"
    seed: int = 0

    def __post_init__(self):
        _int("lora.rank", self.rank, 1, 4096)
        _num("lora.alpha", self.alpha, 0, lo_open=True)
        t = self.targets
        if not isinstance(t, (list, tuple)) or not t or any(n not in LORA_MODULES for n in t) or len(set(t)) != len(t):
            raise ValueError(f"lora.targets must be a non-empty list of distinct names from {list(LORA_MODULES)}, got {t!r}")
        object.__setattr__(self, "targets", tuple(t))
        if self.init not in LORA_INITS:
            raise ValueError(f"lora.init must be one of {list(LORA_INITS)}, got {self.init!r}")
        _int("lora.seed", self.seed, 0)


@dataclass(frozen=True)
class AdapterSection:
    """The trained VLM adapter of a ``text.kind: qwen_vl`` run (``ospfn.model.vlm.VLMAdapterConfig``; its
    ``vlm_dim`` comes from the latent cache, ``text_dim`` from the model, ``latent_channels`` from the VAE):
    ``hidden_dim`` (4096 in the release), ``first_frame_tokens`` (append the first-frame latent's tokens),
    ``style_tokens`` (learned tokens per style appended last; 0: none; needs style-labelled data),
    ``checkpoint`` (null: a fresh ``init_adapter`` with ``seed``; else an adapter file to start from: the
    released one (``fc1.*`` / ``fc2.*``, ``.pt`` or ``.safetensors``) or an ospfn ``vlm_adapter.safetensors``;
    branches it lacks start from the seeded initialisation), ``train`` (false: frozen, with ``checkpoint``
    required and a ``lora`` section or ``model.train`` to train something else)."""

    hidden_dim: int = 4096
    first_frame_tokens: bool = False
    style_tokens: int = 0
    checkpoint: Optional[str] = None
    seed: int = 0
    train: bool = True  # false: the adapter (from checkpoint) stays frozen, e.g. the released I2SV LoRA recipe

    def __post_init__(self):
        if not isinstance(self.train, bool):
            raise ValueError(f"adapter.train must be true or false, got {type(self.train).__name__} {self.train!r}")
        _int("adapter.hidden_dim", self.hidden_dim, 1, 65536)
        if not isinstance(self.first_frame_tokens, bool):
            raise ValueError(f"adapter.first_frame_tokens must be true or false, got {type(self.first_frame_tokens).__name__} "
                             f"{self.first_frame_tokens!r}")  # fmt: skip
        _int("adapter.style_tokens", self.style_tokens, 0, 4096)
        _opt_path("adapter.checkpoint", self.checkpoint)
        _int("adapter.seed", self.seed, 0, MAX_SEED)


@dataclass(frozen=True)
class TrainSection:
    task: Literal["t2v", "flashi2v"] = "flashi2v"
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    text_drop: float = 0.1
    ratio_range: tuple[float, float] = (0.05, 0.95)
    shift: Union[float, str, None] = "dynamic"
    logit_normal: bool = True
    seed: int = 0
    grad_checkpoint: bool = False
    attn_backend: Optional[str] = None
    compile: bool = False  # torch.compile each DiT block (ospfn.train.step.compile_blocks)
    log_every: int = 10
    ckpt_every: int = 500
    keep: int = 2
    nonfinite: Literal["stop", "skip"] = "stop"  # a NaN / inf loss or gradient: stop the run, or skip the step

    def __post_init__(self):
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")
        if isinstance(self.shift, str) and self.shift != "dynamic":
            raise ValueError(f"train.shift must be a number, 'dynamic' or null, got {self.shift!r}")
        if self.shift is not None and not isinstance(self.shift, str):
            _num("train.shift", self.shift, 0, lo_open=True)
        for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep"):
            _int(f"train.{name}", getattr(self, name), 1)
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be one of ['fp32', 'bf16'], got {self.precision!r}")
        _num("train.text_drop", self.text_drop, 0, 1)
        if not isinstance(self.ratio_range, (list, tuple)) or len(self.ratio_range) != 2:
            raise ValueError(f"train.ratio_range must be a pair [lo, hi] of numbers in [0, 1], got {self.ratio_range!r}")
        lo, hi = (_num(f"train.ratio_range[{i}]", r, 0, 1) for i, r in enumerate(self.ratio_range))
        if lo > hi:
            raise ValueError(f"train.ratio_range must be [lo, hi] with lo <= hi, got {list(self.ratio_range)}")
        _int("train.seed", self.seed, -MAX_SEED - 1, MAX_SEED)  # (seed, step, micro) must fit a 64-bit generator seed
        if self.attn_backend is not None:
            from ospfn.backends import BACKENDS

            if self.attn_backend not in BACKENDS:
                raise ValueError(f"train.attn_backend must be null (automatic) or one of {list(BACKENDS)}, got {self.attn_backend!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"train.compile must be true or false, got {type(self.compile).__name__} {self.compile!r}")


@dataclass(frozen=True)
class ParallelSection:
    """Sequence parallelism under torchrun (data parallel = world / (skiparse_sp * ulysses_sp))."""

    skiparse_sp: int = 1
    ulysses_sp: int = 1

    def __post_init__(self):
        _int("parallel.skiparse_sp", self.skiparse_sp, 1)
        _int("parallel.ulysses_sp", self.ulysses_sp, 1)


@dataclass(frozen=True)
class SampleSection:
    """Defaults written into the exported pipeline (``scheduler``: ``euler`` or ``unipc``, as ``Pipeline.generate``
    takes it; ``teacache``: a threshold ``generate`` uses when called without ``teacache=``, with
    ``teacache_warmup`` uncached first steps; ``teacache=0`` in the call turns it off)."""

    steps: int = 30
    guidance: float = 3.0
    shift: float = 3.0
    fourier_ratio: float = 0.1
    fps: int = 8
    scheduler: Literal["euler", "unipc"] = "euler"
    teacache: Optional[float] = None  # a TeaCache threshold the pipeline samples with by default (null: none)
    teacache_warmup: int = 5  # the first steps that always run the blocks

    def __post_init__(self):
        if self.teacache is not None:
            _num("sample.teacache", self.teacache, 0)
        _int("sample.teacache_warmup", self.teacache_warmup, 0, 1_000_000)
        _int("sample.steps", self.steps, 1, 10_000)
        _num("sample.guidance", self.guidance, 0)
        _num("sample.shift", self.shift, 0, lo_open=True)
        _num("sample.fourier_ratio", self.fourier_ratio, 0, 1, hi_open=True)
        _int("sample.fps", self.fps, 1, 1000)
        if self.scheduler not in ("euler", "unipc"):
            raise ValueError(f"sample.scheduler must be one of ['euler', 'unipc'], got {self.scheduler!r}")


@dataclass(frozen=True)
class SFTConfig:
    out_dir: str
    model: ModelSection = field(default_factory=ModelSection)
    text: TextSection = field(default_factory=TextSection)
    vae: VAESection = field(default_factory=VAESection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: Optional[LoraSection] = None  # adapter-only fine-tuning: the DiT (model.checkpoint) and text encoder frozen
    adapter: Optional[AdapterSection] = None  # text.kind qwen_vl: the trained VLM adapter (Uniworld-OSP2.0)

    def __post_init__(self):
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise ValueError(f"out_dir must be a non-empty path, got {self.out_dir!r}")
        qwen = self.text.kind == "qwen_vl"
        if qwen and self.adapter is None:
            raise ValueError("adapter: text.kind 'qwen_vl' needs an adapter section (the trained VLM adapter: hidden_dim, "
                             "first_frame_tokens, style_tokens, checkpoint, seed; {} for the defaults)")  # fmt: skip
        if self.adapter is not None and not self.adapter.train:
            if self.adapter.checkpoint is None:
                raise ValueError("adapter.checkpoint must name the adapter to keep frozen when adapter.train is false "
                                 "(a frozen fresh adapter maps every caption to noise)")  # fmt: skip
            if self.lora is None and not dit_trained(self):
                raise ValueError("adapter.train is false, and neither a lora section nor model.train: true is set: the run "
                                 "would train nothing")  # fmt: skip
        if self.adapter is not None and not qwen:
            raise ValueError(f"adapter applies to text.kind 'qwen_vl' only (it maps the VLM's features to the DiT's context), "
                             f"got text.kind {self.text.kind!r}")  # fmt: skip
        if qwen and self.train.task != "flashi2v":
            raise ValueError(f"train.task must be 'flashi2v' with text.kind 'qwen_vl' (Uniworld-OSP2.0 is a FlashI2V model), "
                             f"got {self.train.task!r}")  # fmt: skip
        if self.lora is not None and self.model.train:
            raise ValueError("model.train must be false (or unset) with a lora section: an adapter run keeps the DiT frozen")
        if self.model.train is False:
            if self.lora is None and not qwen:
                raise ValueError("model.train is false (a frozen DiT) but nothing else would train: allowed with a lora section "
                                 "or with text.kind 'qwen_vl' (whose adapter trains)")  # fmt: skip
            if self.model.checkpoint is None:
                raise ValueError("model.checkpoint must name the frozen DiT when model.train is false (a frozen random model "
                                 "learns nothing)")  # fmt: skip
        if self.lora is not None and self.text.train:
            raise ValueError("text.train must be false with a lora section: an adapter run trains the LoRA only (the DiT and "
                             "the text encoder stay frozen)")  # fmt: skip
        if self.lora is not None and self.model.checkpoint is None:
            raise ValueError("model.checkpoint must name the base DiT a lora section adapts (an adapter on a random model "
                             "fine-tunes nothing)")  # fmt: skip
        dc, S, U = self.data, self.parallel.skiparse_sp, self.parallel.ulysses_sp
        for kind, key in ((self.text.kind, "text.kind"), (self.vae.kind, "vae.kind")):
            if kind in ("umt5", "qwen_vl", "wan") and dc.kind != "latents":
                raise ValueError(f"{key} {kind!r} is read through a latent cache: set data.kind: latents and data.cache, and "
                                 f"write the cache with recipes/prepare_data.py (got data.kind {dc.kind!r})")  # fmt: skip
        if dc.kind == "latents" and self.text.train:
            raise ValueError("text.train must be false with data.kind 'latents': the cache holds fixed text features")
        st, sh, sw = self.vae.stride
        if (dc.frames - 1) % st:
            raise ValueError(f"data.frames must be {st}k + 1 for vae.kind {self.vae.kind!r} (time stride {st}), got {dc.frames}")
        dit_cfg, _, _ = derive_configs(self)  # model.* / text.* (ValueError naming the section)
        _, ph, pw = dit_cfg.patch_size
        mh, mw = sh * ph, sw * pw
        key = "data.size" if dc.kind == "synthetic" else "data.buckets"
        for h, w in dc.sizes():
            if h % mh or w % mw:
                raise ValueError(
                    f"{key} {[h, w]} must be a multiple of vae.spatial x patch = {mh} x {mw} (the latent grid is patched into tokens)"
                )
        per_sample = 3 * dc.frames * max(h * w for h, w in dc.sizes()) * 4
        if self.train.batch_size * per_sample > MAX_BATCH_BYTES:
            raise ValueError(
                f"train.batch_size {self.train.batch_size} x one {_gib(per_sample)} video makes a {_gib(self.train.batch_size * per_sample)} "
                f"micro-batch; at most {_gib(MAX_BATCH_BYTES)} (use train.grad_accum for larger batches)"
            )
        if S * U > 1:
            from ospfn.parallel.mesh import ParallelConfig, ParallelState, check_model_parallel

            state = ParallelState(ParallelConfig(S, U), S * U, 0, 1, 0, None, 0, None, 0, None, 0, None)
            pt = dit_cfg.patch_size[0]
            for h, w in dc.sizes():
                grid = (max(1, ((dc.frames - 1) // st + 1) // pt), h // mh, w // mw)
                try:
                    check_model_parallel(dit_cfg, state, grid)
                except ValueError as e:
                    raise ValueError(f"parallel.skiparse_sp / parallel.ulysses_sp cannot apply to this model and data: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Config keys a resumed run may change: they do not alter the trajectory of the steps already taken
# (the learning rate is constant after warm-up, so extending ``train.steps`` continues the same run;
# ``train.compile`` changes how the blocks run, not what they compute, and older checkpoints lack it).
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep", "train.compile", "train.nonfinite", "sample.")


def resume_conflicts(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted config keys whose values differ between a checkpoint's config and the current one (and would
    change the training trajectory); empty when ``--resume`` may continue."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = prefix + key
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += resume_conflicts(a, b, name + ".")
        elif _plain(a) != _plain(b) and not any(name == k or (k.endswith(".") and name.startswith(k)) for k in RESUME_MAY_CHANGE):
            out.append(name)
    return out


def dit_trained(cfg: SFTConfig) -> bool:
    """Whether the run trains the DiT: ``model.train``, or when unset true without a lora section (an adapter run
    keeps its base frozen)."""
    return cfg.model.train if cfg.model.train is not None else cfg.lora is None


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def sample_order(num_samples: int, seed: int, start: int, count: int) -> list[int]:
    """Dataset indices for global sample positions [start, start + count): a fresh permutation per epoch,
    a pure function of (seed, epoch), so a resumed run reads exactly the samples it would have read."""
    out = []
    pos = start
    while len(out) < count:
        epoch, off = divmod(pos, num_samples)
        perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = min(count - len(out), num_samples - off)
        out.extend(perm[off : off + take].tolist())
        pos += take
    return out


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The CPU generator for the noise, sigmas, Fourier ratios and text dropout of one micro-step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + micro)


BRANCH_PREFIXES = ("learnable_proj.", "fourier_embedding.")


def param_groups(named: dict[str, torch.Tensor], branch_lr_mult: float) -> list[dict]:
    """Optimizer groups: the FlashI2V branches (zero-initialised, they must grow from nothing) may learn
    faster than the pretrained-or-fresh backbone; every group carries its ``lr_mult``."""
    branch = [v for k, v in named.items() if v.requires_grad and k.split(".", 1)[-1].startswith(BRANCH_PREFIXES)]
    rest = [v for k, v in named.items() if v.requires_grad and not k.split(".", 1)[-1].startswith(BRANCH_PREFIXES)]
    groups = [{"params": rest, "lr_mult": 1.0}]
    if branch:
        groups.append({"params": branch, "lr_mult": float(branch_lr_mult)})
    return groups


def split_params(params: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Trainable dict with "dit." / "text." prefixes -> (DiT params, text-encoder params)."""
    dit = {k[4:]: v for k, v in params.items() if k.startswith("dit.")}
    text = {k[5:]: v for k, v in params.items() if k.startswith("text.")}
    return dit, text


def join_params(dit: dict, text: dict) -> dict:
    return {**{f"dit.{k}": v for k, v in dit.items()}, **{f"text.{k}": v for k, v in text.items()}}


def derive_configs(cfg: SFTConfig):
    """(DiTConfig, TinyTextConfig or None for ``text.kind: umt5``, vae spec) of a recipe config; in_dim/out_dim
    follow the VAE, i2v the task, text_len the text section (a UMT5's width must equal the DiT's text_dim)."""
    from ospfn.model import DiTConfig
    from ospfn.model.text import TinyTextConfig

    vae = cfg.vae
    over = dict(cfg.model.overrides)
    for key in DERIVED_OVERRIDES:
        if key in over:
            raise ValueError(f"model.overrides.{key} is derived (VAE channels / train.task / text.text_len); remove it")
    try:
        dit_cfg = DiTConfig.preset(cfg.model.preset, **over, in_dim=vae.latent_channels, out_dim=vae.latent_channels,
                                   i2v="flashi2v" if cfg.train.task == "flashi2v" else "none", text_len=cfg.text.text_len)  # fmt: skip
    except (ValueError, TypeError) as e:
        unknown = sorted(set(over) - {f.name for f in dataclasses.fields(DiTConfig)})
        if unknown:
            raise ValueError(f"model.overrides.{unknown[0]} is not a DiTConfig field ({e})") from e
        raise ValueError(f"model.overrides (on preset {cfg.model.preset!r}): {e}") from e
    if cfg.text.kind != "tiny":  # umt5 / qwen_vl: features read from a latent cache
        text_cfg = None
    else:
        try:
            text_cfg = TinyTextConfig(text_dim=dit_cfg.text_dim, text_len=cfg.text.text_len, vocab=cfg.text.vocab, heads=cfg.text.heads)
        except ValueError as e:
            raise ValueError(f"text.heads / model text_dim: {e}") from e
    vae_spec = {"kind": "wan"} if vae.kind == "wan" else {"kind": "pixel", "spatial": vae.stride[1]}
    return dit_cfg, text_cfg, vae_spec


EXPORT_INFO = "ospfn_export.json"  # beside a DiT exported without its encoders (text.kind umt5 / vae.kind wan)


def export_pipeline(cfg: SFTConfig, weights: dict, out, info: Optional[dict] = None):
    """Write a pipeline directory from trainable weights with "dit." / "text." prefixes (e.g. the EMA).

    With the tiny text encoder and the pixel VAE (any ``data.kind``) that is a complete ospfn pipeline
    directory.  A run on a latent cache of the real encoders (``text.kind: umt5`` or ``vae.kind: wan``) writes
    the DiT only (``config.json`` + ``diffusion_pytorch_model.safetensors``, Wan names, what
    ``load_checkpoint`` reads) and ``ospfn_export.json``: the model type, the encoders' paths from the config
    and the sampling defaults, to be combined with the Wan2.1 text encoder and VAE it was trained on."""
    from ospfn.pipeline import save_pipeline

    dit_cfg, text_cfg, vae = derive_configs(cfg)
    if cfg.text.kind == "qwen_vl":
        return export_uniworld(cfg, weights, out, info)
    if cfg.lora is not None:
        return export_lora(cfg, weights, out, info)
    dit, text = split_params(weights)
    defaults = _sample_defaults(cfg)
    info = {**(info or {}), "config": cfg.to_dict()}
    if cfg.text.kind == "tiny" and cfg.vae.kind == "pixel":
        return save_pipeline(out, cfg=dit_cfg, params=dit, text_params=text, text_cfg=text_cfg, vae=vae, defaults=defaults, info=info)
    return _export_dit(cfg, dit_cfg, dit, text, Path(out), defaults, info)


def _sample_defaults(cfg: SFTConfig) -> dict:
    """The exported pipeline's sampling defaults: the data's frames and (first) size, the ``sample`` section."""
    size = list(cfg.data.sizes()[0]) if cfg.data.kind == "latents" else list(cfg.data.size)
    defaults = {"frames": cfg.data.frames, "size": size}
    defaults.update({k: getattr(cfg.sample, k) for k in ("steps", "guidance", "shift", "fourier_ratio", "fps", "scheduler")})
    if cfg.sample.teacache is not None:
        defaults["teacache"] = {"threshold": cfg.sample.teacache, "warmup_steps": cfg.sample.teacache_warmup}
    return defaults


LORA_PREFIX = "lora."  # the trainable weights of an adapter run: "lora." + the adapter's keys
CTX_PREFIX = "ctx."  # the trained VLM adapter of a qwen_vl run: "ctx." + ospfn.model.vlm's names (adapter.0.weight ...)
ADAPTER_FILE = "vlm_adapter.safetensors"  # the adapter in a uniworld export


def adapter_config_of(cfg: SFTConfig, dit_cfg, vlm_dim: int):
    """The ``ospfn.model.vlm.VLMAdapterConfig`` of a qwen_vl run: ``vlm_dim`` from the cache's features, the
    ``adapter`` section, ``text_dim`` of the DiT, ``latent_channels`` of the VAE (the DiT's in_dim), 2 x 2 patches
    and the 12 styles."""
    from ospfn.model.vlm import VLMAdapterConfig

    a = cfg.adapter
    return VLMAdapterConfig(vlm_dim=int(vlm_dim), hidden_dim=a.hidden_dim, text_dim=dit_cfg.text_dim, first_frame_tokens=a.first_frame_tokens,
                            latent_channels=dit_cfg.in_dim, style_tokens=a.style_tokens)  # fmt: skip


def export_uniworld(cfg: SFTConfig, weights: dict, out, info: Optional[dict] = None) -> Path:
    """Write a uniworld export of a ``text.kind: qwen_vl`` run (``weights``: the trainables, e.g. the EMA, with
    "ctx." and, as trained, "dit." / "lora." prefixes) into the directory ``out``:

    * ``config.json`` + ``diffusion_pytorch_model.safetensors``: the DiT -- the trained one with ``model.train``,
      else the frozen ``model.checkpoint`` as the run read it (FlashI2V branches created when it had none);
    * ``vlm_adapter.safetensors``: the adapter under ospfn's names, its ``VLMAdapterConfig`` in the metadata;
    * ``pytorch_lora_weights.safetensors`` with a lora section (diffusers format; ``load_pipeline`` merges it);
    * ``ospfn_export.json`` (written last): model type ``uniworld``, the VLM's path and settings, the adapter,
      the VAE, the sampling defaults, the run's info and config.  ``ospfn.pipeline.load_pipeline`` reads it."""
    import json

    from ospfn._fs import write_text_atomic
    from ospfn.model.checkpoint import load_checkpoint, save_checkpoint
    from ospfn.model.params import param_shapes
    from ospfn.model.vlm import check_adapter_params
    from ospfn.pipeline import save_vlm_adapter

    dit_cfg, _, vae = derive_configs(cfg)
    ctx = {k[len(CTX_PREFIX):]: v.detach().float().cpu() for k, v in weights.items() if k.startswith(CTX_PREFIX)}
    if "adapter.0.weight" not in ctx:
        raise ValueError(f"export_uniworld: the weights hold no VLM adapter ({CTX_PREFIX}adapter.*); got {sorted(weights)[:5]}")
    acfg = adapter_config_of(cfg, dit_cfg, ctx["adapter.0.weight"].shape[1])
    check_adapter_params(ctx, acfg, "export_uniworld")
    if dit_trained(cfg):
        dit, _ = split_params(weights)
        want = param_shapes(dit_cfg)
        if set(dit) != set(want) or any(tuple(dit[k].shape) != want[k] for k in want):
            raise ValueError(f"export_uniworld: the DiT weights do not match {cfg.model.preset!r} with the config's overrides: "
                             f"missing {sorted(set(want) - set(dit))[:5]}, unexpected {sorted(set(dit) - set(want))[:5]}")  # fmt: skip
    else:  # frozen: what the run trained against, read again (in the file's dtype)
        dit = load_checkpoint(cfg.model.checkpoint, dit_cfg, init_missing="flashi2v")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dit, out, cfg=dit_cfg)
    save_vlm_adapter(out / ADAPTER_FILE, ctx, acfg)
    full_info = {**(info or {}), "config": cfg.to_dict()}
    t = cfg.text
    meta = {
        "model_type": "uniworld",
        "text_encoder": {"kind": "qwen_vl", "path": t.path, "text_len": t.text_len, "text_only": t.text_only,
                         "image_size": list(t.image_size), "max_caption_tokens": t.max_caption_tokens},
        "adapter": {"file": ADAPTER_FILE, **dataclasses.asdict(acfg)},
        "vae": {"kind": cfg.vae.kind, "path": cfg.vae.path} if cfg.vae.kind == "wan" else {"kind": "pixel", "spatial": cfg.vae.stride[1]},
        "defaults": _sample_defaults(cfg),
        "info": full_info,
    }  # fmt: skip
    if cfg.lora is not None:
        from ospfn.lora.io import DIFFUSERS_WEIGHT_NAME

        export_lora(cfg, weights, out, info)
        meta["lora"] = DIFFUSERS_WEIGHT_NAME
    write_text_atomic(out / EXPORT_INFO, json.dumps(meta, indent=2) + "\n")
    return out


def lora_config_of(cfg: SFTConfig):
    """The ``ospfn.lora.LoraConfig`` of the config's ``lora`` section."""
    from ospfn.lora import LoraConfig

    lc = cfg.lora
    return LoraConfig(rank=lc.rank, alpha=lc.alpha, targets=lc.targets, init=lc.init)


def export_lora(cfg: SFTConfig, weights: dict, out, info: Optional[dict] = None) -> Path:
    """Write the adapter of an adapter run (``weights``: "lora."-prefixed, e.g. the EMA) in the diffusers LoRA
    format (``out/pytorch_lora_weights.safetensors``, what ``recipes/sample.py --lora`` and diffusers read); the
    run's config and ``info`` go into the file's metadata under ``ospfn_sft``."""
    import json

    from ospfn.lora import LoraAdapter, save_lora

    tensors = {k[len(LORA_PREFIX):]: v.detach().float().cpu().contiguous() for k, v in weights.items() if k.startswith(LORA_PREFIX)}
    adapter = LoraAdapter(lora_config_of(cfg), tensors)
    meta = {"ospfn_sft": json.dumps({**(info or {}), "base": cfg.model.checkpoint, "config": cfg.to_dict()})}
    save_lora(out, adapter, format="diffusers", metadata=meta)
    return Path(out)


def model_type(dit_cfg) -> str:
    """The pipeline model type of a DiT config: "flashi2v", "osp-next" (the dual_end Skiparse schedule) or "wan"."""
    if dit_cfg.i2v == "flashi2v":
        return "flashi2v"
    return "osp-next" if dit_cfg.skiparse_model_type == "dual_end" else "wan"


def _export_dit(cfg: SFTConfig, dit_cfg, dit: dict, text: dict, out: Path, defaults: dict, info: dict) -> Path:
    import json

    from ospfn._fs import write_text_atomic
    from ospfn.model.checkpoint import save_checkpoint
    from ospfn.model.params import param_shapes

    want = param_shapes(dit_cfg)
    if set(dit) != set(want) or any(tuple(dit[k].shape) != want[k] for k in want):
        raise ValueError(f"export_pipeline: the DiT weights do not match {cfg.model.preset!r} with the config's overrides: "
                         f"missing {sorted(set(want) - set(dit))[:5]}, unexpected {sorted(set(dit) - set(want))[:5]}")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dit, out, cfg=dit_cfg)
    if cfg.text.kind == "tiny":  # its (frozen) weights were part of the run: they travel with the DiT
        from ospfn._fs import atomic_path
        from safetensors.torch import save_file

        with atomic_path(out / "text_encoder.safetensors") as tmp:
            save_file({k: v.detach().float().contiguous().cpu() for k, v in text.items()}, tmp)
        te = {"kind": "tiny", "file": "text_encoder.safetensors", "text_dim": dit_cfg.text_dim, "text_len": cfg.text.text_len,
              "vocab": cfg.text.vocab, "heads": cfg.text.heads}  # fmt: skip
    else:
        te = {"kind": cfg.text.kind, "path": cfg.text.path, "tokenizer": cfg.text.tokenizer, "text_len": cfg.text.text_len}
    encoders = {
        "text_encoder": te,
        "vae": {"kind": cfg.vae.kind, "path": cfg.vae.path} if cfg.vae.kind == "wan" else {"kind": "pixel", "spatial": cfg.vae.stride[1]},
    }  # fmt: skip
    meta = {"model_type": model_type(dit_cfg), **encoders, "defaults": defaults, "info": info}
    write_text_atomic(out / EXPORT_INFO, json.dumps(meta, indent=2) + "\n")
    return out
