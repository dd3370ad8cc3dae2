"""LoRA, functional like the rest of the core (docs/lora.md).

An adapter is data (``LoraAdapter``: a ``LoraConfig`` and a flat dict of ``lora_A`` / ``lora_B`` tensors); the
model takes it per call (``ospfn.model.forward(..., lora=adapter)``; ``lora=None`` is the base model), adds the
low-rank delta in the one function every block Linear runs through, and can fold it into the weights
(``merge_lora`` / ``unmerge_lora``).  Files: ``save_lora`` / ``load_lora`` (docs/lora_files.md).
"""

from ospfn.lora.adapter import DEFAULT_TARGETS, LORA_INITS, LORA_MODULES, LoraAdapter, LoraConfig, init_lora, lora_targets
from ospfn.lora.merge import lora_delta, merge_lora, unmerge_lora

from ospfn.lora.io import detect_lora_format, load_lora, save_lora

__all__ = [
    "LoraConfig",
    "LoraAdapter",
    "DEFAULT_TARGETS",
    "LORA_MODULES",
    "LORA_INITS",
    "init_lora",
    "lora_targets",
    "merge_lora",
    "unmerge_lora",
    "lora_delta",
    "save_lora",
    "load_lora",
    "detect_lora_format",
]
