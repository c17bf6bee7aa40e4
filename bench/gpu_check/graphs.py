"""CUDA-graph checks: what a user would capture -- the whole no-grad ``generate_soft_tokens(..., capturable=True)``
and the op's K-step soft-token loop -- captured once, replayed on new inputs, compared with eager.

Each check is built from two steps it is given, so its logic also runs on CPU: ``capture(fn)`` returns a
``replay()`` that reruns the captured work on whatever the static input buffers hold and returns the
static outputs (``cuda_graph_capture``; on CPU ``rerun_capture``, a stand-in that captures nothing and
calls ``fn`` again), and ``no_host_sync()`` wraps one eager run (on CUDA
``torch.cuda.set_sync_debug_mode("error")``: any host synchronization raises; on CPU nothing is checked).
"""
from __future__ import annotations

import contextlib

REPLAY_RTOL = 1e-2  # replay vs eager: bf16 round-off at most (the captured kernels are the eager ones)


def cuda_graph_capture(fn):
    """Capture ``fn()`` in a CUDA graph after a warm-up on a side stream; ``replay()`` returns its static outputs."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up: compiles and allocates outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()

    def replay():
        graph.replay()
        return static_out
    replay.graph = graph
    return replay


def rerun_capture(fn):
    """The CPU stand-in for ``cuda_graph_capture``: nothing is captured; ``replay()`` calls ``fn`` again."""
    return fn


@contextlib.contextmanager
def cuda_no_host_sync():
    import torch

    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _backend(device) -> str:
    """The Triton backend on CUDA and under the interpreter; elsewhere "auto" (the checks' logic only)."""
    from gircse_kernels.triton.launch import interpreting

    return "triton" if device == "cuda" or interpreting() else "auto"


def steps_for(device):
    """(capture, no_host_sync, what the report says of each) for ``device``."""
    if device == "cuda":
        return cuda_graph_capture, cuda_no_host_sync, "CUDA graph", "none (sync debug mode 'error')"
    return rerun_capture, contextlib.nullcontext, "none: CPU stand-in that reruns the eager function", "not checked (CPU)"


def _compare_replays(replay, eager, set_inputs, fresh_inputs) -> tuple[bool, list[dict]]:
    """For each input of ``fresh_inputs``: copy it into the static buffers, replay, compare with eager on
    the same input. A replay must equal eager to round-off and change when its input changes."""
    import torch

    results, previous = [], None
    for inputs in fresh_inputs:
        set_inputs(inputs)
        got = replay().clone()
        want = eager(inputs)
        scale = want.abs().max().item() or 1.0
        diff = (got.float() - want.float()).abs().max().item()
        changed = previous is None or not torch.equal(got, previous)
        results.append(dict(max_abs_diff=diff, bit_equal=bool(torch.equal(got, want)), input_changed_output=changed,
                            ok=bool(diff <= REPLAY_RTOL * scale and changed)))
        previous = got
    return all(r["ok"] for r in results), results


def generation_check(device, *, small, k=4, rows=3, length=7, capture=None, no_host_sync=None) -> dict:
    """The whole no-grad ``generate_soft_tokens(..., capturable=True)`` of a small random Llama (SDPA, left
    padding of varying length) captured once and replayed on new input ids and masks; one eager run
    under ``no_host_sync``; the capturable path against the default path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gircse.generation import check_left_padded, generate_soft_tokens, soft_token_embedding_of

    default_capture, default_guard, capture_name, sync_name = steps_for(device)
    capture, no_host_sync = capture or default_capture, no_host_sync or default_guard
    vocab = 512 if small else 49152
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.2, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    head = soft_token_embedding_of(model, backend=_backend(device))
    gen = torch.Generator(device="cpu").manual_seed(1)

    def inputs(pads):
        ids = torch.randint(3, vocab, (rows, length), generator=gen).to(device)
        mask = torch.ones(rows, length, dtype=torch.long)
        for row, pad in enumerate(pads):
            mask[row, :pad] = 0
        return ids, mask.to(device)

    static_ids, static_mask = inputs((0, 2, 5))
    check_left_padded(static_mask)  # the caller's one check, outside anything captured

    def generate(ids=None, mask=None):
        return generate_soft_tokens(model, head, static_ids if ids is None else ids,
                                    static_mask if mask is None else mask, k, capturable=True)

    with torch.no_grad():
        with no_host_sync():
            first = generate()
        default_path = generate_soft_tokens(model, head, static_ids, static_mask, k)
        default_diff = (first.float() - default_path.float()).abs().max().item()
        replay = capture(generate)

        def set_inputs(pair):
            static_ids.copy_(pair[0])
            static_mask.copy_(pair[1])
        ok, replays = _compare_replays(replay, lambda pair: generate(*pair), set_inputs,
                                       [inputs((1, 0, 3)), inputs((4, 0, 0))])
    default_ok = default_diff <= REPLAY_RTOL * (default_path.abs().max().item() or 1.0)
    return dict(name="generate_soft_tokens(capturable=True), whole no-grad call", k=k, rows=rows, vocab=vocab,
                capture=capture_name, sync_check=sync_name, replays=replays, default_path_max_abs_diff=default_diff,
                ok=bool(ok and default_ok))


def op_loop_check(device, shape, *, k=5, rows=4, capture=None, no_host_sync=None) -> dict:
    """The op's K-step soft-token loop (h_{j+1} = tanh(d_j A): a stand-in decoder) captured in one graph and
    replayed on new inputs."""
    import torch

    from gircse_kernels import soft_token_embedding

    from .oracle import make_inputs

    default_capture, default_guard, capture_name, sync_name = steps_for(device)
    capture, no_host_sync = capture or default_capture, no_host_sync or default_guard
    vocab, d, de, tied = shape
    de = d if tied else de
    dtype, backend = torch.bfloat16, _backend(device)
    _, w, e, b = make_inputs(vocab, d, de, dtype, device, rows=rows, tied=tied, bias=True)
    mix = torch.randn(de, d, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(3))
    mix = mix * (3.0 / de ** 0.5)

    def loop(h):
        outs = []
        for _ in range(k):
            soft = soft_token_embedding(h, w, e, b, backend=backend)
            h = torch.tanh(soft @ mix) * d ** 0.5
            outs.append(soft)
        return torch.stack(outs)

    def fresh(seed):
        return torch.randn(rows, d, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(seed))

    static_h = fresh(0)
    with torch.no_grad():
        with no_host_sync():
            loop(static_h)
        replay = capture(lambda: loop(static_h))
        ok, replays = _compare_replays(replay, loop, static_h.copy_, [fresh(1), fresh(2)])
    return dict(name="op K-step loop", k=k, rows=rows, capture=capture_name, sync_check=sync_name, replays=replays,
                ok=ok)
