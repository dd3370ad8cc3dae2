"""Group-relative advantages and the clipped GRPO objective (docs/rl.md#advantages, docs/rl.md#objective).

Batches are laid out by prompt group: with ``group_size`` k, samples b = g k .. g k + k - 1 are the k
generations of prompt g (the order of ``repeat_interleave`` and of ``initial_noise``).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from ospfn.sched.flow import check_number

__all__ = ["AGGREGATIONS", "group_advantages", "combine_rewards", "nonzero_advantage_mask", "ppo_loss", "kl_penalty",
           "loss_scale", "grpo_loss"]

AGGREGATIONS = ("advantage_aggr", "reward_aggr")


def _rewards(r: object, fn: str, arg: str) -> torch.Tensor:
    if not isinstance(r, torch.Tensor) or r.dim() != 1 or not (r.dtype.is_floating_point or r.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{fn}: {arg} must be a 1-D real tensor [B], got "
                        f"{getattr(r, 'dtype', type(r).__name__)} {tuple(getattr(r, 'shape', ()))}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"{fn}: {arg} must be finite, got {r[~torch.isfinite(r)][:4].tolist()}")
    return r.float()


def _group_size(k: object, b: int, fn: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{fn}: group_size must be an int >= 2, got {type(k).__name__}")
    if k < 2 or b % k != 0:
        raise ValueError(f"{fn}: group_size must be an int >= 2 that divides the batch ({b}), got {k}")
    return k


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    eps: float = 1e-4,
    global_std: bool = False,
    clip: Optional[float] = 5.0,
) -> torch.Tensor:
    """A = (r - mean_group) / (std + eps), clamped to [-clip, clip] (``clip`` None: no clamp), fp32 [B].

    mean and std are over each group of ``group_size`` samples; ``global_std`` takes the std over the whole batch
    instead (the mean stays per group).  std is the sample standard deviation (n - 1).  A group whose rewards
    are all equal gets exactly 0.

    >>> [round(a, 4) for a in group_advantages(torch.tensor([1.0, 3.0, 2.0, 2.0]), 2).tolist()]  # std sqrt(2)
    [-0.7071, 0.7071, 0.0, 0.0]
    """
    fn = "group_advantages"
    r = _rewards(rewards, fn, "rewards")
    k = _group_size(group_size, r.shape[0], fn)
    eps = check_number(eps, fn, "eps", lo=0)
    if not isinstance(global_std, bool):
        raise TypeError(f"{fn}: global_std must be a bool, got {type(global_std).__name__}")
    if clip is not None:
        clip = check_number(clip, fn, "clip", lo=0, lo_open=True)
    g = r.view(-1, k)
    mean = g.mean(dim=1, keepdim=True)
    std = r.std().expand(g.shape[0], 1) if global_std else g.std(dim=1, keepdim=True)
    adv = (g - mean) / (std + eps)
    same = (g == g[:, :1]).all(dim=1, keepdim=True)
    adv = torch.where(same, torch.zeros_like(adv), adv).reshape(-1)
    return adv if clip is None else adv.clamp(-clip, clip)


def combine_rewards(
    rewards: Mapping[str, torch.Tensor],
    weights: Optional[Mapping[str, float]] = None,
    *,
    group_size: int,
    mode: str = "advantage_aggr",
    normalize_weights: bool = True,
    eps: float = 1e-4,
    global_std: bool = False,
    clip: Optional[float] = 5.0,
) -> torch.Tensor:
    """Advantages [B] from several rewards ``{name: [B]}`` with ``weights`` ``{name: w >= 0}`` (None: equal).

    - ``"advantage_aggr"`` (Mix-GRPO's default): sum_m w_m * group_advantages(r_m) (each unclamped), then clamp;
    - ``"reward_aggr"``: group_advantages(sum_m w_m * r_m).

    ``normalize_weights`` divides the weights by their sum (as Mix-GRPO does).  ``eps``, ``global_std``, ``clip``
    as in ``group_advantages``.

    >>> r = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0, 10.0])}
    >>> [round(x, 3) for x in combine_rewards(r, {"a": 1.0, "b": 1.0}, group_size=2).tolist()]
    [-0.707, 0.707]
    """
    fn = "combine_rewards"
    if not isinstance(rewards, Mapping) or not rewards:
        raise TypeError(f"{fn}: rewards must be a non-empty mapping {{name: [B] tensor}}, got {type(rewards).__name__}")
    if not isinstance(mode, str) or mode not in AGGREGATIONS:
        raise ValueError(f"{fn}: mode must be one of {AGGREGATIONS}, got {mode!r}")
    if not isinstance(normalize_weights, bool):
        raise TypeError(f"{fn}: normalize_weights must be a bool, got {type(normalize_weights).__name__}")
    names = list(rewards)
    rs = {name: _rewards(rewards[name], fn, f"rewards[{name!r}]") for name in names}
    sizes = {name: t.shape[0] for name, t in rs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{fn}: every reward must have the same batch size, got {sizes}")
    if weights is None:
        w = {name: 1.0 for name in names}
    else:
        if not isinstance(weights, Mapping):
            raise TypeError(f"{fn}: weights must be a mapping {{name: number}} or None, got {type(weights).__name__}")
        if set(weights) != set(names):
            raise ValueError(f"{fn}: weights must name exactly the rewards {sorted(names)}, got {sorted(weights)}")
        w = {name: check_number(weights[name], fn, f"weights[{name!r}]", lo=0) for name in names}
    total = sum(w.values())
    if total <= 0:
        raise ValueError(f"{fn}: the weights must not all be 0, got {w}")
    if normalize_weights:
        w = {name: x / total for name, x in w.items()}
    if mode == "reward_aggr":
        mixed = sum(w[name] * rs[name] for name in names)
        return group_advantages(mixed, group_size, eps=eps, global_std=global_std, clip=clip)
    adv = sum(w[name] * group_advantages(rs[name], group_size, eps=eps, global_std=global_std, clip=None) for name in names)
    if clip is not None:
        clip = check_number(clip, fn, "clip", lo=0, lo_open=True)
        adv = adv.clamp(-clip, clip)
    return adv


def nonzero_advantage_mask(advantages: torch.Tensor) -> torch.Tensor:
    """bool [B]: the samples whose advantage is not 0 (the others contribute nothing to the policy gradient and
    may be dropped from the update).

    >>> nonzero_advantage_mask(torch.tensor([0.5, 0.0, -1.0])).tolist()
    [True, False, True]
    """
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 1:
        raise TypeError(f"nonzero_advantage_mask: advantages must be a 1-D tensor [B], got "
                        f"{getattr(advantages, 'dtype', type(advantages).__name__)} {tuple(getattr(advantages, 'shape', ()))}")
    return advantages != 0


def _batch_tensors(fn: str, **named) -> int:
    b = None
    for arg, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.dtype.is_floating_point:
            raise TypeError(f"{fn}: {arg} must be a 1-D floating-point tensor [B], got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if b is not None and t.shape[0] != b:
            raise ValueError(f"{fn}: {', '.join(named)} must have one batch size, got {[tuple(x.shape) for x in named.values()]}")
        b = t.shape[0]
    if b == 0:
        raise ValueError(f"{fn}: the batch is empty")
    return b


def ppo_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float = 1e-4,
    *,
    scale: float = 1.0,
):
    """The clipped surrogate of one trained step: (loss, stats).

    ratio = exp(logp_new - logp_old); loss = scale * mean(max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps))),
    eps = ``clip_range``.  stats (detached 0-dim tensors): ``clip_frac`` (share of |ratio - 1| > eps),
    ``approx_kl`` (0.5 * mean((logp_new - logp_old)^2)), ``ratio_mean``.  ``logp_old`` and ``advantages`` are
    treated as constants.  ``scale``: e.g. ``loss_scale(grad_accum, trained_steps)``.

    >>> lp = torch.zeros(2)
    >>> loss, stats = ppo_loss(lp, lp, torch.tensor([1.0, -1.0]))
    >>> float(loss), float(stats["ratio_mean"])
    (0.0, 1.0)
    """
    fn = "ppo_loss"
    _batch_tensors(fn, logp_new=logp_new, logp_old=logp_old, advantages=advantages)
    eps = check_number(clip_range, fn, "clip_range", lo=0, lo_open=True, hi=1, hi_open=True)
    scale = check_number(scale, fn, "scale", lo=0)
    diff = logp_new - logp_old.detach().to(logp_new.dtype)
    ratio = torch.exp(diff)
    adv = advantages.detach().to(logp_new.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps, 1.0 + eps)
    loss = torch.maximum(unclipped, clipped).mean() * scale
    with torch.no_grad():
        stats = {
            "clip_frac": ((ratio - 1.0).abs() > eps).float().mean(),
            "approx_kl": 0.5 * (diff**2).mean(),
            "ratio_mean": ratio.mean(),
        }
    return loss, stats


def kl_penalty(mean_new: torch.Tensor, mean_ref: torch.Tensor, std) -> torch.Tensor:
    """KL(N(mean_new, std^2) || N(mean_ref, std^2)) per element, averaged over all but the batch dim: [B]
    = mean(||mean_new - mean_ref||^2) / (2 std^2).  ``std``: the step's transition std s * sqrt(-dt) (> 0), a
    number or a tensor broadcastable to [B].

    >>> m = torch.ones(2, 3)
    >>> kl_penalty(m, m, 0.5).tolist(), kl_penalty(m, m + 1, 0.5).tolist()
    ([0.0, 0.0], [2.0, 2.0])
    """
    fn = "kl_penalty"
    for arg, t in (("mean_new", mean_new), ("mean_ref", mean_ref)):
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise TypeError(f"{fn}: {arg} must be a tensor with a batch dimension, got {getattr(t, 'dtype', type(t).__name__)}")
    if mean_new.shape != mean_ref.shape:
        raise ValueError(f"{fn}: mean_new and mean_ref must have one shape, got {tuple(mean_new.shape)} and {tuple(mean_ref.shape)}")
    if isinstance(std, torch.Tensor):
        if not bool((std > 0).all()) or not bool(torch.isfinite(std).all()):
            raise ValueError(f"{fn}: std must be finite and > 0, got {std.flatten()[:4].tolist()}")
        std_t = std.to(mean_new.dtype).reshape(-1) if std.numel() > 1 else std.to(mean_new.dtype).reshape(())
    else:
        std_t = check_number(std, fn, "std", lo=0, lo_open=True)
    sq = (mean_new - mean_ref.detach().to(mean_new.dtype)) ** 2
    return sq.flatten(1).mean(1) / (2 * std_t**2)


def loss_scale(grad_accum: int, trained_steps: int) -> float:
    """1 / (grad_accum * trained_steps): each trained step's loss is scaled so the gradient accumulated over the
    window's steps and the accumulation micro-batches is their mean (as Mix-GRPO / DanceGRPO do).

    >>> loss_scale(3, 4)
    0.08333333333333333
    """
    for arg, v in (("grad_accum", grad_accum), ("trained_steps", trained_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"loss_scale: {arg} must be an int >= 1, got {v!r}")
    return 1.0 / (grad_accum * trained_steps)


def grpo_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    mean_new: Optional[torch.Tensor] = None,
    mean_ref: Optional[torch.Tensor] = None,
    std=None,
    beta: float = 0.004,
    scale: float = 1.0,
):
    """The loss of one trained step: scale * (ppo_loss + beta * mean(kl_penalty(mean_new, mean_ref, std))).

    Without ``mean_ref`` (or with ``beta`` 0) there is no KL term.  Returns (loss, stats) with ``ppo_loss``'s
    stats plus ``policy_loss`` and ``kl`` (the unscaled batch-mean KL, 0 without a reference), all detached.
    """
    fn = "grpo_loss"
    beta = check_number(beta, fn, "beta", lo=0)
    scale = check_number(scale, fn, "scale", lo=0)
    policy, stats = ppo_loss(logp_new, logp_old, advantages, clip_range)
    use_kl = mean_ref is not None and beta > 0
    if use_kl:
        if mean_new is None or std is None:
            raise ValueError(f"{fn}: the KL term needs mean_new, mean_ref and std (got mean_new={'set' if mean_new is not None else None}, "
                             f"std={std!r})")
        kl = kl_penalty(mean_new, mean_ref, std).mean()
        loss = (policy + beta * kl) * scale
    else:
        kl = torch.zeros((), device=logp_new.device)
        loss = policy * scale
    stats["policy_loss"] = policy.detach()
    stats["kl"] = kl.detach()
    return loss, stats

