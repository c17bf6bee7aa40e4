"""The Triton backend's entry points, ``forward`` and ``backward`` (the backend contract of
``gircse_kernels.autograd``), and the launchers that pick a path and run the phase modules' plans.

Per call ``config_for`` picks one ``OpConfig`` (``config.choose_config``): a "gemm" configuration runs the
vocabulary-chunked GEMM path (``gemm_path``); otherwise the fused kernels run, the forward's partials and
combine (``forward``) and, for the backward, the dh kernel (``backward_dh``) and / or the vocabulary-tile
kernel (``backward_tiles``, with dh folded in while its partials fit the budget). ``forward_launches`` /
``backward_launches`` return every launch of a call without running it: the roofline model and
``bench/gpu_check`` plan from them. Shapes and strides are checked here (a unit last stride for
``hidden``; W and E any 2-D strides).

Memory and streams: every buffer (partials, outputs) is allocated per call from PyTorch's caching
allocator on the tensors' device, inside ``torch.cuda.device(hidden.device)``: stream-ordered, so
two streams never share scratch, and under CUDA-graph capture the allocations come from the graph's
private pool and stay valid for every replay. No host synchronization anywhere in the launch path.
"""
from __future__ import annotations

import contextlib

import torch

from .backward_dh import backward_hidden_plan
from .backward_tiles import backward_tiles_plan
from .config import OpConfig, choose_config, num_sms
from .forward import forward_plan
from .gemm_path import gemm_backward, gemm_forward
from .launch import Launch, interpreting


def _check_layout(hidden, lm_head_weight, embed_weight):
    if hidden.dim() != 2 or hidden.stride(1) != 1:
        raise ValueError(f"triton backend: hidden must be 2-D with unit last stride, got strides {hidden.stride()}")
    for name, t in (("lm_head_weight", lm_head_weight), ("embed_weight", embed_weight)):
        if t.dim() != 2:
            raise ValueError(f"triton backend: {name} must be 2-D, got shape {tuple(t.shape)}")


def _device_guard(t: torch.Tensor):
    """Launch on the tensors' GPU, whatever the current device is."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def config_for(hidden, lm_head_weight, embed_weight, *, batch_invariant=False, num_splits=None, sms=None) -> OpConfig:
    """The configuration of a call (``sms`` overrides the device's SM count: the roofline model)."""
    return choose_config(hidden.shape[0], lm_head_weight.shape[0], lm_head_weight.shape[1], embed_weight.shape[1],
                         hidden.dtype, sms or num_sms(hidden.device), batch_invariant=bool(batch_invariant),
                         num_splits=num_splits)


def _row_groups(cfg: OpConfig):
    for start in range(0, cfg.rows, cfg.row_group):
        yield slice(start, min(cfg.rows, start + cfg.row_group))


def forward_launches(hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse, *, temperature, softcap, tied,
                     batch_invariant=False, num_splits=None, upcast=None, sms=None) -> list[Launch]:
    """Every launch of one forward call of the fused kernels (row groups included), writing ``out32`` and
    ``lse``. (A "gemm" configuration runs ``gemm_forward`` instead.)"""
    cfg = config_for(hidden, lm_head_weight, embed_weight, batch_invariant=batch_invariant, num_splits=num_splits,
                     sms=sms)
    if cfg.kind == "gemm":
        raise ValueError("forward_launches: this shape takes the vocabulary-chunked GEMM path")
    upcast = interpreting() if upcast is None else upcast
    launches = []
    for rs in _row_groups(cfg):
        launches += forward_plan(cfg, hidden[rs], lm_head_weight, embed_weight, lm_head_bias, out32[rs], lse[rs],
                                 temperature=temperature, softcap=softcap, tied=tied, upcast=upcast)
    return launches


def backward_launches(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, *, temperature,
                      softcap, tied, need_hidden, need_weight, need_embed, need_bias, merge_tied_grads,
                      grad_filter_eps, batch_invariant=False, num_splits=None, upcast=None, sms=None):
    """Every launch of one backward call and the buffers they fill: ``dh`` (hidden's dtype), ``dw`` /
    ``de`` (the weights' dtype, or fp32 rows to cast), ``db`` (the bias's dtype). Fused kernels only."""
    cfg = config_for(hidden, lm_head_weight, embed_weight, batch_invariant=batch_invariant, num_splits=num_splits,
                     sms=sms)
    if cfg.kind == "gemm":
        raise ValueError("backward_launches: this shape takes the vocabulary-chunked GEMM path")
    need_weights = need_weight or need_embed or need_bias
    fold = need_hidden and need_weights and cfg.fold_backward
    common = dict(temperature=temperature, softcap=softcap, tied=tied, grad_filter_eps=grad_filter_eps,
                  upcast=interpreting() if upcast is None else upcast)
    launches, bufs = [], {}
    if need_hidden and not fold:
        bufs["dh"] = torch.empty_like(hidden)
        for rs in _row_groups(cfg):
            launches += backward_hidden_plan(cfg, grad_out[rs], hidden[rs], lm_head_weight, embed_weight,
                                             lm_head_bias, lse[rs], delta[rs], bufs["dh"][rs], **common)
    if need_weights:
        tile_launches, tile_bufs = backward_tiles_plan(
            cfg, grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, need_hidden=fold,
            need_weight=need_weight, need_embed=need_embed, need_bias=need_bias,
            merge_tied_grads=merge_tied_grads and need_weight and need_embed, **common)
        launches += tile_launches
        bufs.update(tile_bufs)
    return launches, bufs


def forward(hidden, lm_head_weight, embed_weight, lm_head_bias, *, temperature, softcap, tied=False,
            batch_invariant=False, num_splits=None):
    _check_layout(hidden, lm_head_weight, embed_weight)
    cfg = config_for(hidden, lm_head_weight, embed_weight, batch_invariant=batch_invariant, num_splits=num_splits)
    with _device_guard(hidden):
        out32 = torch.empty(hidden.shape[0], embed_weight.shape[1], dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        if cfg.kind == "gemm":
            gemm_forward(cfg, hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse,
                         temperature=temperature, softcap=softcap)
            return out32, lse
        for launch in forward_launches(hidden, lm_head_weight, embed_weight, lm_head_bias, out32, lse,
                                       temperature=temperature, softcap=softcap, tied=tied,
                                       batch_invariant=batch_invariant, num_splits=num_splits):
            launch()
    return out32, lse


def backward(grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, *, temperature,
             softcap, tied=False, need_hidden=True, need_weight=False, need_embed=False, need_bias=False,
             merge_tied_grads=False, grad_filter_eps=0.0, batch_invariant=False, num_splits=None):
    _check_layout(hidden, lm_head_weight, embed_weight)
    with _device_guard(hidden):
        grad_out = grad_out.to(embed_weight.dtype).contiguous()
        lse, delta = lse.float().contiguous(), delta.float().contiguous()
        cfg = config_for(hidden, lm_head_weight, embed_weight, batch_invariant=batch_invariant, num_splits=num_splits)
        if cfg.kind == "gemm":
            bufs = gemm_backward(
                cfg, grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta,
                temperature=temperature, softcap=softcap, need_hidden=need_hidden, need_weight=need_weight,
                need_embed=need_embed, need_bias=need_bias,
                merge_tied_grads=merge_tied_grads and need_weight and need_embed)
            return bufs.get("dh"), bufs.get("dw"), bufs.get("de"), bufs.get("db")
        launches, bufs = backward_launches(
            grad_out, hidden, lm_head_weight, embed_weight, lm_head_bias, lse, delta, temperature=temperature,
            softcap=softcap, tied=tied, need_hidden=need_hidden, need_weight=need_weight, need_embed=need_embed,
            need_bias=need_bias, merge_tied_grads=merge_tied_grads, grad_filter_eps=grad_filter_eps,
            batch_invariant=batch_invariant, num_splits=num_splits)
        for launch in launches:
            launch()
        d_weight = bufs["dw"].to(lm_head_weight.dtype) if "dw" in bufs else None
        d_embed = bufs["de"].to(embed_weight.dtype) if "de" in bufs else None
    return bufs.get("dh"), d_weight, d_embed, bufs.get("db")
