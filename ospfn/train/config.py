"""Typed, validated recipe configs loaded from YAML, and the recipes' argument checks.

A config is a tree of frozen dataclasses.  ``load_config(path_or_dict, Schema)`` rejects unknown keys and
wrong types with the full key path (``train.batch_size: expected int, got str 'x'``) before any work starts;
each section's ``__post_init__`` checks the ranges (``optim.lr must be a finite number > 0, got 0.0``).  YAML
syntax errors name the file, line and column (``read_yaml``).

The recipes' command lines share one small set of checks: ``int_arg`` / ``float_arg`` (a number in a range,
finite), ``size_arg`` (``HxW``) and ``resolve_device`` (``cpu``, ``cuda``, ``cuda:N``; default cuda when
available).  Each is an ``argparse`` ``type=`` (it parses the command-line text; argparse prefixes the flag:
``argument --steps: must be an int >= 1, got '0'``); ``int_arg`` / ``float_arg`` also have a strict
``check(value, name)`` for values read from YAML (no strings, no bools), and ``size_arg`` takes an [H, W] list
as well.  Their errors are ``ArgValueError``: both an ``argparse.ArgumentTypeError`` and a ``ValueError``.

    >>> int_arg(1)("3")
    3
    >>> try:
    ...     float_arg(0, 1, hi_open=True).check(1.0, "fourier_ratio")
    ... except ValueError as e:
    ...     print(e)
    fourier_ratio must be a number in [0, 1), got 1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any, Optional, Union

__all__ = [
    "ArgValueError",
    "Bounded",
    "ConfigError",
    "float_arg",
    "int_arg",
    "load_config",
    "output_file_problem",
    "read_yaml",
    "resolve_device",
    "size_arg",
    "to_dict",
]


class ConfigError(ValueError):
    """A recipe config is malformed; the message names the key path."""


class ArgValueError(argparse.ArgumentTypeError, ValueError):
    """A command-line or config value out of range.  argparse reports it as ``argument --flag: <message>``."""


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


class Bounded:
    """A number of type ``kind`` (int or float) in a range; floats must also be finite.

    ``Bounded(...)(text)`` parses command-line text (an argparse ``type=``); ``check(value, name)`` takes a value
    as read from YAML (no strings, no bools) and names it in the message.
    """

    def __init__(self, kind: type, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False) -> None:
        if kind not in (int, float):
            raise TypeError(f"Bounded: kind must be int or float, got {kind!r}")
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.__name__ = kind.__name__  # argparse names the type in some messages

    @property
    def allowed(self) -> str:
        what = "an int" if self.kind is int else ("a number" if self.lo is not None and self.hi is not None else "a finite number")
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{_fmt(self.lo)}, {_fmt(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        return what

    def _ok(self, v) -> bool:
        if self.kind is float and not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return True

    def _valid(self, value) -> bool:
        types = (int,) if self.kind is int else (int, float)
        return not isinstance(value, bool) and isinstance(value, types) and self._ok(value)

    def check(self, value, name: str):
        """``value`` (an int, or for floats an int or float) if it is in range, else ``ArgValueError`` naming ``name``."""
        if not self._valid(value):
            raise ArgValueError(f"{name} must be {self.allowed}, got {value!r}")
        return self.kind(value)

    def __call__(self, text):
        """Command-line text (or an already typed value) -> the number; argparse names the flag in the error."""
        value = text
        if isinstance(text, str):
            try:
                value = self.kind(text.strip())
            except ValueError:
                value = None
        if not self._valid(value):
            raise ArgValueError(f"must be {self.allowed}, got {text!r}")
        return self.kind(value)

    def __repr__(self) -> str:
        return f"Bounded({self.allowed})"


def int_arg(lo: Optional[int] = None, hi: Optional[int] = None) -> Bounded:
    """An int in [lo, hi] (either bound may be None)."""
    return Bounded(int, lo, hi)


def float_arg(lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False) -> Bounded:
    """A finite float between ``lo`` and ``hi`` (closed bounds unless ``*_open``)."""
    return Bounded(float, lo, hi, lo_open=lo_open, hi_open=hi_open)


MAX_SIDE = 16384  # pixels: a frame side beyond this is a typo, not a video


def size_arg(value) -> tuple[int, int]:
    """``HxW`` text (or an [H, W] pair from YAML) -> (H, W), both ints in [1, MAX_SIDE]."""
    allowed = f"HxW with two ints in [1, {MAX_SIDE}] (e.g. 32x32)"
    hw = None
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) == 2:
            try:
                hw = (int(parts[0]), int(parts[1]))
            except ValueError:
                hw = None
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        hw = (value[0], value[1])
    if hw is None or not all(1 <= v <= MAX_SIDE for v in hw):
        raise ArgValueError(f"must be {allowed}, got {value!r}")
    return hw


def output_file_problem(flag: str, value) -> Optional[str]:
    """Why the file ``value`` of ``flag`` (e.g. ``--json``) cannot be written, or None (also for None): checked
    before a recipe's work, not after minutes of sampling."""
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        return f"{flag}: {path} is a directory"
    if not path.parent.is_dir():
        return f"{flag}: the directory {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"{flag}: cannot write into {path.parent}"
    return None


def resolve_device(spec: Optional[str] = None):
    """The ``torch.device`` a recipe runs on: ``None`` or ``"auto"`` -> cuda when available, else cpu; otherwise
    ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine (``ArgValueError`` when it cannot run here)."""
    import torch

    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    allowed = "allowed: auto, cpu, cuda, cuda:N"
    if isinstance(spec, torch.device):
        dev = spec
    elif not isinstance(spec, str):
        raise ArgValueError(f"device must be a string ({allowed}), got {type(spec).__name__} {spec!r}")
    else:
        try:
            dev = torch.device(spec.strip())
        except (RuntimeError, ValueError, TypeError):
            raise ArgValueError(f"unknown device {spec!r}; {allowed}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ArgValueError(f"device {spec!r} is not supported by the recipes; {allowed}")
    if not torch.cuda.is_available():
        raise ArgValueError(f"device {spec!r} requested but CUDA is not available here (torch.cuda.is_available() is False); use cpu")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise ArgValueError(f"device {spec!r} does not exist: this machine has {n} CUDA device(s) (cuda:0 .. cuda:{n - 1})")
    return dev


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, path: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if tp in (dict, list):  # bare containers: shape checked, contents free
        if not isinstance(value, tp):
            raise ConfigError(f"{path}: expected a {'mapping' if tp is dict else 'list'}, got {type(value).__name__} {value!r}")
        return tp(value)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:  # Optional[X]: X's own error (it names the key inside, e.g. lora.rank)
            return _coerce(value, inner[0], path)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(value, tp, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str) and _looks_numeric(value):
            raise ConfigError(f"{path}: expected a number, got str {value!r} (YAML reads 1e-3 as a string: write 1.0e-3)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {tp}")


def _looks_numeric(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _build(data: dict, cls, path: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (allowed under {path or 'the top level'}: {sorted(fields)})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e)
        # the sections name their keys in full (``train.steps must be ...``); others get the section's path
        raise ConfigError(msg if not path or msg.startswith(path) else f"{path}: {msg}") from e


def read_yaml(path) -> Any:
    """The parsed YAML document at ``path``; ``FileNotFoundError`` if it is missing, ``ConfigError`` naming the
    file (and, for syntax errors, the line and column) if it cannot be read or parsed."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {p}")
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory, not a YAML file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the file: {e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from None


def load_config(source, schema):
    """Parse a YAML file (path) or a dict into ``schema`` (a dataclass), validating every key.

    Errors from a file name it: ``cfg.yaml: optim.lr must be a finite number > 0, got 0.0``."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        data = read_yaml(p)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
        try:
            return _build(data, schema, "")
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from e
    if not isinstance(source, dict):
        raise ConfigError(f"load_config: source must be a YAML path or a dict, got {type(source).__name__}")
    return _build(source, schema, "")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def run_setup(args, schema):
    """What ``recipes/train.py`` and ``recipes/train_rl.py`` do before building a run: load ``args.config``
    with ``schema``, resolve the output directory (``--out-dir`` over the config's ``out_dir``, made absolute),
    apply ``--threads`` and pick the device (``--device``; otherwise, with one process, cuda when available).
    Returns (config, out_dir, device); a problem raises ``ConfigError`` with the message for the user."""
    from pathlib import Path

    import torch

    from ospfn.parallel.mesh import world_from_env

    try:
        cfg = load_config(args.config, schema)
    except FileNotFoundError as e:
        raise ConfigError(f"--config: {e}") from None
    out_dir = Path(args.out_dir if args.out_dir is not None else cfg.out_dir)
    if not out_dir.is_absolute():
        out_dir = Path.cwd() / out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{'--out-dir' if args.out_dir is not None else 'out_dir'}: {out_dir} exists and is not a directory")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        launched = world_from_env(1, where="train") > 1
    except ValueError as e:  # a malformed WORLD_SIZE
        raise ConfigError(str(e)) from None
    device = args.device if args.device is not None or launched else resolve_device(None)
    return cfg, out_dir, device
