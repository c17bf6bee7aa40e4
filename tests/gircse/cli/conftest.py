"""Fixtures of the command-line tests."""
from __future__ import annotations

import pytest

from gircse import cli


@pytest.fixture
def saved_tiny(tmp_path, make_tiny):
    directory = str(tmp_path / "tiny-gircse")
    make_tiny("llama", k=2).save_pretrained(directory)
    return directory


@pytest.fixture
def saved_nan_model(tmp_path, make_tiny):
    """A saved tiny model whose final norm has a NaN weight: every embedding it gives is NaN."""
    import torch

    model = make_tiny("llama", k=2)
    with torch.no_grad():
        model.model.model.norm.weight[0] = float("nan")
    directory = str(tmp_path / "nan-model")
    model.save_pretrained(directory)
    return directory


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if an evaluation command loads a model (argument errors must come first)."""
    def refuse(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    for command in (cli.eval, cli.scale, cli.explain, cli.eval_mteb):
        monkeypatch.setattr(command, "_load", refuse)


@pytest.fixture
def restore_threads():
    """``gircse encode-corpus`` sets torch's thread count, in-process here; put it back after the test."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
