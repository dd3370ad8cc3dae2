"""TeaCache: skip the DiT's block stack on sampling steps whose input barely changed (docs/real_stack.md#teacache).

TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", arXiv
2411.19108) watches a cheap signal of every model call, the timestep-modulated input, and estimates from it
how much the expensive part (the blocks) would change its output since the previous step:

1. ``d = mean|s_k - s_{k-1}| / mean|s_{k-1}|``: the relative L1 change of the signal ``s`` of this call
   versus the previous step of the same branch;
2. ``acc += max(0, p(d))``: ``p`` is a per-model polynomial fitted offline so that ``p(d)`` tracks the
   relative change of the model output;
3. while ``acc < threshold`` the blocks are skipped and the previous residual (blocks output - blocks input,
   the stream before the head) is added to this call's block input; otherwise the blocks run, their residual
   is stored and ``acc`` restarts from 0.

The first ``warmup_steps`` steps, and the last one when ``steps`` is given, always run the blocks.  Each
classifier-free-guidance branch keeps its own signal history, accumulator and residual.

For Wan2.1 the published variant (TeaCache4Wan2.1) has two modes, and both are presets here:

* the default, "retention" mode (``use_ret_steps`` upstream, recommended there): the signal is the blocks'
  time modulation ``e0`` [B, 6, dim] (``time_projection`` output), the first 5 steps are never skipped;
  presets ``wan2.1-t2v-1.3b``, ``wan2.1-t2v-14b``, ``wan2.1-i2v-480p``, ``wan2.1-i2v-720p``;
* the original mode: the signal is the time embedding ``e`` [B, dim], upstream skips neither the first nor the
  last step (``warmup_steps=1`` and ``steps=`` here); the same names with ``-temb`` appended.

Both signals depend on the timestep only, so under sequence parallelism (every rank has the same ``t``) every
rank computes the same ``d`` and takes the same decision without communicating.

    >>> import torch
    >>> from ospfn.model import DiTConfig, forward, init_params
    >>> from ospfn.sched import sample
    >>> cfg = DiTConfig.preset("tiny", num_layers=2, num_full_blocks=0)
    >>> params = init_params(cfg, seed=0)
    >>> tc = TeaCache(TeaCacheConfig(threshold=2.0, warmup_steps=2, coefficients="identity"), branches=1, steps=8)
    >>> z = sample(params, cfg, noise=torch.randn(1, cfg.in_dim, 1, 8, 8), context=torch.randn(1, 4, cfg.text_dim),
    ...            steps=8, forward_fn=tc.wrap(forward))
    >>> tc.stats()["calls"], tc.skipped, tc.stats()["skipped_steps"]
    (8, 4, [[2, 3, 5, 6]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

__all__ = ["TeaCacheConfig", "TeaCache", "PRESETS", "rescale"]

# Rescaling polynomials, highest degree first (numpy.poly1d order), and the signal each was fitted on.
# Source: the coefficient tables of TeaCache4Wan2.1/teacache_generate.py in the TeaCache repository
# (github.com/ali-vilab/TeaCache; read in its public forks ChloeMVan/TeaCache and spawner1145/TeaCache):
# with use_ret_steps the e0 tables (Wan2.1 T2V 1.3B / 14B, I2V-14B 480P / 720P), without it the e tables.
PRESETS: dict[str, tuple[tuple[float, ...], str]] = {
    "wan2.1-t2v-1.3b": ((-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02), "e0"),
    "wan2.1-t2v-14b": ((-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01), "e0"),
    "wan2.1-i2v-480p": ((2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01), "e0"),
    "wan2.1-i2v-720p": ((8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02), "e0"),
    "wan2.1-t2v-1.3b-temb": ((2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01), "e"),
    "wan2.1-t2v-14b-temb": ((-5.78454975374e03, 5.44950911966e03, -1.81116591783e03, 2.5627178429e02, -1.302252404e01), "e"),
    "wan2.1-i2v-480p-temb": ((-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01), "e"),
    "wan2.1-i2v-720p-temb": ((-1.1436346466e02, 6.526524496e01, -1.882220707e01, 4.91518089e00, -2.3412683e-01), "e"),
    # no rescaling: the accumulator sums the signal's relative changes themselves (models without a fit)
    "identity": ((1.0, 0.0), "e0"),
}
SIGNALS = ("e0", "e")


def rescale(coefficients, d: float) -> float:
    """``p(d)`` for ``coefficients`` highest degree first (Horner, in Python floats = float64).

    >>> rescale((2.0, -1.0, 0.5), 0.1)  # 2 * 0.01 - 0.1 + 0.5
    0.42
    """
    acc = 0.0
    for c in coefficients:
        acc = acc * d + c
    return acc


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TeaCacheConfig:
    """What TeaCache skips.

    ``threshold``: finite >= 0; the accumulated rescaled change below which the blocks are skipped (0: never
    skip; the published Wan2.1 settings are about 0.05-0.2, 0.1 for Uniworld's image-to-video sampling).
    ``warmup_steps``: int >= 0, the first steps that always run the blocks (the first call always does: no
    residual exists yet).  ``coefficients``: a preset name of ``PRESETS`` or a tuple of finite floats, highest
    degree first (``(1.0, 0.0)`` is the identity).  ``signal``: ``"e0"`` (the blocks' time modulation) or
    ``"e"`` (the time embedding); None takes the preset's own (``"e0"`` for a tuple).  A preset fitted on one
    signal refuses the other.
    """

    threshold: float
    warmup_steps: int = 5
    coefficients: Union[str, tuple] = "wan2.1-t2v-1.3b"
    signal: Optional[str] = None

    def __post_init__(self):
        fn = "TeaCacheConfig"
        if not _is_real(self.threshold) or self.threshold < 0:
            raise ValueError(f"{fn}: threshold must be a finite number >= 0 (0 = never skip), got {self.threshold!r}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"{fn}: warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        c = self.coefficients
        if isinstance(c, str):
            if c not in PRESETS:
                raise ValueError(f"{fn}: unknown coefficients preset {c!r}; presets: {sorted(PRESETS)} (or a tuple of floats, "
                                 "highest degree first)")  # fmt: skip
            preset_signal = PRESETS[c][1]
            if self.signal is not None and self.signal != preset_signal:
                raise ValueError(f"{fn}: preset {c!r} was fitted on signal {preset_signal!r}, got signal={self.signal!r}")
        elif isinstance(c, (tuple, list)):
            if not c or not all(_is_real(v) for v in c):
                raise ValueError(f"{fn}: coefficients must be a non-empty tuple of finite floats (highest degree first), got {c!r}")
            object.__setattr__(self, "coefficients", tuple(float(v) for v in c))
        else:
            raise TypeError(f"{fn}: coefficients must be a preset name (str) or a tuple of floats, got {type(c).__name__}")
        if self.signal is not None and self.signal not in SIGNALS:
            raise ValueError(f"{fn}: signal must be one of {SIGNALS} or None (the preset's), got {self.signal!r}")

    @property
    def polynomial(self) -> tuple[float, ...]:
        """The rescaling coefficients, highest degree first."""
        return PRESETS[self.coefficients][0] if isinstance(self.coefficients, str) else self.coefficients

    @property
    def resolved_signal(self) -> str:
        """``"e0"`` or ``"e"``: the signal the accumulator watches."""
        if self.signal is not None:
            return self.signal
        return PRESETS[self.coefficients][1] if isinstance(self.coefficients, str) else "e0"


@dataclass
class _Branch:
    """The cache state of one CFG branch."""

    step: int = -1  # index of the current step in the trajectory (-1: none yet)
    prev_t: Optional[torch.Tensor] = None  # this branch's t of the previous call (CPU, fp64)
    prev_signal: Optional[torch.Tensor] = None  # its signal at the previous call
    key: Optional[tuple] = None  # (shape, dtype, device) of its stream chunk
    acc: float = 0.0
    residual: Optional[torch.Tensor] = None
    calls: int = 0
    skipped_steps: list = field(default_factory=list)


class _Call:
    """The ``RunOptions.cache`` object of one wrapped model call (the protocol of ``ospfn.model.RunOptions``)."""

    def __init__(self, tc: "TeaCache", t: torch.Tensor):
        self.tc = tc
        self.t = t.detach().to("cpu", torch.float64)
        self.consulted = False

    def before_blocks(self, x: torch.Tensor, e: torch.Tensor, e0: torch.Tensor) -> Optional[torch.Tensor]:
        tc, nb = self.tc, self.tc.branches
        if self.consulted:
            raise RuntimeError("TeaCache: one wrapped call ran the model twice; wrap the model forward itself")
        self.consulted = True
        if x.shape[0] != self.t.shape[0]:
            raise ValueError(f"TeaCache: the stream's batch {x.shape[0]} differs from t's {self.t.shape[0]}")
        c = x.shape[0] // nb
        sig = (e0 if tc.config.resolved_signal == "e0" else e).detach()
        xs, ss, ts = x.split(c), sig.split(c), self.t.split(c)
        # relative L1 changes of every branch that has a history, read from the device in one transfer
        fresh = []
        for b, st in enumerate(tc._state):
            key = (tuple(xs[b].shape), xs[b].dtype, xs[b].device)
            new = st.prev_t is None or st.key != key or bool((ts[b] > st.prev_t).any())
            if new:  # a new trajectory (first call, other latents, or t went up): forget this branch's past
                tc._state[b] = st = _Branch(key=key, calls=st.calls, skipped_steps=st.skipped_steps)
            fresh.append(new)
        dists = [(ss[b] - st.prev_signal).abs().mean() / st.prev_signal.abs().mean()
                 for b, st in enumerate(tc._state) if st.prev_signal is not None]  # fmt: skip
        dists = torch.stack(dists).tolist() if dists else []
        skip = []
        for b, st in enumerate(tc._state):
            if fresh[b] or not torch.equal(ts[b], st.prev_t):
                st.step += 1
            st.calls += 1
            forced = (st.step < tc.config.warmup_steps or st.residual is None or st.prev_signal is None
                      or (tc.steps is not None and st.step >= tc.steps - 1))  # fmt: skip
            d = None if st.prev_signal is None else dists.pop(0)
            if forced:
                st.acc = 0.0
                skip.append(False)
            else:
                st.acc += max(0.0, rescale(tc.config.polynomial, d))
                skip.append(st.acc < tc.config.threshold)
            st.prev_signal, st.prev_t = ss[b].clone(), ts[b].clone()
        if not all(skip):
            return None  # the blocks run for the whole batch; after_blocks refreshes every branch
        for b, st in enumerate(tc._state):
            st.skipped_steps.append(st.step)
        if nb == 1:
            return x + tc._state[0].residual
        return torch.cat([xs[b] + st.residual for b, st in enumerate(tc._state)])

    def after_blocks(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        res = (x_out - x_in).detach()
        c = res.shape[0] // self.tc.branches
        for b, st in enumerate(self.tc._state):
            st.residual = res[b * c : (b + 1) * c]
            st.acc = 0.0  # a branch that could have skipped but ran with the others restarts too


class TeaCache:
    """TeaCache state for one sampling run (or several in a row: a rising ``t`` starts over).

    ``config``: a ``TeaCacheConfig`` (or a bare threshold, the other fields at their defaults).
    ``branches``: the CFG branches stacked along the batch of every model call (1 without guidance; 2 for
    ``ospfn.sched.sample`` with guidance: chunk 0 unconditional, chunk 1 conditional); each keeps its own
    state.  ``steps``: the number of sampling steps, when known; the last one then always runs the blocks.

    ``tc.wrap(forward_fn)`` returns a function with ``ospfn.model.forward``'s signature that runs
    ``forward_fn`` with ``RunOptions(cache=...)``; a call whose ``t`` differs from the previous call's starts
    a new step; a ``t`` higher than before, or latents of another shape, start a new trajectory (state
    cleared, counters kept).  Skipped calls run the embeddings and the head only.  For sampling only: the
    residuals are stored without gradient.
    """

    def __init__(self, config, *, branches: int, steps: Optional[int] = None):
        fn = "TeaCache"
        if _is_real(config):
            config = TeaCacheConfig(threshold=config)
        if not isinstance(config, TeaCacheConfig):
            raise TypeError(f"{fn}: config must be a TeaCacheConfig or a threshold (float), got {type(config).__name__}")
        if isinstance(branches, bool) or not isinstance(branches, int) or branches < 1:
            raise ValueError(f"{fn}: branches must be an int >= 1 (1 without guidance, 2 with CFG), got {branches!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"{fn}: steps must be an int >= 1 or None (unknown), got {steps!r}")
        self.config, self.branches, self.steps = config, branches, steps
        self._calls = 0
        self._state = [_Branch() for _ in range(branches)]

    def reset(self) -> None:
        """Forget every branch's history and residual, and zero the counters."""
        self._calls = 0
        self._state = [_Branch() for _ in range(self.branches)]

    @property
    def skipped(self) -> int:
        """Skipped model calls, summed over the branches (a CFG step skipped in both branches counts 2)."""
        return sum(len(st.skipped_steps) for st in self._state)

    def stats(self) -> dict:
        """Counters and settings: ``calls`` (wrapped model calls), ``branch_calls`` (calls x branches),
        ``skipped`` (as ``tc.skipped``), ``skip_fraction`` (skipped / branch_calls), ``skipped_steps`` (per
        branch, the step indices skipped), ``step`` (per branch, the index of its current step in the
        trajectory, -1 before any call), ``accumulated`` (per branch, the accumulator now), ``threshold``,
        ``warmup_steps``, ``coefficients``, ``signal``, ``steps``, ``branches``."""
        branch_calls = sum(st.calls for st in self._state)
        cfg = self.config
        return {
            "calls": self._calls,
            "branch_calls": branch_calls,
            "skipped": self.skipped,
            "skip_fraction": self.skipped / branch_calls if branch_calls else 0.0,
            "skipped_steps": [list(st.skipped_steps) for st in self._state],
            "step": [st.step for st in self._state],
            "accumulated": [st.acc for st in self._state],
            "threshold": cfg.threshold,
            "warmup_steps": cfg.warmup_steps,
            "coefficients": cfg.coefficients if isinstance(cfg.coefficients, str) else list(cfg.coefficients),
            "signal": cfg.resolved_signal,
            "steps": self.steps,
            "branches": self.branches,
        }

    def wrap(self, forward_fn: Callable) -> Callable:
        """``forward_fn`` (``ospfn.model.forward`` or a function passing ``run`` on to it) with this cache."""
        if not callable(forward_fn):
            raise TypeError(f"TeaCache.wrap: forward_fn must be callable like ospfn.model.forward, got {type(forward_fn).__name__}")
        from ospfn.model import RunOptions

        def cached_forward(params, cfg, x, t, context, *, image=None, run=None):
            fn = "TeaCache"
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise TypeError(f"{fn}: t must be a 1-D tensor of timesteps [B], got {getattr(t, 'shape', type(t).__name__)}")
            if t.shape[0] % self.branches:
                raise ValueError(f"{fn}: the batch {t.shape[0]} of a call must split into branches={self.branches} equal chunks")
            if run is not None and not isinstance(run, RunOptions):
                raise TypeError(f"{fn}: run must be an ospfn.model.RunOptions or None, got {type(run).__name__}")
            if run is not None and run.cache is not None:
                raise ValueError(f"{fn}: run already carries a cache ({type(run.cache).__name__}); one cache per call")
            call = _Call(self, t)
            run = RunOptions(cache=call) if run is None else run.replace(cache=call)
            out = forward_fn(params, cfg, x, t, context, image=image, run=run)
            if not call.consulted:
                raise RuntimeError(f"{fn}: the wrapped forward_fn never consulted RunOptions.cache; wrap ospfn.model.forward "
                                   "or a function that passes run= on to it")  # fmt: skip
            self._calls += 1
            return out

        return cached_forward
