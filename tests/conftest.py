"""Suite-wide setup.

Without a GPU the Triton kernels are tested under the Triton interpreter, which must be switched on
before any kernel module is imported (``triton.jit`` reads it at decoration time). With CUDA present
the same tests run the compiled kernels on the GPU instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
