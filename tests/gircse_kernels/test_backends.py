"""The backend registry: what "auto" resolves to, and the errors for a backend this machine cannot run."""
import warnings

import pytest
import torch

from gircse_kernels import backends, torch_chunked


def test_auto_on_cpu_prefers_cpu_extension_else_torch(monkeypatch):
    from gircse_kernels import cpu

    # Whether or not GIRCSE_REQUIRE_EXTENSION is set: an extension that loads must be picked (under
    # the variable, a missing one makes cpu.available() raise, failing this test).
    expected = ("cpu", cpu) if cpu.available() else ("torch", torch_chunked)
    assert backends.resolve_backend("auto", torch.device("cpu")) == expected
    monkeypatch.setattr(backends, "_cpu_backend", lambda: cpu)  # as on a machine where it loads
    assert backends.resolve_backend("auto", torch.device("cpu")) == ("cpu", cpu)
    monkeypatch.setattr(backends, "_cpu_backend", lambda: None)
    monkeypatch.setattr(backends, "_warned_cpu_fallback", False)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU extension is not available"):
        assert backends.resolve_backend("auto", torch.device("cpu")) == ("torch", torch_chunked)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warns once, not on every call
        backends.resolve_backend("auto", torch.device("cpu"))


def test_cpu_backend_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backends, "_cpu_backend", lambda: None)
    with pytest.raises(RuntimeError, match="backend='cpu' was requested"):
        backends.resolve_backend("cpu", torch.device("cpu"))
