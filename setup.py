"""Builds rlgaf_fast and its compiled extension rlgaf_fast._C.

The extension holds the C++ CPU kernels (csrc/cpu); the GPU kernels are Triton, compiled at run
time. A failed or impossible compile does not fail the install: the package then runs on its
torch backend and says so once when first used.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions_and_cmdclass():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "rlgaf_fast: torch is not importable at build time; skipping the C++ extension",
            file=sys.stderr,
        )
        return [], {}
    if os.environ.get("RLGAF_FAST_NO_EXTENSION") == "1":
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print(
            "rlgaf_fast: no C++ compiler found; installing without the extension", file=sys.stderr
        )
        return [], {}

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if os.environ.get("RLGAF_FAST_PORTABLE") != "1":
        cxx_flags.append("-march=native")
    ext = CppExtension(
        "rlgaf_fast._C",
        sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        optional=True,  # setuptools then skips a missing library when installing in place
    )

    class OptionalBuildExtension(BuildExtension):
        """Turns a compile failure into a warning, so that the install still succeeds."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as error:  # noqa: BLE001 - any compiler failure
                print(
                    f"rlgaf_fast: building {extension.name} failed ({error}); the package "
                    "will run on the torch backend",
                    file=sys.stderr,
                )

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()

setup(
    packages=[
        "rlgaf_fast",
        "rlgaf_fast.ops",
        "rlgaf_fast.rlgaf",
        "rlgaf_fast.kernels",
        "rlgaf_fast.bench",
        "rlgaf_fast.integrations",
    ],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
