"""Cross-rank pieces for ``torchrun`` data parallelism (any backend; CPU tests use gloo).

The trainer does not wrap the model in ``DistributedDataParallel``: soft-token generation calls the
backbone directly (``generate_soft_tokens`` -> ``decoder_of(model)``), which would bypass DDP's forward
hooks. Instead every rank

1. embeds its own rows,
2. all-gathers the embeddings with ``all_gather_with_grad`` so every rank computes the *same* loss
   over the global batch (negatives span all ranks),
3. backpropagates: the gather's backward hands each rank the gradient of its own slice,
4. sums the parameter gradients over ranks (``all_reduce_gradients``).

Step 3 gives rank r the part of dL/dtheta that flows through its rows; summing over ranks gives
exactly the gradient of the global-batch loss of a single process (the test proves it).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["all_gather_with_grad", "all_reduce_gradients", "is_distributed", "rank", "setup_from_env", "world_size"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def setup_from_env(backend: str | None = None, timeout=None) -> bool:
    """Initialize the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).
    ``timeout``: a ``datetime.timedelta`` for collectives (torch's default when None).
    Returns True when this call initialized it (the caller should destroy it)."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, **({} if timeout is None else {"timeout": timeout}))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.size = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        # Every rank computes the same loss from the gathered tensor, so the gradient of the local
        # slice is already complete here; no communication (the parameter gradients are summed later).
        start = ctx.rank * ctx.size
        return grad[start:start + ctx.size]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) over ranks along dim 0, in rank order;
    gradients flow back to the local slice. Identity without a process group."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    return _AllGather.apply(x)


def all_reduce_gradients(parameters) -> None:
    """Sum ``.grad`` over ranks (one flat buffer, one collective)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
