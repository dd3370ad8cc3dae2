"""Which sampling steps are stochastic (SDE) and trained at each GRPO iteration (docs/rl.md#sde-window-strategies).

A ``WindowSchedule`` is a frozen description; ``window(iteration)`` and ``train_steps(iteration)`` are pure
functions of the iteration number, so a resumed run only needs the iteration to find its window again.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Optional

__all__ = ["WindowSchedule", "STRATEGIES", "mix_seed"]

STRATEGIES = ("sliding", "fixed", "random", "all")


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every int of ``parts`` (BLAKE2b of their decimal text): the same on every
    machine and Python process, unlike ``hash``.

    >>> mix_seed(0, 1) == mix_seed(0, 1) != mix_seed(1, 0)
    True
    """
    for k, p in enumerate(parts):
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"mix_seed: part {k} must be an int, got {type(p).__name__}")
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _int(v: object, arg: str, lo: int, hi: Optional[int] = None, what: str = "") -> int:
    rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"WindowSchedule: {arg} must be an int {rng}{what}, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"WindowSchedule: {arg} must be an int {rng}{what}, got {v}")
    return v


@dataclass(frozen=True)
class WindowSchedule:
    """The SDE window of each iteration.  ``steps`` = N sampling steps (indices 0 .. N - 1; the last step, to
    sigma = 0, is never stochastic).

    - ``"sliding"`` (Mix-GRPO): ``range(s, min(s + size, max_start + 1))`` with s = ``start`` + j * stride for
      the j-th block of ``iters_per_window`` iterations; stride = ``shift_step`` when ``overlap`` else ``size``
      (``shift_step`` 0 keeps the window in place).  Starts beyond ``max_start`` (default N - 3, so the window
      ends before step N - 2 as in Mix-GRPO) roll back to ``start`` (``roll_back``) or are clamped to
      ``max_start``.
    - ``"fixed"`` (OSP-Next: ``start`` 0, ``size`` 10): ``range(start, start + size)`` always.
    - ``"random"``: a start drawn uniformly from [0, max_start + 1 - size] per iteration, a function of
      (``seed``, iteration).
    - ``"all"`` (DanceGRPO): every step but the last is stochastic; ``train_steps`` is a seeded random subset
      of floor((N - 1) * ``fraction``) of them (at least one), drawn per iteration.

    >>> w = WindowSchedule("sliding", steps=25, size=4, iters_per_window=25)
    >>> list(w.window(0)), list(w.window(25)), list(w.window(21 * 25)), list(w.window(23 * 25))
    ([0, 1, 2, 3], [1, 2, 3, 4], [21, 22], [0, 1, 2, 3])
    """

    strategy: str = "sliding"
    steps: int = 25
    size: int = 4
    start: int = 0
    iters_per_window: int = 25
    shift_step: int = 1
    overlap: bool = True
    max_start: Optional[int] = None
    seed: int = 0
    fraction: float = 0.6
    roll_back: bool = True

    def __post_init__(self):
        if not isinstance(self.strategy, str) or self.strategy not in STRATEGIES:
            raise ValueError(f"WindowSchedule: strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        n = _int(self.steps, "steps", 2, what=" (sampling steps)")
        if self.strategy == "all":
            frac = self.fraction
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
                raise ValueError(f"WindowSchedule: fraction must be a number in (0, 1], got {frac!r}")
            _int(self.seed, "seed", -(2**63))
            return
        _int(self.size, "size", 1, n - 1, " (SDE steps per window; the last step is never stochastic)")
        if self.strategy == "fixed":
            _int(self.start, "start", 0, n - 1 - self.size, f" (a window of size {self.size} must end before the last step {n - 1})")
            return
        ms = self.last_start
        _int(ms, "max_start", 0, n - 2, f" (the last window start; {n} steps)")
        if self.strategy == "random":
            _int(self.size, "size", 1, ms + 1, f" (windows lie in [0, max_start={ms}])")
            _int(self.seed, "seed", -(2**63))
            return
        _int(self.start, "start", 0, ms, f" (at most max_start={ms})")
        _int(self.iters_per_window, "iters_per_window", 1)
        _int(self.shift_step, "shift_step", 0)
        for arg in ("overlap", "roll_back"):
            if not isinstance(getattr(self, arg), bool):
                raise TypeError(f"WindowSchedule: {arg} must be a bool, got {type(getattr(self, arg)).__name__}")

    @property
    def last_start(self) -> int:
        """The largest window start (``max_start`` or its default N - 3)."""
        return max(self.steps - 3, 0) if self.max_start is None else self.max_start

    def _iteration(self, iteration: object) -> int:
        if isinstance(iteration, bool) or not isinstance(iteration, int):
            raise TypeError(f"WindowSchedule: iteration must be an int >= 0, got {type(iteration).__name__}")
        if iteration < 0:
            raise ValueError(f"WindowSchedule: iteration must be an int >= 0, got {iteration}")
        return iteration

    def window_start(self, iteration: int) -> int:
        """The first SDE step at ``iteration`` (0 for ``"all"``)."""
        it = self._iteration(iteration)
        if self.strategy == "all":
            return 0
        if self.strategy == "fixed":
            return self.start
        last = self.last_start
        if self.strategy == "random":
            return random.Random(mix_seed(self.seed, it)).randrange(last + 2 - self.size)
        stride = self.shift_step if self.overlap else self.size
        block = it // self.iters_per_window
        if stride == 0:
            return self.start
        if self.start + block * stride <= last:
            return self.start + block * stride
        if not self.roll_back:
            return last
        positions = (last - self.start) // stride + 1  # starts start, start + stride, ... <= last, then again
        return self.start + (block % positions) * stride

    def window(self, iteration: int) -> range:
        """The SDE step indices of the rollout at ``iteration`` (a non-empty ``range``)."""
        s = self.window_start(iteration)
        if self.strategy == "all":
            return range(0, self.steps - 1)
        if self.strategy == "fixed":
            return range(s, s + self.size)
        return range(s, min(s + self.size, self.last_start + 1))

    def train_steps(self, iteration: int) -> tuple[int, ...]:
        """The steps whose log-probabilities are trained at ``iteration``: the window itself, except for ``"all"``
        (a sorted random subset of floor((N - 1) * fraction) window steps, a function of (seed, iteration))."""
        win = self.window(iteration)
        if self.strategy != "all":
            return tuple(win)
        count = max(int(len(win) * self.fraction), 1)
        picked = random.Random(mix_seed(self.seed, iteration, 1)).sample(list(win), count)
        return tuple(sorted(picked))
