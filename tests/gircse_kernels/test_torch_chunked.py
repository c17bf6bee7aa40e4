import functools

import pytest
import torch

from gircse_kernels import soft_token_embedding
from tests.gircse_kernels.op_cases import (
    GRID, Case, check_backward, check_forward, check_fully_masked, check_grad_filter_bound, make_inputs)

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
    check_grad_filter_bound(op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_fully_masked_rows_behave_like_torch_softmax(dtype, tied):
    check_fully_masked(op, dtype=dtype, tied=tied)
