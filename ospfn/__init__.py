"""ospfn: kernels and a stateless functional core for sparse video diffusion transformers.

The OSP-Next / FlashI2V / Uniworld-OSP2.0 family on a Wan2.1 backbone: Skiparse-2D sparse attention,
Sparse Sequence Parallelism, FlashI2V image-to-video and HiFloat8 quantisation.

    >>> import ospfn
    >>> ospfn.backends.available()        # doctest: +SKIP
    ['ref', 'cpp', 'torch']
"""

from ospfn import backends, ops

__version__ = "0.1.0"
__all__ = ["backends", "ops", "__version__"]
