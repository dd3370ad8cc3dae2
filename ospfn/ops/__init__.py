"""Public ops of ospfn.  Every op takes ``backend=None|"ref"|"cpp"|"triton"|"npu"|"torch"`` (see ospfn.backends)."""

from ospfn.ops.attention import attention
from ospfn.ops.fourier import fourier_cutoff, fourier_high_freq
from ospfn.ops.hif8 import hif8_amax, hif8_decode, hif8_encode, hif8_quantize, hif8_round
from ospfn.ops.hif8_linear import hif8_fake_quant, hif8_linear
from ospfn.ops.hif8_matmul import HiF8Tensor, hif8_matmul, hif8_pack, hif8_unpack
from ospfn.ops.rope import apply_rope, rope_3d, rope_cos_sin, rope_split
from ospfn.ops.skiparse import (
    SkiparseLayout,
    skiparse_fold,
    skiparse_key_mask,
    skiparse_layout,
    skiparse_positions,
    skiparse_switch,
    skiparse_unfold,
)

__all__ = [
    "attention",
    "fourier_high_freq",
    "fourier_cutoff",
    "hif8_encode",
    "hif8_decode",
    "hif8_round",
    "hif8_quantize",
    "hif8_amax",
    "hif8_fake_quant",
    "hif8_linear",
    "HiF8Tensor",
    "hif8_pack",
    "hif8_unpack",
    "hif8_matmul",
    "rope_3d",
    "rope_cos_sin",
    "rope_split",
    "apply_rope",
    "SkiparseLayout",
    "skiparse_layout",
    "skiparse_fold",
    "skiparse_unfold",
    "skiparse_switch",
    "skiparse_key_mask",
    "skiparse_positions",
]
