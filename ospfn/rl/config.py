"""The RL post-training config (``recipes/train_rl.py --config``): validated on load like the SFT config, every
key checked and named in its error (``rollout.k must be an int >= 2, got 1``).  Schema below; the defaults are
the Mix-GRPO / OSP-Next reference values (docs/rl.md#the-recipe), the shipped configs tune them for the model
at hand (``recipes/configs/tiny_flashi2v_rl.yaml``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ospfn.rl.grpo import AGGREGATIONS
from ospfn.rl.rollout import SDE_KINDS
from ospfn.rl.window import STRATEGIES
from ospfn.train.sft import LoraSection, _int, _num, check_optim

__all__ = ["RLConfig", "LoraSection", "PromptSection", "WindowSection", "RolloutSection", "RewardSpec", "GRPOSection",
           "RLOptimSection", "RLTrainSection", "RLParallelSection"]  # fmt: skip


def _bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")


@dataclass(frozen=True)
class PromptSection:
    """Where the prompts (captions and first frames) come from: the synthetic world's ``train`` split."""

    kind: str = "synthetic"
    num_prompts: int = 4096
    frames: int = 5
    size: tuple[int, int] = (32, 32)
    seed: int = 0

    def __post_init__(self):
        if self.kind != "synthetic":
            raise ValueError(f"prompts.kind must be 'synthetic' (the only prompt source so far), got {self.kind!r}")
        _int("prompts.num_prompts", self.num_prompts, 1)
        _int("prompts.frames", self.frames, 2)
        s = self.size
        if not isinstance(s, (list, tuple)) or len(s) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 16 for n in s):
            raise ValueError(f"prompts.size must be [H, W], ints >= 16, got {s!r}")
        object.__setattr__(self, "size", tuple(s))
        _int("prompts.seed", self.seed, 0)


@dataclass(frozen=True)
class WindowSection:
    """The SDE window schedule (``ospfn.rl.WindowSchedule``)."""

    strategy: str = "sliding"
    size: int = 4
    start: int = 0
    iters_per_window: int = 25
    shift_step: int = 1
    overlap: bool = True
    max_start: Optional[int] = None
    fraction: float = 0.6
    roll_back: bool = True

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"rollout.window.strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        for key in ("overlap", "roll_back"):
            _bool(f"rollout.window.{key}", getattr(self, key))


@dataclass(frozen=True)
class RolloutSection:
    """Sampling during RL: the inference schedule (shifted), guidance, k generations per prompt."""

    steps: int = 25
    shift: float = 7.0
    guidance: float = 5.0
    fourier_ratio: float = 0.1
    prompts_per_iter: int = 8
    k: int = 4
    shared_noise: bool = False
    sde: str = "osp"
    noise_level: Optional[float] = None
    compress: Optional[float] = None
    window: WindowSection = field(default_factory=WindowSection)

    def __post_init__(self):
        _int("rollout.steps", self.steps, 2, 10_000)
        _num("rollout.shift", self.shift, 0, lo_open=True)
        _num("rollout.guidance", self.guidance, 0)
        _num("rollout.fourier_ratio", self.fourier_ratio, 0, 1)
        _int("rollout.prompts_per_iter", self.prompts_per_iter, 1)
        _int("rollout.k", self.k, 2)  # a group of one has no advantage
        _bool("rollout.shared_noise", self.shared_noise)
        if self.sde not in SDE_KINDS:
            raise ValueError(f"rollout.sde must be one of {list(SDE_KINDS)}, got {self.sde!r}")
        if self.noise_level is not None:
            _num("rollout.noise_level", self.noise_level, 0, lo_open=True)
        if self.compress is not None:
            _num("rollout.compress", self.compress, 0, 1, lo_open=True)

    def schedule(self, seed: int):
        """The ``WindowSchedule`` of this section (its errors name ``rollout.window``)."""
        from ospfn.rl.window import WindowSchedule

        w = self.window
        kw = dataclasses.asdict(w)
        try:
            return WindowSchedule(steps=self.steps, seed=seed, **kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"rollout.window: {e}") from None


@dataclass(frozen=True)
class RewardSpec:
    """One reward: a name of ``ospfn.rl.rewards`` (``make_reward``), its weight and keyword arguments."""

    name: str = "fidelity"
    weight: float = 1.0
    args: dict = field(default_factory=dict)

    def __post_init__(self):
        from ospfn.rl.rewards import reward_registry

        if self.name not in reward_registry:
            raise ValueError(f"rewards: unknown reward {self.name!r}; known: {sorted(reward_registry)}")
        _num("rewards.weight", self.weight, 0)
        if not isinstance(self.args, dict):
            raise ValueError(f"rewards.args must be a mapping of keyword arguments, got {self.args!r}")


@dataclass(frozen=True)
class GRPOSection:
    """Advantages and the objective (``ospfn.rl.grpo``)."""

    clip_range: float = 1e-4
    beta: float = 0.004
    adv_clip: float = 5.0
    adv_eps: float = 1e-4
    global_std: bool = False
    aggregation: str = "advantage_aggr"
    micro_batch: int = 8

    def __post_init__(self):
        _num("grpo.clip_range", self.clip_range, 0, 1, lo_open=True, hi_open=True)
        _num("grpo.beta", self.beta, 0)
        _num("grpo.adv_clip", self.adv_clip, 0, lo_open=True)
        _num("grpo.adv_eps", self.adv_eps, 0)
        _bool("grpo.global_std", self.global_std)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"grpo.aggregation must be one of {list(AGGREGATIONS)}, got {self.aggregation!r}")
        _int("grpo.micro_batch", self.micro_batch, 1)


@dataclass(frozen=True)
class RLOptimSection:
    """AdamW over the adapter (the reference's defaults), adaptive gradient clipping as in SFT, EMA of the adapter."""

    lr: float = 2e-5
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-15
    ema_decay: float = 0.999
    adaptive_clip: bool = True
    clip_initial: float = 1.0
    clip_decay: float = 0.99
    clip_k: float = 3.0

    def __post_init__(self):
        check_optim(self)
        object.__setattr__(self, "betas", tuple(float(x) for x in self.betas))


@dataclass(frozen=True)
class RLTrainSection:
    iterations: int = 100
    seed: int = 0
    log_every: int = 1
    ckpt_every: int = 10
    keep: int = 2
    attn_backend: Optional[str] = None
    nonfinite: str = "stop"

    def __post_init__(self):
        _int("train.iterations", self.iterations, 1)
        _int("train.seed", self.seed, 0)
        _int("train.log_every", self.log_every, 1)
        _int("train.ckpt_every", self.ckpt_every, 1)
        _int("train.keep", self.keep, 1)
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")


@dataclass(frozen=True)
class RLParallelSection:
    """Under torchrun: sequence parallelism (data parallel = world / (skiparse_sp * ulysses_sp)) and how the
    DiT is held: ``fsdp: false`` (default) replicates it on every rank (single-file checkpoints written by rank
    0), ``fsdp: true`` shards it with FSDP2 over all ranks, only the LoRA adapter trainable (DCP checkpoints).
    One process ignores ``fsdp``."""

    skiparse_sp: int = 1
    ulysses_sp: int = 1
    fsdp: bool = False

    def __post_init__(self):
        _int("parallel.skiparse_sp", self.skiparse_sp, 1)
        _int("parallel.ulysses_sp", self.ulysses_sp, 1)
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"parallel.fsdp must be true (FSDP2: the DiT sharded over all ranks) or false (the DiT replicated on "
                             f"every rank), got {self.fsdp!r}")  # fmt: skip


@dataclass(frozen=True)
class RLConfig:
    """``out_dir``; ``pipeline``: the pipeline directory to post-train (None: the bundled tiny model); the
    sections above; ``rewards``: a list of ``RewardSpec``."""

    out_dir: str
    pipeline: Optional[str] = None
    lora: LoraSection = field(default_factory=LoraSection)
    prompts: PromptSection = field(default_factory=PromptSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    grpo: GRPOSection = field(default_factory=GRPOSection)
    optim: RLOptimSection = field(default_factory=RLOptimSection)
    train: RLTrainSection = field(default_factory=RLTrainSection)
    parallel: RLParallelSection = field(default_factory=RLParallelSection)

    def __post_init__(self):
        if not isinstance(self.out_dir, str) or not self.out_dir.strip():
            raise ValueError(f"out_dir must be a non-empty path, got {self.out_dir!r}")
        if self.pipeline is not None and (not isinstance(self.pipeline, str) or not self.pipeline.strip()):
            raise ValueError(f"pipeline must be a pipeline directory or null (the bundled tiny model), got {self.pipeline!r}")
        if not self.rewards:
            raise ValueError("rewards must name at least one reward, e.g. [{name: fidelity, weight: 1.0}]")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: each reward may appear once, got {names}")
        if sum(r.weight for r in self.rewards) <= 0:
            raise ValueError(f"rewards: the weights must not all be 0, got {[r.weight for r in self.rewards]}")
        self.rollout.schedule(self.train.seed)  # the window fits the steps (errors name rollout.window)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
