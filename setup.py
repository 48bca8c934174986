"""Builds segcft's kernel modules (segcft._C, and segcft._C_cuda where nvcc is found) with CMake.

Environment: SEGCFT_CUDA (unset = auto, 0 = skip CUDA, 1 = require it), SEGCFT_CUDA_ARCH
(CUDA architectures, default "80-real;90-real;90-virtual"), CMAKE_BUILD_PARALLEL_LEVEL.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension module whose build is delegated to CMakeLists.txt."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds all CMake targets once, then keeps only the modules that exist."""

    def build_extensions(self) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSEGCFT_OUTPUT_DIR={out_dir}",
            f"-DSEGCFT_CUDA={os.environ.get('SEGCFT_CUDA', '')}",
            f"-DSEGCFT_CUDA_ARCH={os.environ.get('SEGCFT_CUDA_ARCH', '')}",
        ]
        if "CMAKE_GENERATOR" not in os.environ:
            args.append("-GNinja")
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_temp), *args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(self.parallel or os.cpu_count() or 1)
        subprocess.run(
            ["cmake", "--build", str(build_temp), "--config", config, "--parallel", jobs], check=True
        )
        self.extensions = [e for e in self.extensions if Path(self.get_ext_fullpath(e.name)).exists()]


setup(
    ext_modules=[CMakeExtension("segcft._C"), CMakeExtension("segcft._C_cuda")],
    cmdclass={"build_ext": CMakeBuild},
)
