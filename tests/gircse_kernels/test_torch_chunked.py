import functools

import pytest
import torch

from gircse_kernels import soft_token_embedding
from tests.gircse_kernels.op_cases import GRID, Case, check_backward, check_forward, make_inputs

op = functools.partial(soft_token_embedding, backend="torch")


@pytest.mark.parametrize("case", GRID, ids=str)
def test_forward_matches_reference(case):
    check_forward(op, case)


@pytest.mark.parametrize("case", [c for c in GRID if c.vocab * c.d <= 1_000_000], ids=str)
def test_backward_matches_reference(case):
    check_backward(op, case)


def test_chunk_boundaries_do_not_matter():
    from gircse_kernels import torch_chunked

    h, w, e, b = make_inputs(Case(lead=(5,), vocab=101, d=12, bias=True))
    outs = [torch_chunked.forward(h, w, e, b, temperature=1.0, softcap=None, chunk_size=c)[0]
            for c in (1, 7, 50, 101)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-6)


def test_grad_filter_error_within_documented_bound():
    from gircse_kernels.grad_filter import gradient_filter_bound

    case = Case(lead=(4,), vocab=3000, d=32, peaked=True, logit_scale=40.0, bias=True)
    h, w, e, b = make_inputs(case, requires_grad=True)
    go = torch.randn(4, 32)
    exact = torch.autograd.grad(op(h, w, e, b), (h, w, e, b), go)
    eps = 1e-4
    filtered = torch.autograd.grad(op(h, w, e, b, grad_filter_eps=eps), (h, w, e, b), go)
    bound = gradient_filter_bound(h.detach(), w.detach(), e.detach(), b.detach(), go, eps=eps)
    skipped_something = False
    for name, x, y in zip(["hidden", "lm_head_weight", "embed_weight", "lm_head_bias"], exact, filtered):
        err = (x - y).abs().max().item()
        skipped_something |= err > 0
        assert err <= bound[name], (name, err, bound[name])
    assert skipped_something  # the filter really dropped tiles in this peaked case
    # eps = 0 is exact.
    again = torch.autograd.grad(op(h, w, e, b, grad_filter_eps=0.0), (h, w, e, b), go)
    for x, y in zip(exact, again):
        assert torch.equal(x, y)
