"""Saved directories and model references: saves replace what they own, loads check what the config
promises (version, keys, formats, adapter), paths may be pathlib.Path, missing paths fail at once."""
from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np
import pytest

from gircse import GIRCSE, loading

from .test_model import TEXTS, _lora


def _config(directory) -> dict:
    return json.loads((pathlib.Path(directory) / loading.CONFIG_FILE).read_text())


def _write_config(directory, **changes) -> None:
    config = {**_config(directory), **changes}
    config = {key: value for key, value in config.items() if value is not ...}
    (pathlib.Path(directory) / loading.CONFIG_FILE).write_text(json.dumps(config))


def test_save_without_adapter_removes_a_stale_one(tiny_base_dir, tmp_path):
    """A directory that held an adapter, saved over by a model without one, loads as that model."""
    base = GIRCSE.from_pretrained(tiny_base_dir, k=2)
    tuned = GIRCSE(_lora(base.model), base.tokenizer, k=2, base_model=str(tiny_base_dir))
    out = tmp_path / "out"
    tuned.save_pretrained(out)
    assert (out / "adapter_model.safetensors").is_file()
    plain = GIRCSE.from_pretrained(tiny_base_dir, k=2)
    plain.save_pretrained(out)
    assert not any((out / name).exists() for name in loading.ADAPTER_FILES)
    assert _config(out)["adapter"] is False
    loaded = GIRCSE.from_pretrained(out)
    assert not hasattr(loaded.model, "peft_config")
    np.testing.assert_allclose(loaded.encode(TEXTS), plain.encode(TEXTS), atol=1e-6)


def test_save_replaces_stale_base_weights(make_tiny, tiny_base_dir, tmp_path):
    out = tmp_path / "out"
    make_tiny("qwen2", k=2).save_pretrained(out)  # in-memory model: weights under base/
    assert (out / "base" / "model.safetensors").is_file()
    referenced = GIRCSE.from_pretrained(tiny_base_dir, k=2)
    referenced.save_pretrained(out)  # now a reference elsewhere: the old base/ is stale
    assert not (out / "base").exists()
    assert _config(out)["base_model"] == str(tiny_base_dir)
    # Loaded from a directory with base/ and saved back into it: base/ is kept and still referenced.
    make_tiny("mistral", k=2).save_pretrained(out)
    again = GIRCSE.from_pretrained(out)
    expected = again.encode(TEXTS)
    again.save_pretrained(out)
    assert _config(out)["base_model"] == "base" and (out / "base" / "model.safetensors").is_file()
    np.testing.assert_allclose(GIRCSE.from_pretrained(out).encode(TEXTS), expected, atol=1e-6)
    # A base/ that no earlier save wrote is never deleted.
    foreign = tmp_path / "foreign"
    (foreign / "base").mkdir(parents=True)
    (foreign / "base" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="no earlier GIRCSE save"):
        make_tiny("llama").save_pretrained(foreign)
    assert (foreign / "base" / "mine.txt").read_text() == "keep"


def test_load_checks_the_adapter_the_config_promises(tiny_base_dir, tmp_path):
    base = GIRCSE.from_pretrained(tiny_base_dir, k=2)
    out = tmp_path / "out"
    GIRCSE(_lora(base.model), base.tokenizer, k=2, base_model=str(tiny_base_dir)).save_pretrained(out)
    weights = (out / "adapter_model.safetensors").read_bytes()
    (out / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="says the directory holds a peft adapter"):
        GIRCSE.from_pretrained(out)
    (out / "adapter_model.safetensors").write_bytes(weights)
    _write_config(out, adapter=False)  # an adapter the config does not own: refused, not silently loaded
    with pytest.raises(ValueError, match="holds no adapter, but adapter_config.json"):
        GIRCSE.from_pretrained(out)
    # An explicit adapter= is the caller's choice.
    assert hasattr(GIRCSE.from_pretrained(out, adapter=out).model, "peft_config")


@pytest.mark.parametrize("change,message", [
    (dict(gircse_config_version=2), "written by a newer gircse"),
    (dict(gircse_config_version=0), "gircse_config_version must be 1"),
    (dict(gircse_config_version=True), "gircse_config_version must be 1"),  # True == 1, but not a version
    (dict(gircse_config_version=1.0), "gircse_config_version must be 1"),
    (dict(gircse_config_version=...), "missing 'gircse_config_version'"),
    (dict(method="mean"), "method must be"),
    (dict(k=0), "k must be an int >= 1"),
    (dict(k="5"), "k must be an int >= 1"),
    (dict(max_length=1), "max_length must be an int >= 2"),
    (dict(adapter="yes"), "adapter must be true or false"),
    (dict(adapter=...), "missing 'adapter'"),
    (dict(base_model=""), "base_model must be"),
    (dict(query_format="Instruct: {instruction}"), "query_format"),
    (dict(query_format="{text} -- {instruction}"), "query_format"),
    (dict(query_format="Instruct: {instruction}\nQuery: {text} {extra}"), "query_format"),
    (dict(query_format="Instruct: {instruction\nQuery: {text}"), "query_format"),
    (dict(document_format="passage: {text}"), "document_format"),
])
def test_load_validates_the_config(make_tiny, tmp_path, change, message):
    out = tmp_path / "out"
    make_tiny("llama", k=2).save_pretrained(out)
    _write_config(out, **change)
    with pytest.raises(ValueError, match=message) as error:
        GIRCSE.from_pretrained(out)
    assert loading.CONFIG_FILE in str(error.value)


@pytest.mark.parametrize("key,bad,good", [
    ("prompt_style", ["chat", "", None, 1], ["gircse", "reference"]),
    ("gguf_file", ["", 5, False, ["a.gguf"]], [None, "SmolLM2-135M-Instruct.Q4_1.gguf"]),
    ("pooling", [None, 3, ["mean"]], ["", "mean of the K generated states"]),
])
def test_optional_config_keys_are_validated(make_tiny, tmp_path, key, bad, good):
    make_tiny("llama", k=2).save_pretrained(tmp_path / "m")
    saved = _config(tmp_path / "m")
    for value in bad:
        with pytest.raises(ValueError, match=f"^{loading.CONFIG_FILE}: {key} must be"):
            loading.validate_config({**saved, key: value})
    for value in good:
        assert loading.validate_config({**saved, key: value})[key] == value
    without = {name: value for name, value in saved.items() if name != key}
    assert loading.validate_config(without) == without  # optional: absent is fine
    _write_config(tmp_path / "m", **{key: bad[0]})  # and loading goes through the same check
    with pytest.raises(ValueError, match=f"{key} must be"):
        GIRCSE.from_pretrained(tmp_path / "m")


def test_query_format_without_text_would_embed_every_query_alike(make_tiny):
    """Why the format is checked: this is what a format without {text} did (every query the same)."""
    with pytest.raises(ValueError, match="query_format"):
        make_tiny("llama", query_format="Instruct: {instruction}")
    model = make_tiny("llama", query_format="Q: {instruction} -> {text}")
    a, b = model.encode(TEXTS[:2], "Find it")
    assert np.abs(a - b).max() > 1e-3


def test_config_keys_written_are_the_keys_read(make_tiny, tmp_path):
    make_tiny("llama").save_pretrained(tmp_path / "m")
    written = _config(tmp_path / "m")
    assert set(written) <= set(loading.CONFIG_KEYS)
    assert "document_format" not in written  # never used: not written
    assert written["gircse_config_version"] == loading.CONFIG_VERSION


def test_unknown_config_key_warns(make_tiny, tmp_path):
    make_tiny("llama", k=2).save_pretrained(tmp_path / "m")
    _write_config(tmp_path / "m", kk=5)
    with pytest.warns(UserWarning, match="does not know and ignores: kk"):
        GIRCSE.from_pretrained(tmp_path / "m")


def test_malformed_json_names_the_file(make_tiny, tmp_path):
    make_tiny("llama").save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / loading.CONFIG_FILE
    path.write_text('{"k": 3,,}')
    with pytest.raises(ValueError, match=f"{path}: invalid JSON .*line 1, column 9"):
        GIRCSE.from_pretrained(tmp_path / "m")
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        GIRCSE.from_pretrained(tmp_path / "m")


def test_pathlib_paths_everywhere(tiny_base_dir, tmp_path):
    model = GIRCSE.from_pretrained(tiny_base_dir, k=2)  # a Path
    assert model.base_model == str(tiny_base_dir)
    tuned = GIRCSE(_lora(model.model), model.tokenizer, k=2, base_model=model.base_model)
    tuned.save_pretrained(tmp_path / "saved")  # a Path
    assert _config(tmp_path / "saved")["base_model"] == str(tiny_base_dir)  # JSON, not a Path repr
    loaded = GIRCSE.from_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(loaded.encode(TEXTS), tuned.encode(TEXTS), atol=1e-6)
    again = GIRCSE.from_pretrained(tiny_base_dir, k=2, adapter=tmp_path / "saved")
    np.testing.assert_allclose(again.encode(TEXTS), tuned.encode(TEXTS), atol=1e-6)
    assert loading.resolve_model_source(pathlib.Path("some/dir")) == ("some/dir", None)


def test_missing_local_path_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for missing in (tmp_path / "nope", str(tmp_path / "nope"), "./nope", "runs/gircse", "a/b/c", "~/no-model-here"):
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError, match="no such directory"):
            GIRCSE.from_pretrained(missing)
        assert time.perf_counter() - start < 5, missing  # not a hub round trip (47 s offline)
    with pytest.raises(FileNotFoundError, match="no peft adapter"):
        GIRCSE.from_pretrained("smollm2-135m", adapter=tmp_path)



def test_hub_ids_fail_at_once_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    import socket

    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    lookups = []

    def no_network(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="no such directory: runs/gircse .* not in the Hugging Face cache "
                                                "and huggingface.co cannot be reached"):
        GIRCSE.from_pretrained("runs/gircse")  # no runs/ here: it could be a hub id, but not one we can get
    assert time.perf_counter() - start < 5 and lookups == ["huggingface.co"]
    (tmp_path / "hub-cache" / "models--someone--model").mkdir(parents=True)
    assert loading.check_model_reference("someone/model") == "someone/model"  # cached: transformers decides
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        loading.check_model_reference("someone/other")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])
    assert loading.check_model_reference("someone/other") == "someone/other"  # reachable: left to the hub


def test_base_model_of_a_saved_directory_must_exist(make_tiny, tmp_path):
    make_tiny("llama").save_pretrained(tmp_path / "m")
    _write_config(tmp_path / "m", base_model=str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="base_model: no such directory"):
        GIRCSE.from_pretrained(tmp_path / "m")


def test_dtype_names(tmp_path):
    import torch

    assert loading.resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    for bad in ("int8", "float64", torch.int64, torch.float64, 3):
        with pytest.raises(ValueError, match="dtype must be"):
            loading.resolve_dtype(bad, torch.device("cpu"))


# ---------------------------------------------------------------------- an adapter must meet its own base
def _adapter_on(base_dir, out, tokenizer_of=None):
    """A LoRA adapter saved by GIRCSE.save_pretrained against ``base_dir`` (gircse_config.json records it)."""
    base = GIRCSE.from_pretrained(base_dir, k=2)
    GIRCSE(_lora(base.model), base.tokenizer, k=2, base_model=str(base_dir)).save_pretrained(out)
    return out


def _peft_only(adapter_dir, out, base_model_name_or_path=...):
    """The adapter's peft files alone (as peft or another tool writes them: no gircse_config.json)."""
    out.mkdir()
    config = json.loads((adapter_dir / loading.ADAPTER_CONFIG_FILE).read_text())
    if base_model_name_or_path is not ...:
        config["base_model_name_or_path"] = base_model_name_or_path
    (out / loading.ADAPTER_CONFIG_FILE).write_text(json.dumps(config))
    (out / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    return out


def test_adapter_on_another_base_is_an_error_naming_both(tiny_base_dir, tmp_path, smollm2_tokenizer, monkeypatch):
    """from_pretrained("B", adapter=<trained on A>) loaded without a word; the adapter's directory records
    its base (gircse_config.json, else peft's base_model_name_or_path): another base by name is an error."""
    from .conftest import tiny_causal_lm

    other = tmp_path / "other-base"
    tiny_causal_lm("llama", seed=1).save_pretrained(other)  # same architecture and shapes: peft would load it
    smollm2_tokenizer.save_pretrained(other)
    adapter = _adapter_on(tiny_base_dir, tmp_path / "adapter")
    peft_only = _peft_only(adapter, tmp_path / "peft-only")
    assert json.loads((peft_only / loading.ADAPTER_CONFIG_FILE).read_text())["base_model_name_or_path"] == str(
        tiny_base_dir)  # what peft recorded
    for adapter_dir, source in ((adapter, loading.CONFIG_FILE), (peft_only, loading.ADAPTER_CONFIG_FILE)):
        with monkeypatch.context() as m:
            m.setattr(loading, "load_base", lambda *a, **k: pytest.fail("loaded before the check"))
            with pytest.raises(ValueError, match=f"adapter {adapter_dir} was trained on '{tiny_base_dir}' "
                                                 f"\\({adapter_dir / source}\\), not on '{other}'"):
                GIRCSE.from_pretrained(other, adapter=adapter_dir)
        assert hasattr(GIRCSE.from_pretrained(tiny_base_dir, adapter=adapter_dir).model, "peft_config")
    # a saved GIRCSE directory as the model: its own base is compared
    _adapter_on(other, tmp_path / "saved-on-other")
    with pytest.raises(ValueError, match="not on '.*other-base'"):
        GIRCSE.from_pretrained(tmp_path / "saved-on-other", adapter=adapter)


def test_adapter_base_by_name(tmp_path):
    """Names that denote different models are an error; spellings of one model are not."""
    adapter = tmp_path / "a"
    adapter.mkdir()

    def recorded(base, gguf_file=None):
        (adapter / loading.CONFIG_FILE).write_text(json.dumps({
            "gircse_config_version": 1, "base_model": base, "gguf_file": gguf_file, "method": "gircse", "k": 2,
            "max_length": 64, "query_format": "Instruct: {instruction}\nQuery: {text}", "adapter": True}))

    recorded("smollm2-135m")
    with pytest.raises(ValueError, match="trained on 'smollm2-135m' .* not on 'HuggingFaceTB/SmolLM2-135M'"):
        loading.check_adapter_base(str(adapter), "HuggingFaceTB/SmolLM2-135M", None)
    loading.check_adapter_base(str(adapter), "SmolLM2", None)  # an alias of the same model
    loading.check_adapter_base(str(adapter), "smollm2-135m", loading.SMOLLM2_GGUF)  # its default GGUF, named
    smollm2_dir = loading.resolve_model_source("smollm2-135m")[0]
    loading.check_adapter_base(str(adapter), smollm2_dir, None)  # the package directory peft records
    with pytest.raises(ValueError, match="gguf_file 'other.gguf'"):
        loading.check_adapter_base(str(adapter), "smollm2-135m", "other.gguf")
    recorded("org/model-a")
    with pytest.raises(ValueError, match="trained on 'org/model-a' .* not on 'org/model-b'"):
        loading.check_adapter_base(str(adapter), "org/model-b", None)


def test_adapter_base_that_cannot_be_told_warns(tiny_base_dir, tmp_path):
    """A warning, not an error, where names cannot settle it: nothing recorded, a recorded path that is gone,
    a hub id against a local directory (which may be its download)."""
    adapter = _adapter_on(tiny_base_dir, tmp_path / "adapter")
    cases = [(None, "records no base model"), (str(tmp_path / "moved-away"), "cannot be told from the names"),
             ("org/tiny-llama", "cannot be told from the names")]
    for i, (recorded, message) in enumerate(cases):
        peft_only = _peft_only(adapter, tmp_path / f"peft-{i}", base_model_name_or_path=recorded)
        with pytest.warns(UserWarning, match=message):
            model = GIRCSE.from_pretrained(tiny_base_dir, adapter=peft_only)
        assert hasattr(model.model, "peft_config")


def test_adapter_files_that_are_broken_fail_before_the_base_loads(tiny_base_dir, tmp_path, monkeypatch):
    """A corrupt adapter_config.json (peft's error named no file) and adapter weights cut short (a
    SafetensorError after the base model had loaded) are one error each, naming the file."""
    adapter = _adapter_on(tiny_base_dir, tmp_path / "adapter")
    monkeypatch.setattr(loading, "load_base", lambda *a, **k: pytest.fail("the base loaded before the check"))
    weights = adapter / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:len(whole) - 100])
    with pytest.raises(ValueError, match=f"adapter weights {weights} is not a complete safetensors file"):
        GIRCSE.from_pretrained(tiny_base_dir, adapter=adapter)
    with pytest.raises(ValueError, match=f"adapter weights {weights} is not a complete safetensors file"):
        GIRCSE.from_pretrained(adapter)  # its own adapter, as the config promises
    weights.write_bytes(whole)
    peft_only = _peft_only(adapter, tmp_path / "peft-only")
    (peft_only / loading.ADAPTER_CONFIG_FILE).write_text('{"r": 4,')
    with pytest.raises(ValueError, match=f"{peft_only / loading.ADAPTER_CONFIG_FILE}: invalid JSON"):
        GIRCSE.from_pretrained(tiny_base_dir, adapter=peft_only)


def test_adapter_of_another_shape_is_one_line_naming_both(tiny_base_dir, tmp_path, smollm2_tokenizer):
    """An adapter whose weights do not fit (another hidden size) was a multi-line RuntimeError from peft."""
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = tmp_path / "wide-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wide)
    smollm2_tokenizer.save_pretrained(wide)
    adapter = _adapter_on(wide, tmp_path / "wide-adapter")
    unrecorded = _peft_only(adapter, tmp_path / "unrecorded", base_model_name_or_path=None)
    with pytest.warns(UserWarning, match="records no base model"):
        with pytest.raises(ValueError, match=f"adapter {unrecorded} does not fit base model '{tiny_base_dir}': "
                                             r"\d+ weight\(s\) have other shapes \(first: size mismatch for") as error:
            GIRCSE.from_pretrained(tiny_base_dir, adapter=unrecorded)
    assert "\n" not in str(error.value)
