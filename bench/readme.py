"""The generated block of docs/performance.md, from a run's ``report.json``.

    python -m bench.readme bench/results/<machine>/report.json            # rewrites the block in place
    python -m bench.readme bench/results/<machine>/report.json --stdout   # prints it instead

The block sits between the ``BEGIN`` and ``END`` marker lines of docs/performance.md; the reading of the run
around it is written by hand and left as it is. The block names the machine and run, then holds the headline
tables of each section present -- the op at every shape measured (forward and forward+backward with dh), the
decode step's bandwidth, the paper's Table 6 for Mistral-7B and the FlopCounterMode agreement, encode time
ratios against the FLOPs prediction, the decode-step profile, training steps and the server load test -- and
the run's plots. (The module is named for the README, where the block lived before docs/ existed.)
"""
from __future__ import annotations

import argparse
import os
import sys

from .harness import REPO, describe
from .report import Table, find_table, load

PAGE = os.path.join(REPO, "docs", "performance.md")
BEGIN = "<!-- begin generated block: python -m bench.readme REPORT.json (edit the report, not this block) -->"
END = "<!-- end generated block -->"


def _table(report, table_id, **kwargs) -> str | None:
    data = find_table(report, table_id)
    if data is None:
        return None
    table = Table.from_dict(data, **kwargs)
    return table.to_markdown() if table.rows else None


def readme_section(report: dict, report_path: str, page_dir: str = os.path.dirname(PAGE)) -> str:
    """The block's markdown; its links are relative to ``page_dir``, the directory of the page it goes in."""
    env = report["environment"]
    report_dir = os.path.dirname(os.path.abspath(report_path))
    where, shown = os.path.relpath(report_dir, page_dir), os.path.relpath(report_dir, REPO)
    commit = (env.get("git_commit") or "unknown")[:12]
    parts = [
        "## Performance of the default benchmark run", "",
        f"Measured by `{report['command']}` (size `{report['size']}`) on {describe(env)}; "
        f"{env['date_utc']} UTC, commit `{commit}`{' + local changes' if env.get('git_dirty') else ''}. "
        f"Full report: [`{shown}/report.md`]({where}/report.md) (raw numbers in `report.json`). Every ratio "
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


def write_page(section: str, page: str = PAGE) -> None:
    """Replace what lies between the page's marker lines with ``section``; the rest of the page stays."""
    with open(page, encoding="utf-8") as f:
        text = f.read()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{page}: expected the marker lines {BEGIN!r} and then {END!r} around the generated block")
    with open(page, "w", encoding="utf-8") as f:
        f.write(text[:start + len(BEGIN)] + "\n" + section + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="a run's report.json, or the directory holding it")
    parser.add_argument("--page", default=PAGE, help="the page whose generated block is rewritten "
                                                     "(default: docs/performance.md)")
    parser.add_argument("--stdout", action="store_true", help="print the block instead of rewriting the page")
    args = parser.parse_args(argv)
    path = args.report if args.report.endswith(".json") else os.path.join(args.report, "report.json")
    section = readme_section(load(path), path, os.path.dirname(os.path.abspath(args.page)))
    if args.stdout:
        sys.stdout.write(section)
    else:
        write_page(section, args.page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
