"""CPU-side checks of ``bench/gpu_check.py``: argument handling, the budget, report writing, and one full run
of its logic on tiny shapes under the Triton interpreter (its timings mean nothing there)."""
import json
import os
import subprocess
import sys

import pytest

from bench import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_arguments(tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path), "--device", "cpu"])
    assert args.small and set(args.model_shapes) == set(gpu_check.SMALL_MODELS)
    assert args.batch_sizes == gpu_check.SMALL_BATCHES
    args = gpu_check.parse_args(["--out", str(tmp_path), "--models", "Qwen2-7B", "--batches", "1", "512"])
    assert not args.small and args.device == "cuda"
    assert args.model_shapes == {"Qwen2-7B": (152064, 3584, 3584, False)} and args.batch_sizes == (1, 512)
    assert gpu_check.parse_args(["--out", "x"]).batch_sizes == (1, 8, 32, 128, 512, 4096)
    for bad in (["--models", "GPT-5"], ["--batches", "0"], ["--budget-s", "0"], ["--sections", "nope"], []):
        with pytest.raises(SystemExit):
            gpu_check.parse_args((["--out", "x"] if bad else []) + bad)


def test_budget_skips_sections_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "calibrate", lambda device, small: dict(hbm_bytes_per_s=1e11, l2_bytes_per_s=3e11,
                                                                           gemm_flops=1e12))
    args = gpu_check.parse_args(["--out", str(tmp_path), "--device", "cpu", "--budget-s", "1e-9"])
    report = gpu_check.run(args)
    assert report["correctness"] == [] and report["skipped"]["correctness"].startswith("budget")
    assert report["skipped"]["graphs"] == "CUDA graphs need a GPU"
    assert report["timings"] and all(r["skipped"] == "budget" for r in report["timings"])
    assert report["skipped"]["sweep"] == "budget"
    text = (tmp_path / "gpu_check.md").read_text()
    assert "skipped (budget)" in text and "skipped: budget" in text
    assert json.loads((tmp_path / "gpu_check.json").read_text())["budget_s"] == 1e-9


def test_calibrated_hardware_feeds_the_roofline():
    from gircse_kernels.triton import roofline

    env = dict(gpu="NVIDIA H200", sms=132, l2_mib=60.0)
    hw = gpu_check.calibrated_hardware(dict(hbm_bytes_per_s=4.0e12, l2_bytes_per_s=9e12, gemm_flops=700e12), env)
    assert hw.hbm_bytes_per_s == 4.0e12 and hw.l2_bytes_per_s == 9e12 and hw.flops_16bit == 700e12
    assert hw.l2_bytes == 60 << 20 and hw.num_sms == 132
    slow = roofline.predict("forward", 1, 152064, 3584, 3584, hardware=hw)
    fast = roofline.predict("forward", 1, 152064, 3584, 3584, hardware=roofline.H200)
    assert slow.seconds > fast.seconds  # a slower measured HBM predicts a slower bandwidth-bound decode step


def test_markdown_renders_every_section():
    report = dict(command="gpu_check.py --out x", wall_s=12.0, budget_s=420.0, skipped={}, errors=["boom"],
                  environment=dict(gpu="H200"), calibration=dict(hbm_bytes_per_s=4.3e12, l2_bytes_per_s=1e13,
                                                                  gemm_flops=7.9e14),
                  correctness=[dict(model="m", rows=1, dtype="bfloat16", tied=True, mask=None, path="decode", ok=True,
                                    checks={"output": dict(error=1e-3, bound=2e-3, ok=True)}),
                               dict(model="m", rows=2, dtype="float32", tied=False, mask="tail", ok=False,
                                    error="RuntimeError: x")],
                  graphs=[dict(name="op K-step loop", ok=True), dict(name="generation", ok=False, error="capture")],
                  timings=[dict(model="m", rows=1, pass_name="forward", kind="decode", triton_s=1e-3, naive_s=2e-3,
                                chunked_s=3e-3, sdpa_s=4e-3, sdpa_backend="flash_attention", hbm_fraction=0.8,
                                tflops=1.5, model_s=9e-4, model_measured_hw_s=1e-3, ideal_s=8e-4),
                           dict(model="m", rows=8, pass_name="forward", skipped="budget")],
                  sweep=[dict(setting="blocks", key=["forward", 2, "small", "chunked"], choice=[16, 64, 4, 4],
                              model="m", rows=1, pass_name="forward", current=True, seconds=1e-3, model_s=2e-3),
                         dict(setting="blocks", key=["forward", 2, "small", "chunked"], choice=[16, 32, 4, 4],
                              model="m", rows=1, pass_name="forward", current=False, skipped="budget"),
                         dict(setting="gemm_chunk", key=["gemm_chunk"], choice=9472, model="m", rows=128,
                              pass_name="dh-backward", current=False, seconds=5e-3, model_s=4e-3)])
    text = gpu_check.markdown(report)
    for needle in ("4.3 TB/s", "| m | 1 | bfloat16 | True | None | decode | output |", "FAILED", "replay equals eager",
                   "FAILED: capture", "| 1.000 | 2.000 | 3.000 | 4.000 (flash_attention) | 80 |", "skipped (budget)",
                   "| m | 1 | forward | ('forward', 2, 'small', 'chunked') | (16, 64, 4, 4) * | 1.000 | 2.000 |",
                   "| (16, 32, 4, 4) | budget |",
                   "| m | 128 | dh-backward | gemm_chunk (vocabulary rows) | 9472 | 5.000 |", "boom"):
        assert needle in text, needle


def test_cpu_run_of_every_section(tmp_path):
    """The whole script on tiny shapes under the interpreter: correctness passes, reports are written."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu",
                          "--out", str(tmp_path), "--models", "tiny-wide", "--budget-s", "600"],
                         capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and report["correctness"] and all(c["ok"] for c in report["correctness"])
    paths = {c["path"] for c in report["correctness"]}
    assert {"decode", "gemm"} <= paths  # the fused kernels and the GEMM path were both checked
    assert {r["pass_name"] for r in report["timings"]} == set(gpu_check.PASSES)
    assert all(r["triton_s"] > 0 and r["model_s"] > 0 for r in report["timings"])
    assert report["sweep"] and all(s["seconds"] > 0 and s["model_s"] > 0 for s in report["sweep"])
    # every swept (pass, B) times the entry in use first, then the alternatives
    swept = {(s["pass_name"], s["rows"]) for s in report["sweep"]}
    assert swept == {(p, b) for p, b, _, _ in gpu_check.SWEEP}, swept
    for p, b, _, _ in gpu_check.SWEEP:
        cells = [s for s in report["sweep"] if (s["pass_name"], s["rows"]) == (p, b)]
        assert cells[0]["current"] and not any(s["current"] for s in cells[1:])
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## Correctness" in text and "## Timings" in text and "CUDA graphs need a GPU" in text


@pytest.mark.parametrize("pass_name", gpu_check.PASSES)
@pytest.mark.parametrize("rows,tied,bias", [(1, False, True), (64, True, False)])
def test_precompile_plans_are_the_launches_that_run(pass_name, rows, tied, bias, monkeypatch):
    """What the precompile section compiles is what a call launches: same kernels, grids, constexprs and
    specialization (recorded from a real call under the interpreter; rows = 64 takes the GEMM path)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (no kernel runs: Launch.__call__ only records)
    import torch

    from gircse_kernels.triton import host
    from gircse_kernels.triton.aot import jit_specialization
    from gircse_kernels.triton.launch import Launch

    vocab, d, de, _ = gpu_check.SMALL_MODELS["tiny-wide"]
    de = d if tied else de
    ran = []
    monkeypatch.setattr(Launch, "__call__", lambda self: ran.append(self))
    h, w, e, b = gpu_check.make_inputs(vocab, d, de, torch.float32, "cpu", rows=rows, tied=tied, bias=bias)
    lse = torch.zeros(rows)
    kw = dict(temperature=1.0, softcap=None, tied=tied)
    if pass_name == "forward":
        host.forward(h, w, e, b, **kw)
    else:
        full = pass_name == "full-backward"
        host.backward(torch.zeros(rows, de), h, w, e, b, lse, lse, need_hidden=True, need_weight=full,
                      need_embed=full, need_bias=full and bias, merge_tied_grads=full and tied, **kw)
    planned = gpu_check.planned_launches(pass_name, rows, vocab, d, de, tied, "float32", bias, 4, upcast=True)

    def key(launch):
        sig, const, attrs = jit_specialization(launch)
        return launch.name, launch.grid, sorted(map(str, const.items())), str(sig), str(attrs)

    assert [key(x) for x in ran] == [key(x) for x in planned]


def test_sweep_times_the_choice_in_use_first_and_survives_a_failing_alternative(monkeypatch):
    """Per swept (pass, B): the choice in use, then the alternatives, each in place while it is timed and
    with its roofline prediction; an alternative that fails is reported with its error and the sweep goes
    on; BLOCKS and the GEMM chunk rule are restored."""
    import torch

    from gircse_kernels.triton import config as triton_config, roofline

    before, chunk_rule = dict(triton_config.BLOCKS), triton_config.gemm_chunk
    vocab, d, _, _ = gpu_check.MODELS["SmolLM2-135M"]
    seen = []

    def fake_time(pass_name, rows, vocab_, d_, de, tied, device):
        cfg = triton_config.choose_config(rows, vocab_, d_, de, torch.bfloat16, 132)
        seen.append(cfg.gemm_chunk_forward if cfg.kind == "gemm" else
                    triton_config.BLOCKS[(gpu_check.SWEEP_KERNELS[pass_name], 2, "small" if rows <= 16 else "large",
                                          triton_config.feature_mode(d_, de))])
        if len(seen) == 2:
            raise RuntimeError("out of resources: shared memory")
        return 1e-3 * len(seen)

    monkeypatch.setattr(gpu_check, "_sweep_time", fake_time)
    rows = gpu_check.sweep({"SmolLM2-135M": gpu_check.MODELS["SmolLM2-135M"]}, "cpu", gpu_check.Clock(600), 0.0,
                           roofline.H200)
    assert triton_config.BLOCKS == before and triton_config.gemm_chunk is chunk_rule
    assert [tuple(r["choice"]) if r["setting"] == "blocks" else r["choice"] for r in rows] == seen
    assert "out of resources" in rows[1]["error"] and "seconds" not in rows[1]
    assert all(r["seconds"] > 0 for i, r in enumerate(rows) if i != 1) and all(r["model_s"] > 0 for r in rows)
    # SmolLM2 runs the fused kernels at B = 32 and 1 and the GEMM path at B = 128: every SWEEP entry applies
    for p, b, setting, alternatives in gpu_check.SWEEP:
        cells = [r for r in rows if (r["pass_name"], r["rows"]) == (p, b)]
        assert cells and all(r["setting"] == setting for r in cells)
        assert cells[0]["current"] and not any(r["current"] for r in cells[1:])
        expected = alternatives if setting == "blocks" else [gpu_check._chunk_rows(vocab, f) for f in alternatives]
        got = [tuple(r["choice"]) if setting == "blocks" else r["choice"] for r in cells[1:]]
        assert got == [a for a in expected if a != (tuple(cells[0]["choice"]) if setting == "blocks"
                                                     else cells[0]["choice"])]
    # the GEMM chunk alternatives really differ: V / 4, V / 8, V / 16 of 49152 rows
    assert [r["choice"] for r in rows if r["setting"] == "gemm_chunk" and not r["current"]][:3] == [12288, 6144, 3072]
    text = gpu_check.markdown(dict(command="x", wall_s=1.0, budget_s=1.0, environment={}, sweep=rows))
    assert "RuntimeError: out of resources" in text and "gemm_chunk (vocabulary rows)" in text


def test_precompile_plans_a_sweep_alternative_under_its_tiles():
    """The precompile section compiles each sweep tile alternative as the sweep will launch it: the plan
    under ``blocks`` carries the alternative's tile constexprs, and BLOCKS is left as it was."""
    from gircse_kernels.triton import config as triton_config

    before = dict(triton_config.BLOCKS)
    vocab, d, de, tied = gpu_check.MODELS["Qwen2.5-0.5B"]
    cells = [c for c in gpu_check.sweep_cells({"Qwen2.5-0.5B": (vocab, d, de, tied)}, 132) if c["setting"] == "blocks"]
    # Qwen2.5-0.5B runs the fused kernels below 64 rows: every tile entry of the sweep applies
    assert {(c["pass_name"], c["rows"]) for c in cells} == {(p, b) for p, b, setting, _ in gpu_check.SWEEP
                                                             if setting == "blocks"}
    for cell in cells:
        kernel = {"forward": "forward_partials", "dh-backward": "backward_hidden"}[cell["pass_name"]]
        for choice in cell["choices"]:
            plan = gpu_check.planned_launches(cell["pass_name"], cell["rows"], vocab, d, de, tied, "bfloat16", False,
                                              132, blocks=(cell["key"], choice))
            launch = next(x for x in plan if x.name == kernel)
            block_m, block_v, warps, stages = choice
            assert (launch.constexprs["BLOCK_M"], launch.constexprs["BLOCK_V"]) == (block_m, block_v)
            assert (launch.num_warps, launch.num_stages) == (warps, stages)
    assert triton_config.BLOCKS == before


def test_precompile_compiles_a_sweep_alternative_for_the_gpu(monkeypatch):
    """The precompile workers (spawned processes) receive a sweep alternative and compile its kernels for
    sm_90 ahead of time (no GPU needed to compile). The workers inherit the environment, and
    ``tests/conftest.py`` turns the interpreter on for a session that also collects ``tests/``."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    vocab, d, de, tied = gpu_check.MODELS["SmolLM2-135M"]
    cell = next(c for c in gpu_check.sweep_cells({"SmolLM2-135M": (vocab, d, de, tied)}, 132)
                if c["setting"] == "blocks" and c["rows"] == 32 and c["pass_name"] == "forward")
    call = ("forward", 32, vocab, d, de, tied, "bfloat16", False, (cell["key"], cell["choices"][1]))
    count, failures, _ = gpu_check.precompile([call], ("cuda", 90, 32), 132, budget_s=300)
    assert count >= 2 and failures == []  # the partials kernel under the alternative, and the combine
