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
tensor's device (within its constraints) use it, others fall back to auto.  The variable is read once, at
import and by ``refresh()`` (not per call); ``set_default(name)`` changes the default at run time.  Naming a
backend this machine cannot run, in the argument or in the variable, raises ``RuntimeError`` saying why.

Each implementation is registered with the devices it runs on and its constraints (``Constraint``: e.g. the
Triton attention kernel needs head dim <= 128).  Auto dispatch skips an implementation whose constraint fails
for the call's arguments, with one log line per process; an explicit ``backend=`` request raises a
``ValueError`` naming the constraint and the offending value.  Arguments are validated once, by the public
op, before dispatch; implementations do not re-validate.

``available()`` lists the backends this machine can run; ``info(name)`` says why one is not.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendInfo",
    "Constraint",
    "available",
    "info",
    "implementations",
    "interpreting",
    "register",
    "set_auto_order",
    "select",
    "dispatch",
    "preload",
    "constraints",
    "resolve",
    "refresh",
    "set_default",
    "default",
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
        # What the build did with the Ascend C kernels (docs/npu.md): ospfn._npu when built, else the reason the
        # build recorded in ospfn._ascend_sim.BUILD_INFO (CMake skips ospfn_npu without CANN / torch_npu).
        if importlib.util.find_spec("ospfn._npu") is not None:
            kernels = "Ascend C kernels: ospfn._npu built"
        else:
            try:
                from ospfn import _ascend_sim

                kernels = f"Ascend C kernels: ospfn_npu {_ascend_sim.BUILD_INFO['ospfn_npu']}"
            except ImportError:
                kernels = "Ascend C kernels: not built (the C++ extensions are not built)"
        if importlib.util.find_spec("torch_npu") is None:
            return BackendInfo("npu", False, (), f"torch_npu is not installed (pip install ospfn[npu] on an Ascend machine); {kernels}")
        try:
            import torch_npu  # noqa: F401
        except Exception as e:  # pragma: no cover - needs an Ascend machine
            return BackendInfo("npu", False, (), f"torch_npu failed to import: {e}; {kernels}")
        if not (hasattr(torch, "npu") and torch.npu.is_available()):  # pragma: no cover
            return BackendInfo("npu", False, (), f"torch_npu is installed but no NPU device is visible; {kernels}")
        if importlib.util.find_spec("ospfn._npu") is not None:  # pragma: no cover - needs an Ascend machine
            try:
                from ospfn import _npu  # noqa: F401  (loading it registers the PrivateUse1 kernels of torch.ops.ospfn.*)
            except ImportError as e:
                kernels = f"Ascend C kernels: ospfn._npu failed to load: {e}"
            else:
                kernels = "Ascend C kernels loaded (ospfn._npu)"
        return BackendInfo("npu", True, ("npu",), f"Ascend NPU via torch_npu; {kernels}")  # pragma: no cover
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


_info_cache: dict[str, BackendInfo] = {}


def info(name: str) -> BackendInfo:
    """Availability of one backend on this machine (cached; see ``refresh``)."""
    st = _info_cache.get(name)  # a plain dict, not lru_cache: torch.compile traces through it without a warning
    if st is None:
        st = _info_cache[name] = _probe(name)
    return st


def available() -> list[str]:
    """The backends this machine can run, in ``BACKENDS`` order."""
    return [b for b in BACKENDS if info(b).available]


def refresh() -> None:
    """Forget cached probes, plans and fallback notices and re-read ``OSPFN_BACKEND`` (after changing
    TRITON_INTERPRET or the variable, building _C, ...)."""
    _info_cache.clear()
    _warned.clear()
    _lazy_cache.clear()
    _plans.clear()
    _default[0] = _read_env()


def _read_env() -> str | None:
    env = os.environ.get(ENV_VAR, "").strip()
    return None if env in ("", "auto") else env


def set_default(name: str | None) -> None:
    """Make ``name`` the process-wide default backend (``None`` or ``"auto"``: auto dispatch), like
    ``OSPFN_BACKEND``; validated on the next op call."""
    _default[0] = None if name in (None, "auto") else name
    _plans.clear()


def default() -> str | None:
    """The process-wide default backend (from ``OSPFN_BACKEND`` or ``set_default``), ``None`` for auto."""
    return _default[0]


# ----------------------------------------------------------------------------------------------------------
# op registry


@dataclass(frozen=True)
class Constraint:
    """A limit of one implementation.  ``check(*args)`` gets the implementation's arguments and returns
    ``None`` when the call is within the limit, else a short description of what breaks it (``"head dim
    256"``); ``needs`` says what is required (``"head dim <= 128"``)."""

    needs: str
    check: Callable[..., Optional[str]]


@dataclass
class _Impl:
    fn: Union[Callable, str]  # a callable, or "module:attribute" imported on first use
    devices: Optional[tuple[str, ...]]  # None: wherever the backend runs
    constraints: tuple[Constraint, ...]


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_OP_AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {}
_lazy_cache: dict[tuple[str, str], Callable] = {}
_warned: set[tuple] = set()
# (op, backend argument, device type) -> the candidate backends to try in order, and whether the first one
# was named explicitly; computed once (availability, device and implementation checks), then only the
# implementations' constraints run per call
_plans: dict[tuple, tuple[tuple[str, ...], Optional[str]]] = {}
_default: list[Optional[str]] = [None]


def set_auto_order(op: str, order: dict[str, tuple[str, ...]]) -> None:
    """Override auto dispatch for ``op``: device type -> backends in preference order."""
    for dev, names in order.items():
        for name in names:
            _check_name(name, f"auto order of {op!r} on {dev}")
    _OP_AUTO_ORDER[op] = dict(order)
    _plans.clear()


def register(op: str, backend: str, impl=None, *, devices: Optional[tuple[str, ...]] = None,
             constraints: tuple[Constraint, ...] = ()):  # fmt: skip
    """Register ``impl`` as ``op``'s implementation for ``backend``.

    ``impl`` may be a ``"package.module:function"`` string, imported lazily on first use, so that importing
    ospfn never imports triton or torch_npu.  ``devices``: the device types this implementation runs on
    (default: wherever the backend runs); ``constraints``: its limits on the arguments (see ``Constraint``).
    Without ``impl`` this returns a decorator.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for c in constraints:
        if not isinstance(c, Constraint):
            raise TypeError(f"register: constraints must be Constraint objects, got {type(c).__name__}")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, None if devices is None else tuple(devices), tuple(constraints))
        _plans.clear()
        return fn

    return deco if impl is None else deco(impl)


def implementations(op: str) -> tuple[str, ...]:
    """Backends that implement ``op`` (whether or not they can run here)."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}")
    return tuple(b for b in BACKENDS if b in _REGISTRY[op])


def constraints(op: str, backend: str) -> tuple[Constraint, ...]:
    """The declared constraints of ``op``'s ``backend`` implementation."""
    return _REGISTRY[op][backend].constraints


def _load(op: str, backend: str) -> Callable:
    fn = _REGISTRY[op][backend].fn
    if not isinstance(fn, str):
        return fn
    key = (op, backend)
    if key not in _lazy_cache:
        module, _, attr = fn.partition(":")
        _lazy_cache[key] = getattr(importlib.import_module(module), attr)
    return _lazy_cache[key]


def _runs_on(backend: str, device_type: str, impl: Optional[_Impl] = None) -> bool:
    devices = info(backend).devices
    if not ("*" in devices or device_type in devices):
        return False
    return impl is None or impl.devices is None or device_type in impl.devices


def _note_once(key: tuple, msg: str) -> None:
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        logger.warning(msg)


def _check_name(backend: object, origin: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{origin} must be one of {BACKENDS} (or None for auto), got {backend!r}")
    return backend


def _plan(op: str, backend: Optional[str], device_type: str) -> tuple[tuple[str, ...], Optional[str]]:
    """Candidates in order, and the name of an explicitly requested backend (constraints then raise)."""
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"unknown op {op!r}")
    if backend is not None:
        name = _check_name(backend, f"{op}: backend")
        st = info(name)
        if not st.available:
            raise RuntimeError(f"{op}: backend {name!r} is unavailable: {st.reason}")
        if name not in impls:
            raise RuntimeError(f"{op}: backend {name!r} has no implementation of this op; it has {implementations(op)}")
        if not _runs_on(name, device_type, impls[name]):
            where = impls[name].devices or st.devices
            raise RuntimeError(f"{op}: backend {name!r} runs on {', '.join(where)} tensors, got a {device_type} tensor")
        return (name,), name

    cands: list[str] = []
    env = _default[0]
    if env is not None:
        name = _check_name(env, ENV_VAR)
        st = info(name)
        if not st.available:
            raise RuntimeError(f"{ENV_VAR}={name} but backend {name!r} is unavailable: {st.reason}")
        if name in impls and _runs_on(name, device_type, impls[name]):
            cands.append(name)
        else:
            logger.debug("%s: %s=%s does not apply to %s tensors; using auto", op, ENV_VAR, name, device_type)
    order = _OP_AUTO_ORDER.get(op, _AUTO_ORDER).get(device_type) or _AUTO_ORDER.get(device_type, ("ref",))
    for name in order:
        if name not in impls or name in cands:
            continue
        st = info(name)
        if st.available and _runs_on(name, device_type, impls[name]):
            cands.append(name)
        else:
            why = st.reason if not st.available else f"does not run on {device_type} tensors"
            _note_once(("auto", name, device_type), f"ospfn: backend {name!r} unavailable ({why}); falling back")
    if "ref" not in cands and "ref" in impls:
        cands.append("ref")
    return tuple(cands), None


def resolve(op: str, backend: str | None, device: torch.device | str, args: tuple = ()) -> str:
    """The name of the backend that runs ``op`` on ``device`` for the requested ``backend``; with ``args``
    (the implementation's arguments) the implementations' constraints are checked too."""
    if backend is not None and not isinstance(backend, str):  # before the lookup: a list is not even hashable
        _check_name(backend, f"{op}: backend")
    dtype_ = device.type if isinstance(device, torch.device) else torch.device(device).type
    key = (op, backend, dtype_)
    plan = _plans.get(key)
    if plan is None:
        plan = _plan(op, backend, dtype_)
        if not torch.compiler.is_compiling():  # no Python state written while dynamo traces (recompiles)
            _plans[key] = plan
    cands, explicit = plan
    impls = _REGISTRY[op]
    for name in cands:
        failed = None
        if args:
            for c in impls[name].constraints:
                got = c.check(*args)
                if got is not None:
                    failed = (c, got)
                    break
        if failed is None:
            return name
        c, got = failed
        if explicit is not None:
            raise ValueError(f"{op}: backend {name!r} needs {c.needs}, got {got}")
        _note_once(("constraint", op, name, c.needs), f"ospfn: {op}: backend {name!r} skipped (needs {c.needs}, got {got}); trying the next one")
    raise RuntimeError(f"{op}: no backend can run these arguments on {dtype_} (tried {cands})")


def select(op: str, backend: str | None, device: torch.device | str, args: tuple = ()) -> Callable:
    """The implementation function of ``op`` chosen by ``resolve``."""
    return _load(op, resolve(op, backend, device, args))


def preload(backend: str | None = None) -> list[str]:
    """Import every lazily registered implementation (``"module:function"``) of the backends available
    here (or of ``backend`` only); returns the ``op:backend`` pairs loaded.  The first call of a Triton
    implementation imports its kernel module, which ``torch.compile`` cannot trace (a graph break): call this
    once before compiling, or run the model once eagerly."""
    loaded = []
    for op, impls in _REGISTRY.items():
        for name, impl in impls.items():
            if (backend is None or name == backend) and isinstance(impl.fn, str) and info(name).available:
                _load(op, name)
                loaded.append(f"{op}:{name}")
    return loaded


def dispatch(op: str, backend: str | None, *args):
    """Run ``op`` on ``args`` (the implementation's arguments; the device is the first tensor's) through the
    backend ``resolve`` picks, constraints included."""
    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if dev is None:
        raise TypeError(f"{op}: dispatch needs at least one tensor argument")
    return _load(op, resolve(op, backend, dev, args))(*args)


_default[0] = _read_env()
