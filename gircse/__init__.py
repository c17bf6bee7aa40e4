"""GIRCSE: generative embeddings from a causal LLM through soft-token generation."""
__version__ = "0.1.0"
