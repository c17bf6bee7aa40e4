"""Algorithm 1 of the paper: soft-token generation with a KV cache, and pooling of the generated states.

Notation (paper): the input x is encoded; at step k the LLM's last hidden state h gives a distribution
over the vocabulary ``s_k = softmax(W h)``, and the next input is the *soft token*
``d_k = s_k @ E`` (a probability-weighted mix of input-embedding rows, never a sampled id).
After K steps the embedding is the mean of the final-layer hidden states at the K generated
positions: ``z_K = mean(g_1..g_K)``; ``z_k`` (mean of the first k) is the embedding after k steps.

Why no final re-forward: the paper's description runs the LLM once more over [x; d_1..d_K] to read
the hidden states at the generated positions. Under causal attention the state at the position of
d_k depends only on x, d_1..d_k, so it is exactly the state the model computed when d_k was fed as
the one new position at step k. Each state is therefore kept as it is produced; prefill + K
one-position steps replace the K+1 full forwards of the naive loop (``generate_soft_tokens_uncached``
is that naive loop, kept as the test oracle).

Batches are left padded so the last column is every row's last real token; ``position_ids`` count
real tokens only, so a padded row sees the same positions (rotary phases) as the row alone.

Two KV caches, one per mode (``_prefill`` builds it, ``_step_cache`` extends it):

* With autograd recording (training), the cache is rebuilt per decoder call from the previous call's
  keys/values (``_ReplaySafeLayer``): each call appends to a *fixed* past (``torch.cat``) instead of
  mutating a shared cache. That is what makes the cache compatible with gradient checkpointing:
  transformers' checkpointed layers replay their forward during backward, and a replay must see
  exactly the keys the forward saw (a shared, growing cache would hand it the keys of every later
  step too, which is why transformers drops the cache under checkpointing). It also keeps every
  step's keys alive for backward, which in-place writes into a shared buffer would invalidate.
* Without autograd (``encode``, GradCache's first pass), nothing is replayed or differentiated, so
  one buffer per layer holds all N + K positions (``_StaticLayer``, allocated at the prefill); each
  step writes its one new position in place and attends to a view of the filled prefix. The
  ``torch.cat`` way copies the whole past of every layer at every step (O(N) bytes per step and
  layer, as much memory traffic as the attention itself), which the profile of a decode step showed.
  Both caches hand attention the same values, so the two modes agree to the bit (tested).
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch import nn
from torch.profiler import record_function
from transformers.cache_utils import Cache, DynamicLayer

from gircse_kernels import SoftTokenEmbedding

from .validation import as_int

__all__ = [
    "base_causal_lm",
    "check_k",
    "check_left_padded",
    "decoder_of",
    "generate_soft_tokens",
    "generate_soft_tokens_uncached",
    "left_padded_position_ids",
    "pool_steps",
    "prefill_chunks",
    "soft_token_embedding_of",
]


def check_k(k) -> int:
    """K, the number of soft tokens, as a positive Python int (numpy integers too; clear error otherwise)."""
    return as_int("k (number of generated soft tokens)", k, minimum=1)


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside ``model`` (unwraps a peft model; LoRA layers stay injected)."""
    get_base = getattr(model, "get_base_model", None)  # peft.PeftModel
    return get_base() if callable(get_base) else model


def decoder_of(model: nn.Module) -> nn.Module:
    """The backbone (e.g. ``LlamaModel``) whose ``last_hidden_state`` is post final norm.

    Calling the backbone instead of the causal LM skips the LM head: the [B, L, V] logits are
    never built; soft tokens go through the fused op instead.
    """
    return base_causal_lm(model).get_decoder()


def soft_token_embedding_of(model: nn.Module, **kwargs) -> SoftTokenEmbedding:
    """The fused ``softmax(lm_head(h)) @ E`` bound to the model's current parameters (cheap to build)."""
    return SoftTokenEmbedding.from_model(base_causal_lm(model), **kwargs)


def left_padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only (pads get 0; they are masked out anyway)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class _ReplaySafeLayer(DynamicLayer):
    """One layer's KV cache for one decoder call: ``keys = cat(past, new)`` from a past fixed at creation.

    ``update`` is idempotent, so a gradient-checkpoint replay of the layer during backward gets the
    same keys/values as the forward did. The concatenation keeps the autograd graph to the past.
    """

    def __init__(self, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.past = past
        if past is not None:
            self.keys, self.values = past
            self.device, self.is_initialized = past[0].device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.past is None:
            keys, values = key_states, value_states
        else:
            keys = torch.cat([self.past[0], key_states], dim=-2)
            values = torch.cat([self.past[1], value_states], dim=-2)
        self.keys, self.values = keys, values
        self.device, self.is_initialized = keys.device, True
        return keys, values


class _StaticLayer(DynamicLayer):
    """One layer's KV cache for a whole generation without autograd: zero-filled buffers
    ``[batch, heads, capacity, head_dim]``, written in place.

    Each decoder call works in a window that the generation sets with :func:`_place`: its new
    positions are written to rows ``rows`` at column ``end``, and attention gets views of columns
    ``begin`` to ``end + new`` (no copy of the past). A prefill in row chunks writes every chunk
    right-aligned at the same columns (left padding), so the K steps then run on all rows at once;
    columns a short chunk never wrote stay zero and masked (zero, not garbage: a masked key still
    meets its value in ``probabilities @ values``, where 0 * NaN would be NaN).
    """

    def __init__(self, batch: int, capacity: int):
        super().__init__()
        self.batch, self.capacity = batch, capacity
        self.rows, self.begin, self.end = slice(None), 0, 0
        self.key_buffer = self.value_buffer = None

    def get_seq_length(self) -> int:  # the window's past: what transformers sizes a 2-D mask by
        return self.end - self.begin

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.key_buffer is None:
            _, heads, _, dim = key_states.shape
            self.key_buffer = key_states.new_zeros(self.batch, heads, self.capacity, dim)
            self.value_buffer = value_states.new_zeros(self.batch, heads, self.capacity, value_states.shape[-1])
            self.device, self.is_initialized = key_states.device, True
        stop = self.end + key_states.shape[-2]
        if stop > self.capacity:
            raise RuntimeError(f"static KV cache overflow: {stop} positions, capacity {self.capacity}")
        self.key_buffer[self.rows, :, self.end:stop] = key_states
        self.value_buffer[self.rows, :, self.end:stop] = value_states
        self.keys = self.key_buffer[self.rows, :, self.begin:stop]
        self.values = self.value_buffer[self.rows, :, self.begin:stop]
        return self.keys, self.values


def _place(cache: Cache, rows: slice, begin: int, end: int) -> Cache:
    """Set the window of every static layer for the next decoder call (see ``_StaticLayer``)."""
    for layer in cache.layers:
        layer.rows, layer.begin, layer.end = rows, begin, end
    return cache


def prefill_chunks(attention_mask: torch.Tensor, prefill_rows: int | None) -> list[tuple[slice, int]]:
    """``(rows, first column)`` of each prefill: the whole batch, or chunks of ``prefill_rows`` rows
    each cut to its own longest row (left padding: the columns before ``first`` are padding in every
    row of the chunk). Reads the row lengths back to the host once."""
    batch, length = attention_mask.shape
    if prefill_rows is None or prefill_rows >= batch:
        return [(slice(None), 0)]
    real = attention_mask.sum(dim=1).tolist()
    return [(slice(r0, min(batch, r0 + prefill_rows)), length - int(max(real[r0:r0 + prefill_rows])))
            for r0 in range(0, batch, prefill_rows)]


def _prefill(decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             chunks: list[tuple[slice, int]], capacity: int, capturable: bool) -> tuple[Cache, torch.Tensor]:
    """Run the input through the backbone chunk by chunk; ``(cache, last-token states [B, d])``.

    Without autograd the chunks fill one static cache. With autograd each chunk gets its own
    replay-safe cache, and the chunks' keys/values are then left-padded to the batch's length and
    stacked into the past of the first step (one copy of the input's keys/values, kept by the graph).
    """
    n_layers, (batch, length) = decoder.config.num_hidden_layers, input_ids.shape
    static = not torch.is_grad_enabled()
    cache = Cache(layers=[_StaticLayer(batch, capacity) for _ in range(n_layers)]) if static else None
    states, pasts = [], []
    for rows, first in chunks:
        call_cache = _place(cache, rows, first, first) if static else Cache(
            layers=[_ReplaySafeLayer() for _ in range(n_layers)])
        mask = attention_mask[rows, first:]
        hidden = _decoder_call(decoder, call_cache, input_ids=input_ids[rows, first:],
                               attention_mask=_prefill_mask(decoder, mask) if capturable else mask,
                               position_ids=position_ids[rows, first:])
        states.append(hidden[:, -1])  # left padding: column -1 is every row's last real token
        if not static:
            pasts.append([(layer.keys, layer.values) for layer in call_cache.layers])
    if not static:
        if len(pasts) > 1:
            pad = lambda t: torch.nn.functional.pad(t, (0, 0, length - t.shape[-2], 0))
            pasts = [[(torch.cat([pad(p[i][0]) for p in pasts]), torch.cat([pad(p[i][1]) for p in pasts]))
                      for i in range(n_layers)]]
        cache = Cache(layers=[_ReplaySafeLayer(past) for past in pasts[0]])
    return cache, states[0] if len(states) == 1 else torch.cat(states)


def _step_cache(cache: Cache, past_length: int) -> Cache:
    """The cache of the next one-position step: the static cache's window over all rows, or a fresh
    replay-safe cache over the previous call's keys/values."""
    if isinstance(cache.layers[0], _StaticLayer):
        return _place(cache, slice(None), 0, past_length)
    return Cache(layers=[_ReplaySafeLayer((layer.keys, layer.values)) for layer in cache.layers])


def _decoder_call(decoder: nn.Module, cache: Cache, **inputs) -> torch.Tensor:
    """Run the backbone on new positions with ``cache`` (which it extends); the last hidden state."""
    # use_cache=False only stops the model from creating a cache of its own (and from warning that
    # checkpointing disables caching); attention layers use any cache they are given.
    return decoder(**inputs, cache=cache, use_cache=False).last_hidden_state


_warned_reentrant = False


@contextlib.contextmanager
def _cache_through_checkpointed_layers(decoder: nn.Module):
    """Let checkpointed layers keep the cache (transformers drops it unless the layer declares it safe).

    Reentrant checkpointing only propagates gradients to the layer's positional tensor arguments, so
    gradients through the cached keys/values (a keyword argument) would be silently lost: for these
    calls the layers use non-reentrant checkpointing instead.
    """
    global _warned_reentrant
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    allowed = [m for m in layers if "_can_checkpoint_with_cache" not in vars(m)]
    for m in allowed:
        m._can_checkpoint_with_cache = True  # safe: _ReplaySafeLayer.update is idempotent
    checkpointing = [m for m in layers if m.gradient_checkpointing and m.training and torch.is_grad_enabled()]
    reentrant = [m for m in checkpointing
                 if getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", {}).get("use_reentrant")]
    originals = [m._gradient_checkpointing_func for m in reentrant]
    if reentrant and not _warned_reentrant:
        warnings.warn("gircse: reentrant gradient checkpointing would drop gradients through the KV cache; "
                      "soft-token generation uses use_reentrant=False.", RuntimeWarning, stacklevel=4)
        _warned_reentrant = True
    for m, original in zip(reentrant, originals):
        m._gradient_checkpointing_func = functools.partial(
            original.func, *original.args, **{**original.keywords, "use_reentrant": False})
    try:
        yield
    finally:
        for m in allowed:
            del m._can_checkpoint_with_cache
        for m, original in zip(reentrant, originals):
            m._gradient_checkpointing_func = original


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """The last column must be real in every row: with right padding (the tokenizers' default) the
    last column of a short row is a pad, and its state would silently stand for the text."""
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("input must be left padded (attention_mask[:, -1] all ones); GIRCSE.forward converts "
                         "right padding, as does gircse.prompts.to_left_padding")


def _decode_step_mask(decoder: nn.Module, full_mask: torch.Tensor) -> torch.Tensor:
    """The attention mask of every one-position step, built once: step j passes its first L + j columns.

    A step's single query (the newest position) may attend to every real key: the input's real
    tokens and every soft token so far. Handing transformers this 4-D mask ([B, 1, 1, L + K]; boolean
    for SDPA, additive for eager attention, as ``baselines.bidirectional_attention_mask`` builds them)
    skips its per-step mask construction, which reads a reduction over the padding mask back to the
    host (``masking_utils.fast_all``: a device synchronization on GPU) at every step. Sliding-window
    layers need their window applied, and flash-attention kernels ignore 4-D masks: there the 2-D
    mask goes through transformers as usual.
    """
    if not _takes_prebuilt_masks(decoder):
        return full_mask
    return _as_attention_mask(decoder, full_mask.bool()[:, None, None, :])


def _prefill_mask(decoder: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """The prefill's 4-D mask ``[B, 1, L, L]``: causal, and no query attends to a padded key; built
    without reading the mask on the host (``capturable`` generation). 2-D where ``_decode_step_mask``
    keeps it too. A padded query sees itself, so its row is never fully masked (softmax of nothing
    is NaN, and a NaN key/value in the cache would poison real rows through 0 * NaN); its output is
    discarded and no real query attends to it."""
    if not _takes_prebuilt_masks(decoder):
        return attention_mask
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    itself = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    allowed = causal[None, None] & (attention_mask.bool()[:, None, None, :] | itself[None, None])
    return _as_attention_mask(decoder, allowed)


def _takes_prebuilt_masks(decoder: nn.Module) -> bool:
    """SDPA / eager attention without sliding-window layers: a 4-D mask passes through transformers
    unchanged. Sliding windows need transformers to apply them, and flash-attention kernels ignore
    4-D masks."""
    config = decoder.config
    sliding = getattr(config, "sliding_window", None) is not None or any(
        "sliding" in str(t) for t in (getattr(config, "layer_types", None) or ()))
    return not sliding and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def _as_attention_mask(decoder: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean "may attend" mask as the attention implementation takes it: boolean for SDPA,
    additive (0 / dtype min) for eager attention, as ``baselines.bidirectional_attention_mask`` builds them."""
    if getattr(decoder.config, "_attn_implementation", "sdpa") == "sdpa":
        return allowed
    dtype = decoder.get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, *, check_padding: bool = True) -> None:
    check_k(k)
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, L]; got {tuple(input_ids.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens")
    if check_padding:
        check_left_padded(attention_mask)


def generate_soft_tokens(
    model: nn.Module,
    soft_token_embedding: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    k: int,
    *,
    return_prefill_state: bool = False,
    capturable: bool = False,
    prefill_rows: int | None = None,
):
    """Algorithm 1 with a KV cache: hidden states of the k generated positions, ``[B, k, d]``.

    Args:
        model: a transformers causal LM, or a peft model wrapping one.
        soft_token_embedding: ``h -> softmax(lm_head(h)) @ E`` (``gircse_kernels.SoftTokenEmbedding``);
            None builds it from ``model``.
        input_ids, attention_mask: ``[B, L]``, **left padded** (the last column is real for every row).
        k: number of soft tokens to generate (>= 1).
        return_prefill_state: also return the input's last-token state ``[B, d]`` (the state whose
            distribution gives d_1); ``explain`` uses it.
        capturable: read nothing back to the host, so the whole call can be captured in a CUDA graph
            (``torch.cuda.graph``) or traced: the left-padding check (which reads the mask) is skipped --
            the caller checks once with :func:`check_left_padded` -- and the prefill gets a prebuilt 4-D
            mask like the steps (transformers would read the padding mask to decide whether SDPA may run
            with ``is_causal``). Values equal the default path's to round-off (SDPA with an explicit
            causal mask instead of ``is_causal``).
        prefill_rows: prefill in chunks of this many rows, each cut to its own longest row, then run
            the k steps on all rows at once (None: one prefill). With rows sorted by length this keeps
            the prefill free of most padding while the steps, whose cost is reading every weight once,
            run on a batch large enough to amortize that read. Values equal one prefill's to round-off.

    The prefill runs once over the input; then each of the k steps feeds one soft token d_j as
    ``inputs_embeds`` ([B, 1, d]) with the cache, the grown mask and explicit positions, and keeps
    the final-layer state at that position (g_j, which also yields d_{j+1}).

    Autograd: called with grad enabled, the graph runs through the cached keys/values, so training
    backprops through every step at the cost of one pass over the input. Works with gradient
    checkpointing (``model.gradient_checkpointing_enable()``): the per-call caches replay exactly.
    """
    _check_inputs(input_ids, attention_mask, k, check_padding=not capturable)
    decoder = decoder_of(model)
    if soft_token_embedding is None:
        soft_token_embedding = soft_token_embedding_of(model)
    position_ids = left_padded_position_ids(attention_mask)
    length = input_ids.shape[1]
    prefill_rows = None if prefill_rows is None else as_int("prefill_rows", prefill_rows, minimum=1)
    if capturable and prefill_rows is not None and prefill_rows < input_ids.shape[0]:
        raise ValueError("prefill_rows cuts the prefill by the rows' lengths, read on the host; "
                         "not with capturable=True")
    # Every step's mask and position, built once: step j sees the input and d_1..d_j at real-token
    # positions last+1..last+j.
    step_mask = _decode_step_mask(
        decoder, torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], k)], dim=1))
    step_positions = position_ids[:, -1:] + torch.arange(1, k + 1, device=position_ids.device)
    chunks = prefill_chunks(attention_mask, None if capturable else prefill_rows)
    # The profiler ranges name the prefill and each step in any trace (bench/test_bench_model.py reads them).
    with _cache_through_checkpointed_layers(decoder):
        with record_function("gircse.prefill"):
            cache, prefill_state = _prefill(decoder, input_ids, attention_mask, position_ids, chunks,
                                            length + k, capturable)
        state, embed_dtype = prefill_state, prefill_state.dtype
        generated = []
        for j in range(k):
            with record_function("gircse.decode_step"):
                soft_token = soft_token_embedding(state)  # d_j = s_j @ E, [B, d_e]
                cache = _step_cache(cache, length + j)
                hidden = _decoder_call(decoder, cache, inputs_embeds=soft_token.unsqueeze(1).to(embed_dtype),
                                       attention_mask=step_mask[..., :length + j + 1],
                                       position_ids=step_positions[:, j:j + 1])
            state = hidden[:, -1]  # g_j: the state at d_j's position
            generated.append(state)
    generated = torch.stack(generated, dim=1)
    return (generated, prefill_state) if return_prefill_state else generated


def generate_soft_tokens_uncached(
    model: nn.Module,
    soft_token_embedding: nn.Module | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    k: int,
    *,
    return_prefill_state: bool = False,
    prefill_rows: int | None = None,
):
    """Algorithm 1 exactly as written, no cache: the oracle for ``generate_soft_tokens``.

    Step j runs the LLM over the whole sequence [x; d_1..d_j] to get d_{j+1}; a final forward over
    [x; d_1..d_k] then reads the states at the k generated positions. K+1 full forwards.
    ``prefill_rows`` is accepted so the oracle can stand in for ``generate_soft_tokens`` anywhere; it
    runs every row at once (the chunks only change GEMM shapes, not values beyond round-off).
    """
    _check_inputs(input_ids, attention_mask, k)
    decoder = decoder_of(model)
    if soft_token_embedding is None:
        soft_token_embedding = soft_token_embedding_of(model)
    embeds = base_causal_lm(model).get_input_embeddings()(input_ids)
    mask = attention_mask
    one_more = attention_mask.new_ones(attention_mask.shape[0], 1)
    prefill_state = None
    for _ in range(k):
        last = decoder(inputs_embeds=embeds, attention_mask=mask,
                       position_ids=left_padded_position_ids(mask)).last_hidden_state[:, -1]
        if prefill_state is None:
            prefill_state = last
        soft_token = soft_token_embedding(last)
        embeds = torch.cat([embeds, soft_token.unsqueeze(1).to(embeds.dtype)], dim=1)
        mask = torch.cat([mask, one_more], dim=1)
    final = decoder(inputs_embeds=embeds, attention_mask=mask,
                    position_ids=left_padded_position_ids(mask)).last_hidden_state
    generated = final[:, -k:]
    return (generated, prefill_state) if return_prefill_state else generated


def pool_steps(generated: torch.Tensor, *, return_all_steps: bool = False) -> torch.Tensor:
    """Mean-pool generated states ``[B, K, d]``.

    ``return_all_steps=False``: ``z_K = mean(g_1..g_K)``, ``[B, d]``.
    ``return_all_steps=True``: ``[B, K, d]`` with ``z_k = mean(g_1..g_k)`` in slot k-1 (the
    embedding a K=k run would give, since later steps never change earlier states).
    """
    if generated.ndim != 3:
        raise ValueError(f"generated states must be [B, K, d], got {tuple(generated.shape)}")
    if not return_all_steps:
        return generated.mean(dim=1)
    counts = torch.arange(1, generated.shape[1] + 1, device=generated.device, dtype=generated.dtype)
    return generated.cumsum(dim=1) / counts[:, None]
