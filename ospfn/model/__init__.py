"""The DiT as pure functions: config, parameters, forward, checkpoints."""

from ospfn.model.checkpoint import CheckpointError, convert_state_dict, load_checkpoint, load_config, save_checkpoint
from ospfn.model.config import PRESETS, DiTConfig
from ospfn.model.dit import ImageCond, RunOptions, block_schedule, flashi2v_shift, forward, fourier_features, time_embedding
from ospfn.model.params import block_linear_names, init_params, param_shapes
from ospfn.model.umt5 import UMT5TextEncoder, wan_t5_to_hf
from ospfn.model.vlm import (
    QwenVLEncoder,
    VLMAdapterConfig,
    VLMFeatureCache,
    adapter_shapes,
    convert_released_adapter,
    init_adapter,
    uniworld_context,
)
from ospfn.model.wan_vae import WanVAE, wan_vae_to_diffusers

__all__ = [
    "DiTConfig",
    "PRESETS",
    "load_checkpoint",
    "save_checkpoint",
    "load_config",
    "convert_state_dict",
    "CheckpointError",
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
    "UMT5TextEncoder",
    "wan_t5_to_hf",
    "QwenVLEncoder",
    "VLMAdapterConfig",
    "VLMFeatureCache",
    "adapter_shapes",
    "convert_released_adapter",
    "init_adapter",
    "uniworld_context",
    "WanVAE",
    "wan_vae_to_diffusers",
]
