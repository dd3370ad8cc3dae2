"""Build script: the pure-Python package plus the CMake-built extensions ``ospfn._C``, ``ospfn._ascend_sim`` (the
Ascend C kernels on a CPU shim, for the tests) and, where CANN and torch_npu exist, ``ospfn._npu``.

Install against the torch already in the environment (build isolation would fetch another torch)::

    pip install --no-build-isolation -e ".[dev]"

Environment knobs:
  OSPFN_SKIP_EXT=1     build without the C++ extensions (the ``cpp`` backend then reports itself unavailable)
  ASCEND_HOME_PATH     the CANN toolkit: also build the NPU kernels ``ospfn._npu`` (needs torch_npu; docs/npu.md)
  OSPFN_BUILD_TYPE     CMake build type (default Release)
  MAX_JOBS             parallel compile jobs (default: CPU count)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """One module of the CMake project.  The primary one runs the CMake build, which writes every module; the
    others are listed so that setuptools copies them too (editable installs copy each extension into the
    source tree); an optional one (``ospfn._npu``, built only where CANN exists) may be absent."""

    def __init__(self, name: str, source_dir: Path, *, primary: bool = True, optional: bool = False) -> None:
        super().__init__(name, sources=[], optional=optional)
        self.source_dir = str(source_dir)
        self.primary = primary


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        if not ext.primary:  # written by the primary extension's CMake build
            out = Path(self.get_ext_fullpath(ext.name))
            if not out.exists() and not ext.optional:
                raise RuntimeError(f"the CMake build did not produce {out}")
            return None
        try:
            import torch
            import pybind11
        except ImportError as e:  # pragma: no cover - exercised by users, not tests
            raise RuntimeError(
                f"building ospfn._C needs torch and pybind11 installed first ({e}); "
                "run `pip install torch==2.13.0 pybind11 ninja` and build with --no-build-isolation"
            ) from e
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("building ospfn._C needs cmake >= 3.18 on PATH (`pip install cmake` or your OS package)")
        ninja = shutil.which("ninja")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('OSPFN_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DOSPFN_OUTPUT_DIR={out_dir}",
            f"-DOSPFN_TORCH_VERSION={torch.__version__}",
        ]
        if ninja is not None:
            cfg = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] + cfg
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([cmake, "-S", ext.source_dir, "-B", str(build_dir), *cfg], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


ext_modules = (
    []
    if os.environ.get("OSPFN_SKIP_EXT") == "1"
    else [
        CMakeExtension("ospfn._C", ROOT),
        CMakeExtension("ospfn._ascend_sim", ROOT, primary=False),
        CMakeExtension("ospfn._npu", ROOT, primary=False, optional=True),
    ]
)

setup(
    packages=find_packages(include=["ospfn", "ospfn.*"]) + ["ospfn.kernels"],
    package_dir={"ospfn": "ospfn", "ospfn.kernels": "kernels"},
    package_data={"ospfn": ["assets/tiny_flashi2v/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
