"""Triton kernels of ospfn, installed as the subpackage ``ospfn.kernels``.

Modules here import triton at import time; ``ospfn`` itself never imports them eagerly (the dispatcher in
``ospfn.backends`` loads them on first use), so ospfn works on machines without triton.
"""
