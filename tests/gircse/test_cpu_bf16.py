"""bf16 on a CPU without native bf16: detected from the CPU's own flags, warned about once with measured rates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from gircse import cpu_bf16
from gircse.cpu_bf16 import SlowBf16Warning, native_bf16, warn_if_slow_bf16

NO_BF16 = {"avx512_bf16": False, "amx_bf16": False}


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not warned yet."""
    monkeypatch.setattr(cpu_bf16, "_warned", False)


@pytest.mark.parametrize("flags,machine,native", [
    (NO_BF16, "x86_64", False),
    ({"avx512_bf16": True, "amx_bf16": False}, "x86_64", True),
    ({"avx512_bf16": False, "amx_bf16": True}, "AMD64", True),
    (NO_BF16, "aarch64", True),  # not judged off x86
])
def test_native_bf16_from_flags(flags, machine, native):
    assert native_bf16(flags, machine=machine) is native


def test_flags_are_the_cpus_own():
    from gircse_kernels import cpu

    caps = cpu.capabilities()
    assert cpu_bf16.bf16_flags() == {"avx512_bf16": caps["avx512_bf16"], "amx_bf16": caps["amx_bf16"]}


def test_flags_without_the_extension_come_from_torchs_cpuinfo(monkeypatch):
    from gircse_kernels import cpu

    monkeypatch.setattr(cpu, "available", lambda: False)
    assert cpu_bf16.bf16_flags.__wrapped__() == cpu_bf16.bf16_flags()


def test_emulating_a_smaller_cpu_does_not_change_the_detection():
    """ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA restrict torch's kernels, not the CPU: the flags stay."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "import json; from gircse.cpu_bf16 import bf16_flags; print(json.dumps(bf16_flags()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == cpu_bf16.bf16_flags()


def test_warns_once_with_measured_rates(fresh):
    with pytest.warns(SlowBf16Warning) as record:
        message = warn_if_slow_bf16("bf16 autocast (--bf16)", "train without --bf16", "cpu", capabilities=NO_BF16)
    assert len(record) == 1 and str(record[0].message) == message
    assert message.startswith("gircse: bf16 autocast (--bf16) on a CPU without native bf16")
    assert "GFLOP/s here against" in message and message.endswith("on this CPU, train without --bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_slow_bf16("again", "fp32", "cpu", capabilities=NO_BF16) is None


@pytest.mark.parametrize("flags,device", [({"avx512_bf16": True, "amx_bf16": False}, "cpu"), (NO_BF16, "cuda"),
                                          (NO_BF16, "meta")])
def test_silent_where_bf16_is_native_or_not_on_a_cpu(fresh, flags, device):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_slow_bf16("x", "y", device, capabilities=flags) is None


def test_measured_rates_are_rates():
    assert 0 < cpu_bf16.matmul_gflops(torch.float32, rows=8, width=16, repeats=2) < float("inf")


@pytest.fixture
def no_native_bf16(fresh, monkeypatch):
    monkeypatch.setattr(cpu_bf16, "bf16_flags", lambda: dict(NO_BF16))
    monkeypatch.setattr(cpu_bf16.platform, "machine", lambda: "x86_64")


def test_a_bf16_model_warns(no_native_bf16, smollm2_tokenizer):
    from gircse import GIRCSE

    from .conftest import tiny_causal_lm

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GIRCSE(tiny_causal_lm("llama"), smollm2_tokenizer)  # fp32: silent
    with pytest.warns(SlowBf16Warning, match=r"a bf16 model .*load it in fp32 \(dtype='float32', --dtype float32\)"):
        GIRCSE(tiny_causal_lm("llama").to(torch.bfloat16), smollm2_tokenizer)


def test_bf16_autocast_in_training_warns(no_native_bf16):
    from gircse.training import TrainConfig
    from gircse.training.trainer import _autocast

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _autocast(TrainConfig(bf16=False), torch.device("cpu"))
    with pytest.warns(SlowBf16Warning, match=r"bf16 autocast \(--bf16, TrainConfig.bf16\)"):
        with _autocast(TrainConfig(bf16=True), torch.device("cpu")):
            pass
