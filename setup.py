"""Build script. Metadata lives in pyproject.toml; this file only adds the optional C++ extension.

``gircse_kernels._C`` (csrc/soft_token_embedding.cpp) is compiled against the installed torch
(``pip install --no-build-isolation``) with ninja, ``-O3`` and OpenMP, without ``-march=native`` so a
built wheel runs on any x86-64 CPU (the heavy lifting is in torch's own runtime-dispatched kernels).
If torch's build helpers or a C++ compiler are missing, or the compilation fails, the install still
succeeds without the extension: ``gircse_kernels.cpu`` then tries a JIT build at first use and
otherwise ``backend="auto"`` falls back to the pure-PyTorch backend with a warning.
Set ``GIRCSE_NO_EXTENSION=1`` to skip the extension on purpose.
"""
import os
import warnings

from setuptools import setup

ext_modules, cmdclass = [], {}

if os.environ.get("GIRCSE_NO_EXTENSION", "0") in ("", "0"):
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch not importable at build time
        warnings.warn(f"gircse: building without the C++ CPU extension (torch unavailable: {exc})")
    else:

        class OptionalBuildExtension(BuildExtension):
            """BuildExtension whose failure (no compiler, ...) only warns: the extension is optional."""

            def run(self):
                try:
                    super().run()
                except Exception as exc:
                    warnings.warn(f"gircse: C++ CPU extension not built ({type(exc).__name__}: {exc}); "
                                  "gircse_kernels.cpu will try a JIT build at first use")

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:
                    warnings.warn(f"gircse: C++ CPU extension {ext.name} not built ({type(exc).__name__}: "
                                  f"{exc}); gircse_kernels.cpu will try a JIT build at first use")

        ext_modules.append(CppExtension(
            name="gircse_kernels._C",
            sources=["csrc/soft_token_embedding.cpp"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        ))
        cmdclass["build_ext"] = OptionalBuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
