"""The one autograd path of the op: two ``torch.library`` custom ops and their autograd formula.

``gircse::soft_token_embedding`` (forward) and ``gircse::soft_token_embedding_backward`` are opaque
to ``torch.compile`` (each has a fake implementation for tracing), so a compiled model that calls the
op traces without graph breaks whichever backend runs it, and the backward is traced into the
compiled backward graph. Everything that must look at real storage (are W and E the same memory?
which backend does "auto" mean on this machine?) happens inside the ops, never in traced code.

A backend is a module with

``forward(hidden, lm_head_weight, embed_weight, lm_head_bias, *, temperature, softcap, tied, batch_invariant)``
    ``hidden`` is 2-D [B, d] with a unit last stride; ``lm_head_weight`` [V, d] and ``embed_weight``
    [V, d_e] may have any strides (the dispatcher never copies them); ``lm_head_bias`` is a
    contiguous [V] or None and may hold -inf (a vocabulary mask). All inputs share one dtype.
    Returns ``(out32, lse)``: the output [B, d_e] in fp32 and the per-row logsumexp [B] (fp32) of
    the final logits z (after temperature and softcap). Nothing of size B*V may be allocated.
    ``tied``: W and E are the same memory with the same layout (a backend may read it once).
    ``batch_invariant``: a row's result must not depend on the batch size (nor on the GPU).

``backward(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, *, temperature,
softcap, tied, need_hidden, need_weight, need_embed, need_bias, merge_tied_grads, grad_filter_eps,
batch_invariant)``
    ``delta[i] = <grad_out[i], out32[i]>`` (fp32). Recomputes p = exp(z - lse) tile by tile and
    returns ``(d_hidden, d_lm_head_weight, d_embed_weight, d_lm_head_bias)`` in the inputs' dtypes,
    None where not needed. With ``merge_tied_grads`` (the same tensor passed as both weights) the
    sum of both weight gradients is returned as ``d_lm_head_weight`` and ``d_embed_weight`` is None.

Math of the backward, with p = softmax(z) and O = p E:
    dp_j = <dO, E_j>,  dz_j = p_j (dp_j - delta),  delta = <dO, O>
    d raw logit = dz * (1 - tanh^2) / temperature      (softcap chain rule; 1 without softcap)
    d hidden = draw @ W,  dW = draw^T @ hidden,  db = sum_rows draw,  dE = p^T @ dO

The op is differentiable once: its backward is a fused kernel with no formula of its own, so a
double backward (``create_graph=True`` followed by another backward) raises a clear error instead
of returning a silently wrong or missing second derivative.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .backends import resolve_backend

__all__ = ["same_storage", "soft_token_embedding_op", "soft_token_embedding_backward_op"]


def same_storage(a: Tensor, b: Tensor) -> bool:
    """True when two weight tensors are one matrix in memory (tied LM head and input embeddings).

    Reads storage pointers: called only inside the custom ops, on real tensors, never in traced code.
    """
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    )


def _backend_module(backend: str, device: torch.device):
    return resolve_backend(backend, device)[1]


@torch.library.custom_op("gircse::soft_token_embedding", mutates_args=())
def soft_token_embedding_op(
    hidden: Tensor, lm_head_weight: Tensor, embed_weight: Tensor, lm_head_bias: Optional[Tensor],
    temperature: float, softcap: Optional[float], backend: str, batch_invariant: bool,
    grad_filter_eps: float, weights_are_one_tensor: bool,
) -> tuple[Tensor, Tensor]:
    """``(out32 [B, d_e] fp32, lse [B] fp32)``. ``grad_filter_eps`` and ``weights_are_one_tensor``
    (the very same tensor object passed as W and E, known to the caller) only matter to the backward."""
    module = _backend_module(backend, hidden.device)
    # Autocast stays enabled below a custom op's dispatch: switch it off so a backend built from
    # torch ops computes in the dtype the dispatcher chose, not in whatever autocast would pick.
    with torch.autocast(hidden.device.type, enabled=False):
        return module.forward(hidden, lm_head_weight, embed_weight, lm_head_bias, temperature=temperature,
                              softcap=softcap, tied=same_storage(lm_head_weight, embed_weight),
                              batch_invariant=batch_invariant)


@soft_token_embedding_op.register_fake
def _(hidden, lm_head_weight, embed_weight, lm_head_bias, temperature, softcap, backend, batch_invariant,
      grad_filter_eps, weights_are_one_tensor):
    rows = hidden.shape[0]
    return (hidden.new_empty((rows, embed_weight.shape[1]), dtype=torch.float32),
            hidden.new_empty((rows,), dtype=torch.float32))


@torch.library.custom_op("gircse::soft_token_embedding_backward", mutates_args=())
def soft_token_embedding_backward_op(
    grad_out: Tensor, hidden: Tensor, lm_head_weight: Tensor, embed_weight: Tensor,
    lm_head_bias: Optional[Tensor], out32: Tensor, lse: Tensor, temperature: float, softcap: Optional[float],
    backend: str, batch_invariant: bool, grad_filter_eps: float, needs: Sequence[bool], merge_tied_grads: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (hidden, W, E, bias); a gradient that is not needed comes back as an empty tensor
    (custom ops cannot return None)."""
    module = _backend_module(backend, hidden.device)
    need_hidden, need_weight, need_embed, need_bias = needs
    with torch.autocast(hidden.device.type, enabled=False):
        if batch_invariant:
            # A row's delta must not depend on how the reduction kernel tiles [B, d_e] (it may on GPU):
            # fp64 accumulation leaves order effects far below the final fp32 rounding.
            delta = (grad_out.double() * out32.double()).sum(dim=-1).float()
        else:
            delta = (grad_out.float() * out32).sum(dim=-1)
        grads = module.backward(
            grad_out.contiguous(), hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta,
            temperature=temperature, softcap=softcap, tied=same_storage(lm_head_weight, embed_weight),
            need_hidden=need_hidden, need_weight=need_weight, need_embed=need_embed,
            need_bias=need_bias and lm_head_bias is not None, merge_tied_grads=merge_tied_grads,
            grad_filter_eps=grad_filter_eps, batch_invariant=batch_invariant,
        )
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


def _needed_grad_shapes(hidden, lm_head_weight, embed_weight, lm_head_bias, needs, merge_tied_grads):
    """The (tensor whose shape/dtype the gradient has, or None) per input, as the backward returns them."""
    need_hidden, need_weight, need_embed, need_bias = needs
    return (hidden if need_hidden else None,
            lm_head_weight if need_weight else None,
            embed_weight if need_embed and not merge_tied_grads else None,
            lm_head_bias if need_bias and lm_head_bias is not None else None)


@soft_token_embedding_backward_op.register_fake
def _(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse, temperature, softcap, backend,
      batch_invariant, grad_filter_eps, needs, merge_tied_grads):
    like = _needed_grad_shapes(hidden, lm_head_weight, embed_weight, lm_head_bias, needs, merge_tied_grads)
    return tuple(hidden.new_empty(0) if t is None else torch.empty_like(t) for t in like)


def _setup_context(ctx, inputs, output):
    (hidden, lm_head_weight, embed_weight, lm_head_bias, temperature, softcap, backend, batch_invariant,
     grad_filter_eps, weights_are_one_tensor) = inputs
    out32, lse = output
    ctx.save_for_backward(hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse)
    ctx.params = (temperature, softcap, backend, batch_invariant, grad_filter_eps)
    ctx.weights_are_one_tensor = weights_are_one_tensor
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out32, _grad_lse):
    hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse = ctx.saved_tensors
    temperature, softcap, backend, batch_invariant, grad_filter_eps = ctx.params
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    # Autograd sums the gradients of the two weight arguments itself when the very same tensor was
    # passed twice: the backend then returns their sum once (one pass over the tied matrix).
    merge = ctx.weights_are_one_tensor and needs[1] and needs[2]
    grads = soft_token_embedding_backward_op(grad_out32, hidden, lm_head_weight, embed_weight, lm_head_bias, out32,
                                             lse, temperature, softcap, backend, batch_invariant, grad_filter_eps,
                                             needs, merge)
    like = _needed_grad_shapes(hidden, lm_head_weight, embed_weight, lm_head_bias, needs, merge)
    grads = [g if t is not None else None for g, t in zip(grads, like)]
    return (*grads, None, None, None, None, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "gircse_kernels.soft_token_embedding is differentiable once: its backward is a fused kernel without "
        "a derivative of its own, so double backward (create_graph=True, then differentiating the gradients) "
        "is not supported. Use gircse_kernels.reference.soft_token_embedding for higher-order derivatives."
    )


soft_token_embedding_op.register_autograd(_backward, setup_context=_setup_context)
soft_token_embedding_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# FLOP formulas, so torch.utils.flop_counter.FlopCounterMode (MFU accounting in users' training
# loops) sees the op's matmuls, which are hidden inside the custom ops. As for SDPA's formulas: the
# matmuls the math needs, not the backward's recomputation of the logits (an implementation choice).
@register_flop_formula(torch.ops.gircse.soft_token_embedding)
def _forward_flops(hidden_shape, weight_shape, embed_shape, *args, out_shape=None, **kwargs) -> int:
    rows, vocab = hidden_shape[0], weight_shape[0]
    return 2 * rows * vocab * (hidden_shape[1] + embed_shape[1])  # z = h W^T, O = p E


@register_flop_formula(torch.ops.gircse.soft_token_embedding_backward)
def _backward_flops(grad_out_shape, hidden_shape, weight_shape, embed_shape, bias_shape, out_shape_, lse_shape,
                    temperature, softcap, backend, batch_invariant, grad_filter_eps, needs, merge_tied_grads,
                    out_shape=None, **kwargs) -> int:
    need_hidden, need_weight, need_embed, need_bias = needs
    rows, vocab, width, embed_width = hidden_shape[0], weight_shape[0], hidden_shape[1], embed_shape[1]
    flops = 0
    if need_hidden or need_weight or need_bias:
        flops += 2 * rows * vocab * embed_width  # dp = dO E^T
    flops += 2 * rows * vocab * width * (int(need_hidden) + int(need_weight))  # dh = dz W, dW = dz^T h
    flops += 2 * rows * vocab * embed_width * int(need_embed)  # dE = p^T dO
    return flops
