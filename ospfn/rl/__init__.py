"""Mix-GRPO post-training math (docs/rl.md): SDE windows, rollouts with recorded log-probabilities, group
advantages and the clipped objective.  Pure functions of tensors and a ``velocity(z, sigma, i)`` callable; rewards on
decoded videos (``ospfn.rl.rewards``); the loop that calls them is ``ospfn.rl.trainer`` (``recipes/train_rl.py``)."""

from ospfn.rl.grpo import (
    AGGREGATIONS,
    combine_rewards,
    group_advantages,
    grpo_loss,
    kl_penalty,
    loss_scale,
    nonzero_advantage_mask,
    ppo_loss,
)
from ospfn.rl.rewards import FunctionReward, Reward, make_reward, register_reward, reward_registry
from ospfn.rl.rollout import (
    FLOW_GRPO_NOISE,
    SDE_KINDS,
    Rollout,
    SdeStep,
    initial_noise,
    rollout,
    sde_log_prob,
    sde_noise_level,
    step_generator,
)
from ospfn.rl.window import STRATEGIES, WindowSchedule, mix_seed
from ospfn.sched.dpm_solver import compressed_tail, dpmpp_2m_sample, dpmpp_2m_step

__all__ = [
    "Reward",
    "FunctionReward",
    "make_reward",
    "register_reward",
    "reward_registry",
    "WindowSchedule",
    "STRATEGIES",
    "mix_seed",
    "rollout",
    "Rollout",
    "SdeStep",
    "SDE_KINDS",
    "FLOW_GRPO_NOISE",
    "sde_noise_level",
    "sde_log_prob",
    "step_generator",
    "initial_noise",
    "group_advantages",
    "combine_rewards",
    "nonzero_advantage_mask",
    "AGGREGATIONS",
    "ppo_loss",
    "kl_penalty",
    "loss_scale",
    "grpo_loss",
    "compressed_tail",
    "dpmpp_2m_step",
    "dpmpp_2m_sample",
]
