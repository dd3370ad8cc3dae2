"""Public ops of ospfn.  Every op takes ``backend=None|"ref"|"cpp"|"triton"|"npu"`` (see ospfn.backends)."""

from ospfn.ops.hif8 import hif8_decode, hif8_encode, hif8_quantize, hif8_round

__all__ = ["hif8_encode", "hif8_decode", "hif8_round", "hif8_quantize"]
