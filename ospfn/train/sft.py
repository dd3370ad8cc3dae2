"""SFT recipe pieces: the YAML schema, data order, building blocks of one training step.

``recipes/train.py`` is the loop; the decisions that make a run reproducible and resumable live here:
the data order is a function of (seed, global sample position), the noise of every micro-step is drawn
from a generator seeded by (seed, step, micro-step), and everything else is in the checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch

__all__ = ["SFTConfig", "resume_conflicts", "sample_order", "step_generator", "split_params", "join_params"]


@dataclass(frozen=True)
class ModelSection:
    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)
    checkpoint: Optional[str] = None  # initial DiT weights (any format load_checkpoint reads)


@dataclass(frozen=True)
class TextSection:
    kind: Literal["tiny"] = "tiny"
    text_len: int = 16
    vocab: int = 1024
    heads: int = 2
    train: bool = True


@dataclass(frozen=True)
class VAESection:
    kind: Literal["pixel"] = "pixel"
    spatial: int = 4


@dataclass(frozen=True)
class DataSection:
    kind: Literal["synthetic", "video"] = "synthetic"
    num_samples: int = 20000
    frames: int = 9
    size: tuple[int, int] = (32, 32)
    seed: int = 0
    index: Optional[str] = None  # kind=video: OSP-Next index file
    train_fps: int = 16
    buckets: list = field(default_factory=lambda: [[480, 832]])
    num_workers: int = 0


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

    def __post_init__(self):
        if isinstance(self.shift, str) and self.shift != "dynamic":
            raise ValueError(f"train.shift must be a number, 'dynamic' or null, got {self.shift!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.text_drop <= 1.0:
            raise ValueError(f"train.text_drop must be in [0, 1], got {self.text_drop}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"train.compile must be true or false, got {type(self.compile).__name__} {self.compile!r}")


@dataclass(frozen=True)
class ParallelSection:
    """Sequence parallelism under torchrun (data parallel = world / (skiparse_sp * ulysses_sp))."""

    skiparse_sp: int = 1
    ulysses_sp: int = 1


@dataclass(frozen=True)
class SampleSection:
    """Defaults written into the exported pipeline."""

    steps: int = 30
    guidance: float = 3.0
    shift: float = 3.0
    fourier_ratio: float = 0.1
    fps: int = 8


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Config keys a resumed run may change: they do not alter the trajectory of the steps already taken
# (the learning rate is constant after warm-up, so extending ``train.steps`` continues the same run;
# ``train.compile`` changes how the blocks run, not what they compute, and older checkpoints lack it).
RESUME_MAY_CHANGE = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep", "train.compile", "sample.")


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
    """(DiTConfig, TinyTextConfig, vae spec) of a recipe config; in_dim/out_dim follow the VAE, i2v the task."""
    from ospfn.model import DiTConfig
    from ospfn.model.text import TinyTextConfig
    from ospfn.model.vae import PixelVAE

    vae = PixelVAE(cfg.vae.spatial)
    over = dict(cfg.model.overrides)
    for key in ("in_dim", "out_dim", "i2v", "text_len"):
        if key in over:
            raise ValueError(f"model.overrides.{key} is derived (VAE channels / train.task / text.text_len); remove it")
    dit_cfg = DiTConfig.preset(cfg.model.preset, **over, in_dim=vae.latent_channels, out_dim=vae.latent_channels,
                               i2v="flashi2v" if cfg.train.task == "flashi2v" else "none", text_len=cfg.text.text_len)  # fmt: skip
    text_cfg = TinyTextConfig(text_dim=dit_cfg.text_dim, text_len=cfg.text.text_len, vocab=cfg.text.vocab, heads=cfg.text.heads)
    return dit_cfg, text_cfg, {"kind": cfg.vae.kind, "spatial": cfg.vae.spatial}


def export_pipeline(cfg: SFTConfig, weights: dict, out, info: Optional[dict] = None):
    """Write a pipeline directory from trainable weights with "dit." / "text." prefixes (e.g. the EMA)."""
    from ospfn.pipeline import save_pipeline

    dit_cfg, text_cfg, vae = derive_configs(cfg)
    dit, text = split_params(weights)
    defaults = {"frames": cfg.data.frames, "size": list(cfg.data.size)}
    defaults.update({k: getattr(cfg.sample, k) for k in ("steps", "guidance", "shift", "fourier_ratio", "fps")})
    return save_pipeline(out, cfg=dit_cfg, params=dit, text_params=text, text_cfg=text_cfg, vae=vae, defaults=defaults,
                         info={**(info or {}), "config": cfg.to_dict()})  # fmt: skip
