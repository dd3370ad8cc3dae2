"""Flow-matching schedules, samplers (Euler; UniPC through diffusers) and the training loss."""

from ospfn.sched.flow import (
    cfg_combine,
    dynamic_shift,
    euler_sample,
    euler_step,
    gaussian_log_prob,
    inference_sigmas,
    sde_step,
    shift_sigmas,
    training_sigmas,
)
from ospfn.sched.loss import flow_matching_loss
from ospfn.sched.sampling import SCHEDULERS, image_condition, pad_context, sample
from ospfn.sched.unipc import unipc_sample, unipc_schedule, unipc_scheduler

__all__ = [
    "shift_sigmas",
    "dynamic_shift",
    "training_sigmas",
    "inference_sigmas",
    "euler_step",
    "euler_sample",
    "cfg_combine",
    "sde_step",
    "gaussian_log_prob",
    "flow_matching_loss",
    "sample",
    "image_condition",
    "pad_context",
    "SCHEDULERS",
    "unipc_sample",
    "unipc_schedule",
    "unipc_scheduler",
]
