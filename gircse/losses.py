"""Contrastive objectives: plain InfoNCE and the paper's Iterative Contrastive Refinement (ICR) loss.

Both compute similarities and the loss in fp32 (fp64 for fp64 input), with autocast disabled, whatever
the dtype of the embeddings: at tau = 0.02 a bf16 cosine (8 bits of mantissa, ~4e-3 relative error) becomes a ~0.1
logit error, enough to change which candidate wins.

Candidates (both losses): every positive and every hard negative in the batch, B * (1 + H) documents,
laid out as ``[p_1..p_B, n_{1,1}..n_{1,H}, n_{2,1}, ..., n_{B,H}]``; query i's target is p_i.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import as_float

__all__ = ["STEP_REDUCTIONS", "icr_loss", "info_nce", "info_nce_logits"]

STEP_REDUCTIONS = ("sum", "mean")


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: bf16/fp16 are upcast, fp64 stays fp64 (never rounded down)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def info_nce_logits(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None, *,
                    temperature: float = 0.02) -> torch.Tensor:
    """Cosine-similarity logits ``[B, B * (1 + H)]`` (fp32): queries ``[B, d]`` against positives
    ``[B, d]`` then hard negatives ``[B, H, d]`` flattened row by row."""
    if q.ndim != 2 or p.shape != q.shape:
        raise ValueError(f"queries and positives must both be [B, d]; got {tuple(q.shape)} and {tuple(p.shape)}")
    if n is not None and (n.ndim != 3 or n.shape[0] != q.shape[0] or n.shape[2] != q.shape[1]):
        raise ValueError(f"hard negatives must be [B, H, d] = [{q.shape[0]}, H, {q.shape[1]}]; got {tuple(n.shape)}")
    temperature = as_float("temperature", temperature, above=0)
    with torch.autocast(q.device.type, enabled=False):
        docs = _fp32(p)
        if n is not None and n.shape[1] > 0:
            docs = torch.cat([docs, _fp32(n).reshape(-1, n.shape[-1])], dim=0)
        qn = F.normalize(_fp32(q), dim=-1)
        dn = F.normalize(docs, dim=-1)
        return qn @ dn.T / temperature


def info_nce(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None, *,
             temperature: float = 0.02) -> torch.Tensor:
    """Plain InfoNCE (mean over the batch) with in-batch and hard negatives; fp32 scalar."""
    logits = info_nce_logits(q, p, n, temperature=temperature)
    target = torch.arange(q.shape[0], device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        return F.cross_entropy(logits, target)


def icr_loss(q_steps: torch.Tensor, p_steps: torch.Tensor, n_steps: torch.Tensor | None = None, *,
             temperature: float = 0.02, lam: float = 1.0, step_reduction: str = "sum"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Iterative Contrastive Refinement loss.

    Args:
        q_steps: query embeddings after each generation step, ``[B, K, d]`` (z_1..z_K).
        p_steps: positives, ``[B, K, d]``.
        n_steps: hard negatives, ``[B, H, K, d]``, or None (in-batch negatives only).
        temperature: tau of the cosine-similarity logits.
        lam: weight of the refinement regularizer.
        step_reduction: how the K step losses combine: "sum" (the paper's Eq. 7) or "mean" (the
            authors' released code), which weighs the regularizer K times more against them.

    For every step k: ``L_k`` = InfoNCE of ``q[:, k]`` against all ``B * (1 + H)`` documents at
    step k (mean over the batch). ``total = reduce_k L_k + lam * mean_{k<K} max(log L_{k+1} - log L_k, 0)``
    (the regularizer penalizes any step whose loss is higher than the previous step's; it is 0 for K=1).

    Returns ``(total, per_step)``: fp32 scalar and the ``[K]`` values L_k (with graph; detach to log).
    """
    if q_steps.ndim != 3 or p_steps.shape != q_steps.shape:
        raise ValueError(f"q_steps and p_steps must both be [B, K, d]; got {tuple(q_steps.shape)} and "
                         f"{tuple(p_steps.shape)}")
    lam = as_float("lam", lam, minimum=0)
    if step_reduction not in STEP_REDUCTIONS:
        raise ValueError(f"step_reduction must be one of {STEP_REDUCTIONS}, got {step_reduction!r}")
    batch, k_steps, dim = q_steps.shape
    if n_steps is not None and (n_steps.ndim != 4 or n_steps.shape[0] != batch or n_steps.shape[2:] != (k_steps, dim)):
        raise ValueError(f"n_steps must be [B, H, K, d] = [{batch}, H, {k_steps}, {dim}]; got {tuple(n_steps.shape)}")
    per_step = torch.stack([
        info_nce(q_steps[:, k], p_steps[:, k], None if n_steps is None else n_steps[:, :, k],
                 temperature=temperature)
        for k in range(k_steps)])
    total = per_step.sum() if step_reduction == "sum" else per_step.mean()
    if k_steps > 1 and lam != 0:
        log_l = per_step.log()
        total = total + lam * torch.relu(log_l[1:] - log_l[:-1]).mean()
    return total, per_step
