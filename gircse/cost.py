"""Model-level roofline: the FLOPs and bytes of encoding and of a training step, call by call, and the
ideal time they imply on a machine with a given GEMM rate and memory bandwidth.

``gircse.flops`` counts FLOPs (the paper's Table 6 and what this package executes); this module adds
the bytes every call must move at least, because GIRCSE's soft-token steps are one position per text:
at small batch a step's FLOPs are tiny and its cost is reading every weight. A decoder call's ideal
time is ``max(FLOPs / gemm_rate, bytes / bandwidth)``; a workload's is the sum over its calls, which is
how they run (one after another, each bound by its own resource).

What is counted (``dtype_bytes`` per element of weights, activations and KV cache):

* decoder call (prefill chunk or one step): FLOPs of every linear layer at every new position and of
  dense attention over each row's keys (``gircse.flops.forward_flops``); bytes: the decoder's linear
  weights read once, each row's KV cache read once, the new positions' keys/values written once.
  Real tokens only: padding is the implementation's cost, not the method's.
* the soft-token op (``gircse_kernels``) for B rows: ``2 B V (d + d_e)`` FLOPs; W (and E, untied) read
  once.
* training, per decoder call and op call, forward and backward, with frozen base weights and LoRA of
  rank r on every linear layer: the forward adds the adapters' ``2 r (in + out)`` FLOPs per position; the
  backward computes input gradients through the base (the forward's linear FLOPs again), input and weight
  gradients of the adapters (twice their forward FLOPs), attention's backward (twice its forward) and the
  op's backward (logits recomputed, ``dp = dO E^T``, ``dh = dz W``: three of the forward's products),
  reading the weights once more. The optimizer step (LoRA only) and the loss (B x B) are negligible.
  ``training_memory`` adds what a step must hold: weights, adapter state (fp32 weights, gradients, two
  Adam moments), the activations each layer keeps for backward and the KV cache.

Not counted: norms, rotary, activation functions and residual adds (O(d) per position), and anything a
kernel re-reads because it does not fit on chip. ``tests/gircse/test_cost.py`` checks the counts
against ``FlopCounterMode`` and the arithmetic by hand.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .flops import DecoderShape, _count, _shape, forward_flops, soft_token_flops

__all__ = ["Call", "Machine", "encode_calls", "ideal_seconds", "lora_params", "training_calls",
           "training_memory"]


@dataclasses.dataclass(frozen=True)
class Machine:
    """What a machine sustains: ``gemm_flops`` (FLOP/s of a large matrix product in the compute dtype)
    and ``bandwidth`` (bytes/s of a large streaming read). Measure them on the machine
    (``bench/harness.py: measure_machine``); a datasheet's peaks give a lower bound on time instead."""

    name: str
    gemm_flops: float
    bandwidth: float

    def __post_init__(self):
        for field in ("gemm_flops", "bandwidth"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Machine.{field} must be a positive number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Call:
    """One kernel-level unit of work: a decoder call, an op call, or the backward of one."""

    name: str
    flops: float
    bytes: float

    def seconds(self, machine: Machine) -> float:
        return max(self.flops / machine.gemm_flops, self.bytes / machine.bandwidth)


def ideal_seconds(calls: Sequence[Call], machine: Machine) -> float:
    """The calls one after another, each bound by its FLOPs or its bytes, whichever takes longer."""
    return sum(call.seconds(machine) for call in calls)


def _check_method(method) -> None:
    if method not in ("gircse", "causal-eos"):
        raise ValueError(f"method must be 'gircse' or 'causal-eos', got {method!r}")


def _lengths(name: str, lengths) -> list[int]:
    if isinstance(lengths, int):
        lengths = [lengths]
    lengths = list(lengths)
    if not lengths:
        raise ValueError(f"{name} must hold at least one length")
    return [_count(f"{name}[{i}]", n, 1) for i, n in enumerate(lengths)]


def _attention_flops(shape: DecoderShape, rows: list[tuple[int, int]]) -> int:
    return sum(forward_flops(shape, q, keys) - 2 * shape.decoder_linear_params * q for q, keys in rows)


def _decoder_call(shape: DecoderShape, name: str, rows: list[tuple[int, int]], dtype_bytes: int,
                  adapter_flops_per_position: int = 0, backward: bool = False) -> Call:
    """A decoder call over ``rows`` = [(new positions, keys attended)], one entry per text; its backward
    with a frozen base: input gradients through the base (the forward's linear FLOPs), attention's
    backward (twice its forward: dQ, dK, dV, dP), the adapters' input and weight gradients (twice their
    forward); the same bytes (weights and KV cache read again)."""
    positions = sum(q for q, _ in rows)
    linear = 2 * shape.decoder_linear_params * positions
    adapters = adapter_flops_per_position * positions
    attention = _attention_flops(shape, rows)
    flops = linear + 2 * attention + 2 * adapters if backward else linear + attention + adapters
    kv = shape.kv_bytes_per_position(dtype_bytes)
    moved = shape.decoder_linear_params * dtype_bytes + sum(keys * kv for _, keys in rows)  # past read + new written
    return Call(f"backward {name}" if backward else name, flops, moved)


def _op_call(shape: DecoderShape, name: str, batch: int, dtype_bytes: int, backward: bool = False) -> Call:
    weights = shape.vocab_size * (shape.hidden_size + (0 if shape.tied else shape.embed_dim))
    flops = batch * soft_token_flops(shape)
    if backward:  # logits recomputed, dp = dO E^T, dh = dz W: three products of the forward's size
        flops = 3 * batch * 2 * shape.vocab_size * shape.hidden_size
    return Call(name, flops, weights * dtype_bytes)


def _chunks(values: list, size: int | None) -> list[list]:
    size = size or len(values)
    return [values[s:s + size] for s in range(0, len(values), size)]


def encode_calls(model, method: str, lengths, k: int = 5, *, dtype_bytes: int = 4, batch_size: int = 32,
                 decode_rows: int | None = None) -> list[Call]:
    """The calls of embedding texts of ``lengths`` tokens (Causal-EOS: without its EOS, which is
    added here) the way ``GIRCSE.encode`` groups them: longest first, prefills of ``batch_size`` texts,
    GIRCSE's K steps over ``decode_rows`` texts at once (None: ``batch_size``)."""
    _check_method(method)
    shape = _shape(model)
    lengths = sorted(_lengths("lengths", lengths), reverse=True)
    batch_size, k = _count("batch_size", batch_size, 1), _count("k", k, 1)
    dtype_bytes = _count("dtype_bytes", dtype_bytes, 1)
    if method == "causal-eos":
        return [_decoder_call(shape, "prefill", [(n + 1, n + 1) for n in chunk], dtype_bytes)
                for chunk in _chunks(lengths, batch_size)]
    calls = []
    for group in _chunks(lengths, max(batch_size, decode_rows or batch_size)):
        calls += [_decoder_call(shape, "prefill", [(n, n) for n in chunk], dtype_bytes)
                  for chunk in _chunks(group, batch_size)]
        for j in range(1, k + 1):
            calls.append(_op_call(shape, f"op {j}", len(group), dtype_bytes))
            calls.append(_decoder_call(shape, f"step {j}", [(1, n + j) for n in group], dtype_bytes))
    return calls


def lora_params(model, rank: int) -> int:
    """Adapter parameters of rank ``rank`` on every linear layer of the decoder (q, k, v, o, MLP):
    ``r (in + out)`` per layer."""
    shape = _shape(model)
    rank = _count("rank", rank, 1)
    d, q_dim, kv_dim, ff = (shape.hidden_size, shape.num_heads * shape.head_dim,
                            shape.num_kv_heads * shape.head_dim, shape.intermediate_size)
    per_layer = (d + q_dim) * 2 + (d + kv_dim) * 2 + (d + ff) * (3 if shape.gated_mlp else 2)
    return shape.num_layers * rank * per_layer


def training_calls(model, method: str, lengths, k: int = 5, *, lora_rank: int = 64, dtype_bytes: int = 2,
                   prefill_rows: int = 16) -> list[Call]:
    """Forward and backward calls of one contrastive micro-batch whose texts have ``lengths`` tokens
    (every text of the micro-batch: queries, positives, negatives; Causal-EOS: without its EOS), embedded
    as ``gircse train`` does: one forward, prefills of ``prefill_rows`` texts, GIRCSE's K steps on all
    texts at once; then the backward of every call, in reverse."""
    _check_method(method)
    shape = _shape(model)
    lengths = sorted(_lengths("lengths", lengths), reverse=True)
    prefill_rows, k = _count("prefill_rows", prefill_rows, 1), _count("k", k, 1)
    dtype_bytes = _count("dtype_bytes", dtype_bytes, 1)
    adapters = 2 * lora_params(shape, lora_rank)  # adapter FLOPs per position: 2 r (in + out), every linear
    eos = 1 if method == "causal-eos" else 0
    units = [("prefill", [(n + eos, n + eos) for n in chunk]) for chunk in _chunks(lengths, prefill_rows)]
    if method == "gircse":
        units += [(f"step {j}", [(1, n + j) for n in lengths]) for j in range(1, k + 1)]
    forward, backward = [], []
    for name, rows in units:
        if name.startswith("step"):
            forward.append(_op_call(shape, name.replace("step", "op"), len(rows), dtype_bytes))
            backward.append(_op_call(shape, "backward " + name.replace("step", "op"), len(rows), dtype_bytes,
                                     backward=True))
        forward.append(_decoder_call(shape, name, rows, dtype_bytes, adapters))
        backward.append(_decoder_call(shape, name, rows, dtype_bytes, adapters, backward=True))
    return forward + backward[::-1]


def training_memory(model, method: str, lengths, k: int = 5, *, lora_rank: int = 64, dtype_bytes: int = 2,
                    weight_bytes: int | None = None) -> dict[str, int]:
    """Bytes one training micro-batch must hold at its peak (see the module docstring): ``weights``
    (``weight_bytes`` per element, default ``dtype_bytes``), ``adapter_state`` (fp32 adapter weights,
    gradients and two Adam moments), ``activations`` (what the layers keep for backward at every
    position, including GIRCSE's K step positions) and ``kv_cache`` (each text's N + K positions)."""
    _check_method(method)
    shape = _shape(model)
    lengths = _lengths("lengths", lengths)
    k = _count("k", k, 1)
    positions = sum(n + (k if method == "gircse" else 1) for n in lengths)
    d, q_dim, kv_dim, ff = (shape.hidden_size, shape.num_heads * shape.head_dim,
                            shape.num_kv_heads * shape.head_dim, shape.intermediate_size)
    # kept per position and layer: the two norms' inputs and outputs (4 d), q, k, v and the attention
    # output (q_dim + 2 kv_dim + q_dim), the MLP's gate, up and activation (3 ff), the adapters' r per
    # linear layer (their A products)
    per_position_layer = 4 * d + 2 * q_dim + 2 * kv_dim + (3 if shape.gated_mlp else 2) * ff + 7 * lora_rank
    return {"weights": shape.weight_bytes(weight_bytes or dtype_bytes),
            "adapter_state": 16 * lora_params(shape, lora_rank),
            "activations": positions * shape.num_layers * per_position_layer * dtype_bytes,
            "kv_cache": positions * shape.kv_bytes_per_position(dtype_bytes)}
