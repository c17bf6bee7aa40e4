"""One report per ``pytest bench/`` run: ``report.json`` (raw numbers) and ``report.md`` (tables).

Benchmarks add sections to the session's :class:`Report` (the ``report`` fixture of
``bench/conftest.py``); at the end of the session it is written to ``bench/results/<machine>/``
(see ``bench.harness.machine_slug``). A table's rows are dicts of raw values (seconds, bytes,
FLOP/s, ratios); its columns say how markdown shows each one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

from .harness import describe

# The order sections appear in, whatever order the tests ran in.
SECTION_ORDER = ("op", "op-small-batch", "cpu-kinds", "decode", "flops", "model", "encode-cost", "profile", "training",
                 "training-step", "serve", "corpus", "regression")


def _fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "ms":
        return f"{value * 1e3:.3g}" if value * 1e3 < 100 else f"{value * 1e3:.0f}"
    if kind == "s":
        return f"{value:.3g}"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "ratio":
        return f"{value:.2f}"
    if kind == "pct":
        return f"{value * 100:+.2f}%"
    if kind == "mib":
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    if kind == "gbs":
        return f"{value / 1e9:.1f}"
    if kind == "tflops":
        return f"{value / 1e12:.3f}"
    if kind == "tera":
        return f"{value / 1e12:.2f}"
    if kind == "giga":
        return f"{value / 1e9:.3f}"
    if kind == "sci":
        return f"{value:.2e}"
    if kind == "int":
        return f"{value:,}"
    if kind == "rate":
        return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"
    return str(value)


@dataclasses.dataclass
class Column:
    key: str
    header: str
    kind: str = "str"  # how markdown formats the raw value: see _fmt


@dataclasses.dataclass
class Table:
    id: str
    title: str
    columns: list[Column]
    rows: list[dict] = dataclasses.field(default_factory=list)
    note: str = ""

    def add(self, **row) -> dict:
        unknown = set(row) - {c.key for c in self.columns} - {"extra"}
        if unknown:
            raise KeyError(f"table {self.id!r} has no columns {sorted(unknown)}")
        self.rows.append(row)
        return row

    def to_markdown(self) -> str:
        lines = [f"**{self.title}**", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(c.header for c in self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        for row in self.rows:
            lines.append("| " + " | ".join(_fmt(row.get(c.key), c.kind) for c in self.columns) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"id": self.id, "title": self.title, "note": self.note,
                "columns": [dataclasses.asdict(c) for c in self.columns], "rows": self.rows}

    @classmethod
    def from_dict(cls, data: dict, *, columns: list[str] | None = None, where=None) -> "Table":
        """A table read back from ``report.json``, optionally with only some ``columns`` (keys present, in
        that order) and the rows for which ``where(row)`` is true."""
        cols = [Column(**c) for c in data["columns"]]
        if columns is not None:
            by_key = {c.key: c for c in cols}
            cols = [by_key[k] for k in columns if k in by_key]  # older reports may lack some
        rows = [r for r in data["rows"] if where is None or where(r)]
        return cls(data["id"], data["title"], cols, rows, data.get("note", ""))


@dataclasses.dataclass
class Section:
    id: str
    title: str
    text: str = ""
    tables: list[Table] = dataclasses.field(default_factory=list)

    def table(self, id: str, title: str, columns: list[tuple], note: str = "") -> Table:
        """A new table; ``columns`` are ``(key, header[, kind])`` tuples."""
        table = Table(f"{self.id}/{id}", title, [Column(*c) for c in columns], note=note)
        self.tables.append(table)
        return table


@dataclasses.dataclass
class Check:
    """One correctness check run before a figure was reported (see ``bench.checks``)."""

    section: str
    what: str
    error: float
    bound: float

    @property
    def passed(self) -> bool:
        return self.error <= self.bound


class Report:
    def __init__(self, env: dict, size: str, command: str = "pytest bench/"):
        self.env, self.size, self.command = env, size, command
        self.sections: dict[str, Section] = {}
        self.checks: list[Check] = []
        self.figures: list[dict] = []
        # the session itself (bench/budget.py): budget, each test's seconds, what the budget left out
        self.run: dict = {}

    def section(self, id: str, title: str, text: str = "") -> Section:
        if id not in SECTION_ORDER:
            raise KeyError(f"unknown report section {id!r}; known: {SECTION_ORDER}")
        if id not in self.sections:
            self.sections[id] = Section(id, title, text)
        elif text:
            self.sections[id].text = text
        return self.sections[id]

    def record_check(self, section: str, what: str, error: float, bound: float) -> Check:
        check = Check(section, what, float(error), float(bound))
        self.checks.append(check)
        return check

    def _ordered(self) -> list[Section]:
        return [self.sections[s] for s in SECTION_ORDER if s in self.sections]

    def to_dict(self) -> dict:
        return {
            "environment": self.env, "size": self.size, "command": self.command,
            "sections": [{"id": s.id, "title": s.title, "text": s.text, "tables": [t.to_dict() for t in s.tables]}
                         for s in self._ordered()],
            "checks": [dict(dataclasses.asdict(c), passed=c.passed) for c in self.checks],
            "figures": self.figures,
            "run": self.run,
        }

    def to_markdown(self) -> str:
        env = self.env
        dirty = " (with uncommitted changes)" if env.get("git_dirty") else ""
        lines = [
            "# gircse benchmark report", "",
            f"- Machine: {describe(env)}",
            f"- Run: `{self.command}` (size `{self.size}`), {env['date_utc']} UTC, commit "
            f"`{(env.get('git_commit') or 'unknown')[:12]}`{dirty}, Python {env['python']}, peft {env.get('peft')}",
            "- Every ratio compares figures measured side by side in this run (round-robin, best of the "
            "repetitions). `cpu busy` = process CPU seconds / wall seconds of the measured call: far below "
            "the thread count means the process was waiting, e.g. for other load on a shared machine.",
        ]
        if self.run.get("wall_s") is not None:
            budget = self.run.get("budget_s")
            skipped = self.run.get("skipped_for_budget") or []
            lines.append(f"- Session: {self.run['wall_s']:.0f} s wall, {len(self.run.get('tests', []))} tests run"
                         + (f", budget {budget:.0f} s (`--bench-budget`)" if budget else ", no time budget")
                         + (f"; **not run for the budget** ({len(skipped)}): "
                            + ", ".join(f"`{s['test']}` (~{s['estimate_s']:.0f} s)" for s in skipped)
                            if skipped else "") + ".")
        failed = [c for c in self.checks if not c.passed]
        lines.append(f"- Correctness checks before timing: {len(self.checks) - len(failed)} of {len(self.checks)} "
                     "passed (relative error = max |result - reference| / max |reference|; bounds in "
                     "`bench/checks.py`)." + (" **Failed:** " + "; ".join(c.what for c in failed) if failed else ""))
        for section in self._ordered():
            lines += ["", f"## {section.title}", ""]
            if section.text:
                lines += [section.text.strip(), ""]
            for table in section.tables:
                lines += [table.to_markdown(), ""]
            checks = [c for c in self.checks if c.section == section.id]
            if checks:
                worst = max(checks, key=lambda c: c.error / c.bound if c.bound else math.inf)
                lines.append(f"Checks: {sum(c.passed for c in checks)} of {len(checks)} passed; closest to its "
                             f"bound: {worst.what} ({worst.error:.2e} <= {worst.bound:.2e}).")
        for fig in self.figures:
            lines += ["", f"![{fig['caption']}]({fig['path']})"]
        return "\n".join(lines).rstrip() + "\n"

    def write(self, directory: str) -> tuple[str, str]:
        os.makedirs(directory, exist_ok=True)
        json_path, md_path = os.path.join(directory, "report.json"), os.path.join(directory, "report.md")
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, default=float)
            f.write("\n")
        with open(md_path, "w", encoding="utf-8") as f:
            f.write(self.to_markdown())
        return json_path, md_path


def load(path: str) -> dict:
    """A written ``report.json`` (a directory holding one is accepted too)."""
    if os.path.isdir(path):
        path = os.path.join(path, "report.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def find_table(report: dict, table_id: str) -> dict | None:
    for section in report["sections"]:
        for table in section["tables"]:
            if table["id"] == table_id:
                return table
    return None
