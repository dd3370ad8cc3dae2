"""Backend selection for ospfn ops.

Every public op takes ``backend: str | None = None``:

``"ref"``
    pure PyTorch, runs on any device; the source of truth for tests.
``"cpp"``
    the compiled CPU extension ``ospfn._C`` (ops under ``torch.ops.ospfn``); CPU tensors.
``"triton"``
    Triton kernels from ``ospfn.kernels``; CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1``
    (the Triton interpreter, slow, for tests).
``"npu"``
    Ascend kernels through torch_npu; NPU tensors.
``"torch"``
    PyTorch's own fused kernels where an op has one (e.g. ``scaled_dot_product_attention``, which reaches
    FlashAttention / cuDNN / memory-efficient kernels on CUDA and the flash CPU kernel on CPU); any device.
``None`` (auto)
    CUDA -> triton, NPU -> npu, CPU -> cpp, each falling back to ref; an op may declare its own order (e.g.
    attention prefers ``torch`` where PyTorch's fused kernel is the fastest correct path).  A preferred
    backend that is unavailable is skipped with one log line per process (logger ``"ospfn"``).

``OSPFN_BACKEND=<name>`` makes ``<name>`` the default for the whole process: ops that implement it for the
tensor's device use it, others fall back to auto.  Naming a backend this machine cannot run, in the argument
or in the variable, raises ``RuntimeError`` saying why.

``available()`` lists the backends this machine can run; ``info(name)`` says why one is not.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Callable, Union

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendInfo",
    "available",
    "info",
    "implementations",
    "interpreting",
    "register",
    "set_auto_order",
    "select",
    "resolve",
    "refresh",
]

BACKENDS = ("ref", "cpp", "triton", "npu", "torch")
ENV_VAR = "OSPFN_BACKEND"

logger = logging.getLogger("ospfn")

# device type -> preference order of auto dispatch
_AUTO_ORDER = {
    "cuda": ("triton", "ref"),
    "cpu": ("cpp", "ref"),
    "npu": ("npu", "ref"),
}


@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run here, on which device types, and why not if it cannot."""

    name: str
    available: bool
    devices: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        state = f"available on {', '.join(self.devices)}" if self.available else "unavailable"
        return f"{self.name}: {state} ({self.reason})"


def interpreting() -> bool:
    """True when Triton runs in interpreter mode (``TRITON_INTERPRET=1``), i.e. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe(name: str) -> BackendInfo:
    if name == "ref":
        return BackendInfo("ref", True, ("*",), "pure PyTorch, any device")
    if name == "torch":
        return BackendInfo("torch", True, ("*",), "PyTorch fused kernels, any device")
    if name == "cpp":
        try:
            from ospfn import _C  # noqa: F401  (loading the library registers torch.ops.ospfn.*)
        except ImportError as e:
            return BackendInfo("cpp", False, (), f"the C++ extension ospfn._C is not built or failed to load: {e}")
        if not hasattr(torch.ops.ospfn, "hif8_encode"):
            return BackendInfo("cpp", False, (), "ospfn._C loaded but registered no ops")
        return BackendInfo("cpp", True, ("cpu",), "compiled extension ospfn._C")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return BackendInfo("triton", False, (), "the triton package is not installed (pip install triton)")
        if interpreting():
            return BackendInfo("triton", True, ("cpu",), "Triton interpreter (TRITON_INTERPRET=1)")
        if torch.cuda.is_available():
            return BackendInfo("triton", True, ("cuda",), f"CUDA device {torch.cuda.get_device_name()}")
        return BackendInfo("triton", False, (), "no CUDA device, and TRITON_INTERPRET=1 is not set")
    if name == "npu":
        if importlib.util.find_spec("torch_npu") is None:
            return BackendInfo("npu", False, (), "torch_npu is not installed (pip install ospfn[npu] on an Ascend machine)")
        try:
            import torch_npu  # noqa: F401
        except Exception as e:  # pragma: no cover - needs an Ascend machine
            return BackendInfo("npu", False, (), f"torch_npu failed to import: {e}")
        if not (hasattr(torch, "npu") and torch.npu.is_available()):  # pragma: no cover
            return BackendInfo("npu", False, (), "torch_npu is installed but no NPU device is visible")
        return BackendInfo("npu", True, ("npu",), "Ascend NPU via torch_npu")  # pragma: no cover
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


@functools.lru_cache(maxsize=None)
def info(name: str) -> BackendInfo:
    """Availability of one backend on this machine (cached; see ``refresh``)."""
    return _probe(name)


def available() -> list[str]:
    """The backends this machine can run, in ``BACKENDS`` order."""
    return [b for b in BACKENDS if info(b).available]


def refresh() -> None:
    """Forget cached probes and fallback notices (after changing TRITON_INTERPRET, building _C, ...)."""
    info.cache_clear()
    _warned.clear()
    _lazy_cache.clear()


# ----------------------------------------------------------------------------------------------------------
# op registry

Impl = Union[Callable, str]  # a callable, or "module:attribute" imported on first use
_REGISTRY: dict[str, dict[str, Impl]] = {}
_OP_AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {}
_lazy_cache: dict[tuple[str, str], Callable] = {}
_warned: set[tuple] = set()


def set_auto_order(op: str, order: dict[str, tuple[str, ...]]) -> None:
    """Override auto dispatch for ``op``: device type -> backends in preference order."""
    for dev, names in order.items():
        for name in names:
            _check_name(name, f"auto order of {op!r} on {dev}")
    _OP_AUTO_ORDER[op] = dict(order)


def register(op: str, backend: str, impl: Impl | None = None):
    """Register ``impl`` as ``op``'s implementation for ``backend``.

    ``impl`` may be a ``"package.module:function"`` string, imported lazily on first use, so that importing
    ospfn never imports triton or torch_npu.  Without ``impl`` this returns a decorator.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn: Impl) -> Impl:
        _REGISTRY.setdefault(op, {})[backend] = fn
        return fn

    return deco if impl is None else deco(impl)


def implementations(op: str) -> tuple[str, ...]:
    """Backends that implement ``op`` (whether or not they can run here)."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}")
    return tuple(b for b in BACKENDS if b in _REGISTRY[op])


def _load(op: str, backend: str) -> Callable:
    impl = _REGISTRY[op][backend]
    if not isinstance(impl, str):
        return impl
    key = (op, backend)
    if key not in _lazy_cache:
        module, _, attr = impl.partition(":")
        _lazy_cache[key] = getattr(importlib.import_module(module), attr)
    return _lazy_cache[key]


def _runs_on(backend: str, device: torch.device) -> bool:
    devices = info(backend).devices
    return "*" in devices or device.type in devices


def _note_once(key: tuple, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


def _check_name(backend: object, origin: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{origin} must be one of {BACKENDS} (or None for auto), got {backend!r}")
    return backend


def resolve(op: str, backend: str | None, device: torch.device | str) -> str:
    """The name of the backend that runs ``op`` on ``device`` for the requested ``backend``."""
    device = torch.device(device)
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"unknown op {op!r}")

    if backend is not None:
        name = _check_name(backend, "backend")
        st = info(name)
        if not st.available:
            raise RuntimeError(f"{op}: backend {name!r} is unavailable: {st.reason}")
        if name not in impls:
            raise RuntimeError(f"{op}: backend {name!r} has no implementation of this op; it has {implementations(op)}")
        if not _runs_on(name, device):
            raise RuntimeError(f"{op}: backend {name!r} runs on {', '.join(st.devices)} tensors, got a {device.type} tensor")
        return name

    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "auto":
        name = _check_name(env, ENV_VAR)
        st = info(name)
        if not st.available:
            raise RuntimeError(f"{ENV_VAR}={name} but backend {name!r} is unavailable: {st.reason}")
        if name in impls and _runs_on(name, device):
            return name
        logger.debug("%s: %s=%s does not apply to %s tensors; using auto", op, ENV_VAR, name, device.type)

    order = _OP_AUTO_ORDER.get(op, _AUTO_ORDER).get(device.type) or _AUTO_ORDER.get(device.type, ("ref",))
    for name in order:
        if name not in impls:
            continue
        st = info(name)
        if st.available and _runs_on(name, device):
            return name
        _note_once(("auto", name, device.type), f"ospfn: backend {name!r} unavailable ({st.reason}); falling back")
    return "ref"


def select(op: str, backend: str | None, device: torch.device | str) -> Callable:
    """The implementation function of ``op`` chosen by ``resolve``."""
    return _load(op, resolve(op, backend, device))
