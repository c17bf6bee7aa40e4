"""AOT gate: every kernel in every dispatcher configuration compiles for sm_80 and sm_90 (no GPU needed)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_every_config_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-m", "gircse_kernels.triton_aot", "--arch", "80", "90"],
                         capture_output=True, text=True, env=env, timeout=1200)
    print(res.stdout)  # the registers / spills / shared-memory table (pytest -s shows it)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.split()[:1] and line.split()[0] in
            ("forward_partials", "combine", "backward_hidden", "backward_weights")]
    from gircse_kernels.triton_aot import dispatcher_configs

    configs = dispatcher_configs()
    # 3 kernels x 2 variants x each config, plus one combine per config; for both architectures.
    assert len(rows) == 2 * len(configs) * (3 * 2) + 2 * len({(c.block_m, c.block_v, c.block_d, c.block_de)
                                                              for d, c in configs if d.itemsize == 4})
    assert {r[1] for r in rows} == {"80", "90"}
    assert {r[0] for r in rows} == {"forward_partials", "combine", "backward_hidden", "backward_weights"}


def test_interpreter_upcast_is_off_in_compiled_kernels():
    from gircse_kernels.triton_aot import VARIANTS, _kernel_specs, dispatcher_configs

    dtype, cfg = dispatcher_configs()[0]
    for _name, _fn, _sig, constexprs in _kernel_specs(cfg, dtype, VARIANTS["plain"]):
        assert constexprs.get("UPCAST", False) is False
