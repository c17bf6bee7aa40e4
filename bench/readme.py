"""The README's performance section, generated from a run's ``report.json``.

    python -m bench.readme bench/results/<machine>/report.json > performance.md

Prints markdown (the lead pastes it into README.md): the machine and run, then the headline tables
of each section present -- the op at every shape measured (forward and forward+backward with dh),
the decode step's bandwidth, the paper's Table 6 for Mistral-7B and the FlopCounterMode agreement,
encode time ratios against the FLOPs prediction, the decode-step profile, and training steps.
"""
from __future__ import annotations

import os
import sys

from .harness import REPO, describe
from .report import Table, find_table, load


def _table(report, table_id, **kwargs) -> str | None:
    data = find_table(report, table_id)
    if data is None:
        return None
    table = Table.from_dict(data, **kwargs)
    return table.to_markdown() if table.rows else None


def readme_section(report: dict, report_path: str) -> str:
    env = report["environment"]
    where = os.path.relpath(os.path.dirname(os.path.abspath(report_path)), REPO)
    commit = (env.get("git_commit") or "unknown")[:12]
    parts = [
        "## Performance", "",
        f"Measured by `{report['command']}` (size `{report['size']}`) on {describe(env)}; "
        f"{env['date_utc']} UTC, commit `{commit}`{' + local changes' if env.get('git_dirty') else ''}. "
        f"Full report: [`{where}/report.md`]({where}/report.md) (raw numbers in `report.json`). Every ratio "
        "compares figures measured side by side in that run; each figure was checked against the reference "
        f"first ({sum(c['passed'] for c in report['checks'])} of {len(report['checks'])} checks passed).",
    ]
    blocks = [
        ("op/grid", dict(columns=["shape", "dtype", "B", "pass", "naive", "best", "best_vs_naive", "best_vs_peer",
                                  "gbs", "tflops", "naive_mib", "best_mib"],
                         where=lambda r: r.get("pass") != "fwd+bwd all")),
        ("decode/steps", dict(columns=["shape", "dtype", "B", "config", "step", "gbs", "fraction"],
                              where=lambda r: r.get("B") == 1)),
        ("flops/table6", dict(columns=["model", "n", "method", "k", "paper", "ours", "diff", "mixture", "executed",
                                       "kv_mib"],
                              where=lambda r: r.get("model") == "mistral-7b" and r.get("n") == 512)),
        ("flops/counter", {}),
        ("model/encode", dict(columns=["n", "method", "k", "seconds", "texts_per_s", "ratio", "predicted", "gap",
                                       "roofline", "roofline_gap", "peak_mib"])),
        ("profile/decode-step", {}),
        ("training/steps", dict(columns=["way", "gradcache", "seconds", "ratio", "peak_mib", "mem_ratio"])),
        ("serve/load", dict(columns=["mode", "requests_per_s", "texts_per_s", "p50", "p99", "mean_batch", "speedup"])),
    ]
    for table_id, kwargs in blocks:
        text = _table(report, table_id, **kwargs)
        if text:
            parts += ["", text]
    for fig in report.get("figures", []):
        parts += ["", f"![{fig['caption']}]({where}/{fig['path']})"]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.readme bench/results/<machine>/report.json", file=sys.stderr)
        return 2
    path = argv[0] if argv[0].endswith(".json") else os.path.join(argv[0], "report.json")
    sys.stdout.write(readme_section(load(path), path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
