"""Deliberately broken variants of the Triton backend (``--canary``): the correctness section must catch each.

Each canary breaks the real path -- the kernels the section checks, on the GPU the compiled ones -- by
wrapping its host side, never by editing a kernel: ``Launch.__call__`` (every kernel launch, the GEMM
path's included) or the backend's ``forward`` / ``backward``. The launches keep their arguments'
specializations, so no canary compiles a kernel the real run has not compiled.
"""
from __future__ import annotations

import contextlib
import dataclasses

# The GEMM path's chunks are cuBLAS products around Triton kernels that take the logits as a tensor:
# this many leading logits of the first chunk are set to -inf (the fused kernels drop one BLOCK_V tile).
GEMM_DROPPED_ROWS = 64
SPLIT_SCALE = 1.1
LSE_SHIFT = 0.05
FUSED_KERNELS = ("forward_partials", "backward_hidden", "backward_tiles")


@contextlib.contextmanager
def _launches_through(broken):
    """Every ``Launch`` runs as ``broken(launch, run)``, with ``run(launch)`` the real launch."""
    from gircse_kernels.triton.launch import Launch

    real = Launch.__call__
    Launch.__call__ = lambda self: broken(self, real)
    try:
        yield
    finally:
        Launch.__call__ = real


@contextlib.contextmanager
def _replaced(module, name, replacement):
    real = getattr(module, name)
    setattr(module, name, replacement(real))
    try:
        yield
    finally:
        setattr(module, name, real)


def drop_tile():
    """The fused kernels are told the vocabulary is one BLOCK_V tile shorter (its last rows are never read,
    and their gradient rows never written); the GEMM path's first chunk loses its first 64 logits."""
    def broken(launch, run):
        if launch.name in FUSED_KERNELS:
            shorter = max(1, launch.args["V"] - launch.constexprs["BLOCK_V"])
            return run(dataclasses.replace(launch, args=dict(launch.args, V=shorter)))
        if launch.name in ("chunk_softmax", "chunk_grad") and launch.args["v0"] == 0:
            launch.args["z_ptr"][:, :GEMM_DROPPED_ROWS] = float("-inf")
        return run(launch)
    return _launches_through(broken)


def split_scale():
    """The first half of the vocabulary splits weighs 1.1x: their partial sums and accumulators before the
    forward's combine, their dh partials before the split sum; on the GEMM path the first chunk's p, its
    share of the softmax sum, and its dz."""
    def broken(launch, run):
        args = launch.args
        if launch.name == "combine":
            first_half = -(-args["S"] // 2) * args["B"]
            args["part_acc_ptr"][:first_half] *= SPLIT_SCALE
            args["part_sum_ptr"][:first_half] *= SPLIT_SCALE
        elif launch.name == "sum_splits":
            args["part_ptr"][: -(-args["part_ptr"].shape[0] // 2)] *= SPLIT_SCALE
        elif launch.name == "chunk_softmax" and args["v0"] == 0:
            before = args["l_ptr"].clone()
            run(launch)
            chunk_sum = args["l_ptr"] - before * args["alpha_ptr"]
            args["l_ptr"].add_(chunk_sum, alpha=SPLIT_SCALE - 1)
            args["p_ptr"].mul_(SPLIT_SCALE)
            return None
        elif launch.name == "chunk_grad" and args["v0"] == 0:
            run(launch)
            args["dz_ptr"].mul_(SPLIT_SCALE)
            return None
        return run(launch)
    return _launches_through(broken)


def zero_dw():
    """The gradient through the logits, dz^T h, is left out of the LM-head weight's gradient: zero when
    untied; tied, only the embedding part p^T dO remains (the issue's "all-zero dW" on tied models)."""
    from gircse_kernels.triton import host

    def wrap(real):
        def backward(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, **kw):
            dh, dw, de, db = real(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, **kw)
            if dw is None:
                return dh, dw, de, db
            if kw.get("merge_tied_grads") and kw.get("need_embed"):
                p = _probabilities(hidden, lm_head_weight, lm_head_bias, lse, kw["temperature"], kw["softcap"])
                return dh, (p.T @ grad_out.float()).to(dw.dtype), de, db
            return dh, dw.new_zeros(dw.shape), de, db
        return backward
    return _replaced(host, "backward", wrap)


def wrong_lse():
    """The forward saves a log-sum-exp 0.05 too large (the backward's p = exp(z - lse) comes out 5% small)."""
    from gircse_kernels.triton import host

    def wrap(real):
        def forward(*args, **kw):
            out32, lse = real(*args, **kw)
            return out32, lse + LSE_SHIFT
        return forward
    return _replaced(host, "forward", wrap)


def _probabilities(hidden, weight, bias, lse, temperature, softcap):
    """p = exp(z - lse) in fp32, z as the kernels compute it (bias, temperature, softcap)."""
    import torch

    z = hidden.float() @ weight.float().T
    if bias is not None:
        z = z + bias.float()
    z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.exp(z - lse[:, None])


CANARIES = {
    "drop-tile": drop_tile,
    "split-scale": split_scale,
    "zero-dw": zero_dw,
    "wrong-lse": wrong_lse,
}


def descriptions() -> dict:
    return {name: " ".join(make.__doc__.split()) for name, make in CANARIES.items()}
