"""The DiT as pure functions: config, parameters, forward, checkpoints."""

from ospfn.model.config import PRESETS, DiTConfig
from ospfn.model.dit import ImageCond, RunOptions, block_schedule, flashi2v_shift, forward, fourier_features, time_embedding
from ospfn.model.params import block_linear_names, init_params, param_shapes

__all__ = [
    "DiTConfig",
    "PRESETS",
    "init_params",
    "param_shapes",
    "block_linear_names",
    "forward",
    "ImageCond",
    "RunOptions",
    "block_schedule",
    "flashi2v_shift",
    "fourier_features",
    "time_embedding",
]
