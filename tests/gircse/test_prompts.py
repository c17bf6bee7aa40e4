"""gircse.prompts: query formats are checked; any padding becomes left padding."""
import pytest
import torch

from gircse.prompts import QUERY_FORMAT, check_query_format, to_left_padding


def test_check_query_format():
    assert check_query_format(QUERY_FORMAT) == QUERY_FORMAT
    assert check_query_format("{instruction}{{literal braces}}: {text}")
    for bad in ("Instruct: {instruction}", "Query: {text}", "{text} {instruction}", "{instruction} {text} {text}",
                "{instruction} {text} {x}", "{instruction} {0} {text}", "{instruction {text}"):
        with pytest.raises(ValueError, match="query_format"):
            check_query_format(bad)
    with pytest.raises(TypeError, match="query_format must be a str"):
        check_query_format(None)


def test_to_left_padding():
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9], [0, 1, 0, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]])
    left_ids, left_mask = to_left_padding(ids, mask)
    assert left_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]
    assert [row[m.bool()].tolist() for row, m in zip(left_ids, left_mask)] == [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 2]]
    already = (ids[2:3], mask[2:3])
    assert to_left_padding(*already)[0] is already[0]  # nothing to do: the same tensors
    with pytest.raises(ValueError, match="row 0 has no real token"):
        to_left_padding(ids[:1], torch.zeros_like(ids[:1]))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        to_left_padding(ids, mask[:, :2])
