"""Fused soft-token embedding: ``softmax(h W^T + b) @ E`` as single-query attention over the vocabulary.

Forward and backward never materialize the [B, V] logits or probabilities. Backends: Triton
(CUDA, or CPU under ``TRITON_INTERPRET=1``), a C++ CPU extension, and a chunked PyTorch fallback;
``gircse_kernels.reference`` is the materializing specification they are all tested against.
"""
from . import reference
from .backends import resolve_backend
from .dispatch import soft_token_embedding
from .module import SoftTokenEmbedding

__all__ = [
    "SoftTokenEmbedding",
    "reference",
    "resolve_backend",
    "soft_token_embedding",
]
__version__ = "0.1.0"
