"""GIRCSE: generative embeddings from a causal LLM through soft-token generation.

``GIRCSE.from_pretrained(...)`` / ``gircse.load_default()`` give the embedding model;
``gircse.generation`` holds Algorithm 1 (``generate_soft_tokens``, ``pool_steps``).
Heavy imports (torch, transformers) happen on first attribute access, so ``import gircse`` is cheap.
"""
__version__ = "0.1.0"

_LAZY = {
    "GIRCSE": "gircse.model",
    "METHODS": "gircse.methods",
    "load_default": "gircse.model",
    "load_model": "gircse.model",
    "generate_soft_tokens": "gircse.generation",
    "generate_soft_tokens_uncached": "gircse.generation",
    "pool_steps": "gircse.generation",
    "QUERY_FORMAT": "gircse.prompts",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gircse' has no attribute {name!r}")
