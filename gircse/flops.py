"""Analytic FLOPs and memory of GIRCSE encoding and of its baselines, for any transformers decoder config.

Two conventions, because they answer different questions:

``convention="paper"`` reproduces the paper's Table 6 (App. D). The table is linear in the number of
token positions: every position costs ``c = 2 * (decoder linear parameters + LM-head parameters)``
FLOPs (a multiply-add per weight), attention is not counted, and every method runs the LM head at
every position. Per sequence of N tokens:

    Causal-EOS, Bidirectional-Avg     c * N
    GIRCSE with KV cache              c * (N + K)                 (prefill N, then K one-position steps)
    GIRCSE without cache              c * [(K + 1) N + K (K + 1) / 2]
                                      (forwards over N, N+1, ..., N+K-1 to generate, a final one over N+K)

plus, optionally, the soft-token mixture ``d_k = s_k E``: ``2 V d_e`` per step (``mixture=True``).

``convention="executed"`` counts the matrix products this package actually runs, the quantity
``torch.utils.flop_counter.FlopCounterMode`` measures (``tests/gircse/test_flops.py`` checks the two
agree): decoder linear layers at every position; attention ``QK^T`` and ``AV`` over the dense
query x key rectangle of each call (``4 * heads * head_dim`` per (query, key) pair and layer, as SDPA
and eager attention compute it, causal mask or not); **no** LM head for the baselines (they read the
backbone's last hidden state); for GIRCSE one soft-token step per generated token, ``2 V d`` for the
logits and ``2 V d_e`` for the mixture (``mixture=False`` drops the latter). N is the (padded) length
the model runs over; Causal-EOS's N includes its EOS token. Biases, norms, rotary and activation
functions (O(d) per position) are ignored in both conventions.

Memory (``encode_memory``): the weights and the KV cache a sequence holds at the end of encoding. The
cached generation keeps the keys/values of N + K positions; the uncached way builds the same amount
transiently in its last forward (caching costs no memory, it saves recomputation); the baselines hold
N positions. Activations and the fused op's workspace (a few KiB per row) are not included.
"""
from __future__ import annotations

import dataclasses

__all__ = [
    "CONVENTIONS",
    "PRESETS",
    "DecoderShape",
    "METHODS",
    "decode_step_bytes",
    "encode_flops",
    "encode_memory",
    "forward_flops",
    "paper_table6",
    "soft_token_flops",
]

METHODS = ("causal-eos", "bidirectional-avg", "gircse")
CONVENTIONS = ("paper", "executed")


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder-only transformer that FLOPs and memory depend on."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied: bool
    gated_mlp: bool = True  # SwiGLU (gate, up, down): Llama, Mistral, Qwen2, SmolLM2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"DecoderShape.{field.name} must be an int >= 1, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @classmethod
    def from_config(cls, config) -> "DecoderShape":
        """From a transformers config (``LlamaConfig``, ``MistralConfig``, ``Qwen2Config``, ...) or a model's.

        Assumes the gated (SwiGLU) MLP of those families; ``dataclasses.replace(shape, gated_mlp=False)``
        for a two-matrix MLP."""
        config = getattr(config, "text_config", None) or config

        def need(name):
            value = getattr(config, name, None)
            if value is None:
                raise ValueError(f"{type(config).__name__} has no {name!r}; DecoderShape.from_config needs a "
                                 "decoder-only transformers config (Llama, Mistral, Qwen2, ...)")
            return value

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        return cls(vocab_size=need("vocab_size"), hidden_size=hidden, num_layers=need("num_hidden_layers"),
                   num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or hidden // heads,
                   intermediate_size=need("intermediate_size"),
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def embed_dim(self) -> int:
        """d_e, the width of the input embeddings (the soft token's width)."""
        return self.hidden_size

    @property
    def decoder_linear_params(self) -> int:
        """Weights of q, k, v, o and the MLP, all layers (what every position multiplies by)."""
        d, hd = self.hidden_size, self.head_dim
        attention = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2
        mlp = (3 if self.gated_mlp else 2) * d * self.intermediate_size
        return self.num_layers * (attention + mlp)

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def weight_bytes(self, dtype_bytes: int) -> int:
        """Decoder linear layers, input embeddings and (untied) LM head; norms ignored."""
        matrices = self.decoder_linear_params + self.vocab_size * self.embed_dim
        return (matrices + (0 if self.tied else self.lm_head_params)) * dtype_bytes

    def kv_bytes_per_position(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


# Published configs (config.json of each model on the Hugging Face hub), so the table needs no download.
PRESETS = {
    "smollm2-135m": DecoderShape(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                                 head_dim=64, intermediate_size=1536, tied=True),
    "qwen2.5-0.5b": DecoderShape(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                                 head_dim=64, intermediate_size=4864, tied=True),
    "mistral-7b": DecoderShape(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                               head_dim=128, intermediate_size=14336, tied=False),
    "qwen2-7b": DecoderShape(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                             head_dim=128, intermediate_size=18944, tied=False),
}


def _shape(model) -> DecoderShape:
    if isinstance(model, DecoderShape):
        return model
    if isinstance(model, str):
        if model not in PRESETS:
            raise ValueError(f"unknown model preset {model!r}; presets: {sorted(PRESETS)} (or pass a config)")
        return PRESETS[model]
    return DecoderShape.from_config(getattr(model, "config", model))


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def forward_flops(model, queries: int, keys: int | None = None) -> int:
    """One decoder call, per sequence: ``queries`` new positions attending to ``keys`` positions
    (default: ``queries``, a call without cache). Linear layers + dense attention; no LM head."""
    shape = _shape(model)
    queries = _count("queries", queries, 1)
    keys = queries if keys is None else _count("keys", keys, 1)
    attention = 4 * shape.num_layers * shape.num_heads * shape.head_dim * queries * keys
    return 2 * shape.decoder_linear_params * queries + attention


def soft_token_flops(model, *, mixture: bool = True) -> int:
    """One soft-token step for one row: logits ``2 V d`` (+ the mixture ``2 V d_e``)."""
    shape = _shape(model)
    return 2 * shape.vocab_size * (shape.hidden_size + (shape.embed_dim if mixture else 0))


def decode_step_bytes(model, batch: int, keys: int, *, dtype_bytes: int = 2) -> int:
    """Bytes one cached decode step must move at least: every weight it multiplies by (decoder
    linears, the op's W and, untied, E) read once, the KV cache of ``keys`` positions read and one
    position written, per sequence of the batch. At small batch this, not its FLOPs, bounds a step."""
    shape = _shape(model)
    batch, keys = _count("batch", batch, 1), _count("keys", keys, 1)
    weights = shape.decoder_linear_params + shape.vocab_size * (
        shape.hidden_size + (0 if shape.tied else shape.embed_dim))
    return dtype_bytes * weights + batch * (keys + 1) * shape.kv_bytes_per_position(dtype_bytes)


def _check(method: str, convention: str, cache: bool, k: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not isinstance(cache, bool):
        raise TypeError(f"cache must be a bool, got {cache!r}")
    _count("k", k, 1)


def encode_flops(model, method: str, n_tokens: int, k: int = 5, *, cache: bool = True, mixture: bool = True,
                 convention: str = "paper", batch: int = 1) -> int:
    """FLOPs to embed ``batch`` sequences of ``n_tokens`` tokens (see the module docstring).

    Args:
        model: a preset name (``PRESETS``), a ``DecoderShape``, a transformers config or a model.
        method: "causal-eos" | "bidirectional-avg" | "gircse".
        k: soft tokens (GIRCSE only). cache: GIRCSE with the KV cache (prefill + K steps) or the
            uncached K + 1 full forwards. mixture: count the soft-token mixture ``2 V d_e`` per step.
        convention: "paper" (Table 6) or "executed" (what this package runs; FlopCounterMode's count).
    """
    _check(method, convention, cache, k)
    shape = _shape(model)
    n = _count("n_tokens", n_tokens, 1)
    batch = _count("batch", batch, 1)
    steps = k if method == "gircse" else 0
    if convention == "paper":
        per_position = 2 * (shape.decoder_linear_params + shape.lm_head_params)
        if method != "gircse":
            positions = n
        elif cache:
            positions = n + k
        else:
            positions = (k + 1) * n + k * (k + 1) // 2
        total = per_position * positions + steps * 2 * shape.vocab_size * shape.embed_dim * mixture
        return batch * total
    if method != "gircse":
        total = forward_flops(shape, n)
    elif cache:
        total = forward_flops(shape, n) + sum(forward_flops(shape, 1, n + j) for j in range(1, k + 1))
    else:
        total = sum(forward_flops(shape, n + j) for j in range(k + 1))
    total += steps * soft_token_flops(shape, mixture=mixture)
    return batch * total


def encode_memory(model, method: str, n_tokens: int, k: int = 5, *, cache: bool = True,
                  dtype_bytes: int = 2) -> dict[str, int]:
    """``{"weights": bytes, "kv_cache": bytes per sequence}`` (see the module docstring)."""
    _check(method, "paper", cache, k)
    shape = _shape(model)
    n = _count("n_tokens", n_tokens, 1)
    dtype_bytes = _count("dtype_bytes", dtype_bytes, 1)
    positions = n + (k if method == "gircse" else 0)
    return {"weights": shape.weight_bytes(dtype_bytes),
            "kv_cache": positions * shape.kv_bytes_per_position(dtype_bytes)}


# The paper's Table 6 for Mistral-7B at N = 512 (TFLOPs), and the table's N and K grid.
PAPER_TABLE6_MISTRAL_N512 = {("causal-eos", None): 7.33, ("gircse-nocache", 1): 14.67,
                             ("gircse-nocache", 3): 29.39, ("gircse-nocache", 5): 44.17,
                             ("gircse-cache", 1): 7.34, ("gircse-cache", 3): 7.37, ("gircse-cache", 5): 7.40}
PAPER_TABLE6_CAUSAL_EOS = {512: 7.33, 1024: 14.65, 2048: 29.30}


def paper_table6(model="mistral-7b", *, lengths=(512, 1024, 2048), ks=(1, 3, 5), mixture: bool = False,
                 convention: str = "paper") -> list[dict]:
    """Rows of Table 6 for ``model``: one per (method, K, N) with ``tflops`` and, in the paper
    convention, the per-position constant ``c``. Bidirectional-Avg costs what Causal-EOS costs."""
    rows = []
    for n in lengths:
        rows.append({"method": "causal-eos", "k": None, "n": n, "cache": None,
                     "tflops": encode_flops(model, "causal-eos", n, convention=convention) / 1e12})
        for cache in (False, True):
            for k in ks:
                rows.append({"method": "gircse", "k": k, "n": n, "cache": cache,
                             "tflops": encode_flops(model, "gircse", n, k, cache=cache, mixture=mixture,
                                                    convention=convention) / 1e12})
    return rows
