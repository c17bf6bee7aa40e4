"""Gradient filtering (as in Cut Cross-Entropy): its semantics and its error bound.

With ``grad_filter_eps = eps > 0`` a backend may skip, in the backward, every (row block, vocabulary
tile) whose probabilities are *all* below ``eps``. Row blocks are the backend's (16-128 rows, a pass
of rows, or the whole batch), so a column can be skipped for row i whenever ``p_ij < eps``, even if
another block's rows give it more: for row i the dropped probability mass is at most
``m_i = sum_{j : p_ij < eps} p_ij``, whatever the blocking. Writing ``g_i = |dO_i|`` (L2),
``E* = max_j |E_j|``, ``W* = max_j |W_j|``, the dropped raw-logit gradient obeys
``|dz_ij| <= 2 p_ij g_i E* / T`` (since ``|dp_j| <= g_i E*`` and ``|delta_i| <= g_i E*``; the
softcap factor is <= 1), hence, elementwise:

    |d hidden_i error|  <= 2 m_i g_i E* W* / T
    |d W_j error|       <= 2 eps E* / T * sum_i g_i |h_i|
    |d E_j error|       <= eps * sum_i g_i
    |d b_j error|       <= 2 eps E* / T * sum_i g_i

When the distributions are peaked (trained LMs, bf16) most tiles are skipped and the error is far
below bf16 resolution; with ``eps = 0`` (the default) nothing is skipped and gradients are exact.
"""
from __future__ import annotations

import torch


def gradient_filter_bound(hidden, lm_head_weight, embed_weight, lm_head_bias, grad_out, *, eps,
                          temperature=1.0, softcap=None) -> dict[str, float]:
    """The bounds above (max over entries) for concrete inputs; materializes [B, V]: for tests only."""
    h, w, e = hidden.double(), lm_head_weight.double(), embed_weight.double()
    z = h @ w.T
    if lm_head_bias is not None:
        z = z + lm_head_bias.double()
    z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    p = torch.softmax(z, -1)
    mass = (p * (p < eps)).sum(dim=1)  # per row: a block of rows may skip any column where p_ij < eps
    g = grad_out.double().norm(dim=-1)
    e_max, w_max = e.norm(dim=-1).max(), w.norm(dim=-1).max()
    return {
        "hidden": (2 * mass * g * e_max * w_max / temperature).max().item(),
        "lm_head_weight": (2 * eps * e_max / temperature * (g * h.norm(dim=-1)).sum()).item(),
        "embed_weight": (eps * g.sum()).item(),
        "lm_head_bias": (2 * eps * e_max / temperature * g.sum()).item(),
    }
