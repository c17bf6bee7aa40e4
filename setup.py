"""Build script. Metadata lives in pyproject.toml; this file only adds the optional C++ extension.

``gircse_kernels._C`` (the sources in csrc/, listed in SOURCES) is compiled against the installed torch
(``pip install --no-build-isolation``) with ninja, ``-O3`` and OpenMP, without ``-march=native`` so a
built wheel runs on any x86-64 CPU (the heavy lifting is in torch's own runtime-dispatched kernels).
If torch's build helpers or a C++ compiler are missing, or the compilation fails, the install still
succeeds without the extension: ``gircse_kernels.cpu`` then tries a JIT build at first use and
otherwise ``backend="auto"`` falls back to the pure-PyTorch backend with a warning.
Set ``GIRCSE_NO_EXTENSION=1`` to skip the extension on purpose. ``GIRCSE_REQUIRE_EXTENSION=1`` (set by
CI, ``.ci/run``) turns every one of those failures into a failed install, and makes the package
refuse to run without the compiled extension (see ``gircse_kernels/cpu.py``).
"""
import os
import warnings

from setuptools import setup


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


REQUIRED = _flag("GIRCSE_REQUIRE_EXTENSION")
if REQUIRED and _flag("GIRCSE_NO_EXTENSION"):
    raise SystemExit("gircse: GIRCSE_REQUIRE_EXTENSION=1 and GIRCSE_NO_EXTENSION=1 contradict each other")


def _not_built(what):
    if REQUIRED:
        raise RuntimeError(f"gircse: {what}, and GIRCSE_REQUIRE_EXTENSION=1 requires the C++ CPU extension")
    warnings.warn(f"gircse: {what}; gircse_kernels.cpu will try a JIT build at first use")


# Every C++ source of the extension (csrc/README.md says what each holds). gircse_kernels/cpu.py's JIT
# fallback compiles every .cpp under csrc/; tests/gircse_kernels/test_cpu.py checks the two agree.
SOURCES = [
    "csrc/bindings.cpp",
    "csrc/plan.cpp",
    "csrc/stream_kernels.cpp",
    "csrc/stream_path.cpp",
    "csrc/tile_kernels.cpp",
    "csrc/tile_path.cpp",
]
HEADERS = ["csrc/host.h", "csrc/kernels.h", "csrc/merge.h", "csrc/vec.h"]

ext_modules, cmdclass = [], {}

if not _flag("GIRCSE_NO_EXTENSION"):
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch not importable at build time
        if REQUIRED:
            raise
        warnings.warn(f"gircse: building without the C++ CPU extension (torch unavailable: {exc})")
    else:

        class OptionalBuildExtension(BuildExtension):
            """BuildExtension whose failure (no compiler, ...) only warns: the extension is optional
            (unless GIRCSE_REQUIRE_EXTENSION=1)."""

            def run(self):
                try:
                    super().run()
                except Exception as exc:
                    _not_built(f"C++ CPU extension not built ({type(exc).__name__}: {exc})")

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:
                    _not_built(f"C++ CPU extension {ext.name} not built ({type(exc).__name__}: {exc})")

        ext_modules.append(CppExtension(
            name="gircse_kernels._C",
            sources=SOURCES,
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            depends=HEADERS,
        ))
        cmdclass["build_ext"] = OptionalBuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
