"""Debian package descriptions as contrastive training data, plus two held-out dev tasks.

Sources (both offline once ``apt-get -o Acquire::Languages=en update`` has run):

* ``/var/lib/apt/lists/*_i18n_Translation-en*`` (lz4, gz, xz or plain): ``Package:`` stanzas whose
  ``Description-en:`` is a one-line summary followed by the long description;
* ``apt-cache dumpavail``: each package's ``Section:`` (and ``Tag:``).

Output (``python -m gircse.data.debian build --out DIR``, whose command line is ``gircse.cli.debian``;
all files gzip'd JSONL, mtime 0, so the same inputs and seed give byte-identical files):

* ``train.jsonl.gz``: ``{"query": summary, "pos": [long description], "neg": [descriptions of other
  packages of the same section], "instruction": INSTRUCTION, "package", "section"}``;
* ``dev_retrieval.jsonl.gz``: the same format for held-out packages (no package, description or
  summary shared with train); the retrieval corpus is every row's ``pos`` (the task: find each
  summary's description among all dev descriptions);
* ``dev_classification.jsonl.gz``: ``{"text": long description, "label": section, "package"}`` for
  other held-out packages from a fixed list of well-separated sections (``CLASSIFICATION_SECTIONS``),
  balanced per section; ``CLASSIFICATION_INSTRUCTION`` is the query instruction;
* ``manifest.json``: counts, per-section counts, seed, options and the sha256 of each file.

Cleaning: descriptions are unfolded (continuation lines joined, `` .`` lines become paragraph breaks),
whitespace normalized and cut at a word boundary to ``max_chars``; packages with a short long
description are dropped; duplicate descriptions and duplicate summaries keep only their first package
(sorted by name), so ``foo`` and ``foo-data`` with the same text never become each other's negatives;
no section contributes more than ``max_per_section`` packages (libs/libdevel/perl/python would
otherwise dominate with near-template texts).
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import random
import re
import subprocess
from collections import defaultdict

from ..jsonl import write_jsonl_gz

__all__ = [
    "CLASSIFICATION_INSTRUCTION", "CLASSIFICATION_SECTIONS", "INSTRUCTION", "build", "build_examples",
    "parse_dumpavail", "parse_translations", "read_translation_files", "shipped_path",
]

INSTRUCTION = "Given a one-line summary of a Debian package, retrieve the package's full description"
CLASSIFICATION_INSTRUCTION = "Classify the Debian package description into its archive section"
CLASSIFICATION_SECTIONS = ("games", "science", "sound", "graphics", "mail", "editors", "database",
                           "fonts", "math", "video", "web", "net")
DEFAULT_TRANSLATIONS = "/var/lib/apt/lists/*_i18n_Translation-en*"
HERE = os.path.dirname(os.path.abspath(__file__))


def shipped_path(name: str = "train.jsonl.gz") -> str:
    """Path of a shipped file (``train.jsonl.gz``, ``dev_retrieval.jsonl.gz``, ``dev_classification.jsonl.gz``,
    ``manifest.json``)."""
    path = os.path.join(HERE, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not shipped; build it with python -m gircse.data.debian build --out {HERE}")
    return path


# ---------------------------------------------------------------------- parsing
def _stanzas(text: str):
    """Deb822 stanzas as lists of (field, value-with-continuations) in file order."""
    fields: list[list] = []
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
                fields = []
            continue
        if line[0] in " \t":
            if fields:
                fields[-1][1] += "\n" + line
            continue
        key, _, value = line.partition(":")
        fields.append([key.strip(), value.strip()])
    if fields:
        yield fields


def _unfold_description(body: str) -> str:
    """Long description lines (each starting with a space) to text: `` .`` = paragraph break."""
    paragraphs, current = [], []
    for line in body.splitlines():
        line = line[1:] if line.startswith(" ") else line
        if line.strip() == ".":
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        if line.strip():
            current.append(line.strip())
    if current:
        paragraphs.append(" ".join(current))
    return "\n".join(re.sub(r"\s+", " ", p).strip() for p in paragraphs)


def parse_translations(text: str) -> dict[str, tuple[str, str]]:
    """``{package: (summary, long_description)}`` from Translation-en text (first occurrence wins)."""
    out: dict[str, tuple[str, str]] = {}
    for stanza in _stanzas(text):
        fields = dict((k, v) for k, v in stanza)
        package, description = fields.get("Package"), fields.get("Description-en")
        if not package or not description or package in out:
            continue
        summary, _, body = description.partition("\n")
        out[package] = (re.sub(r"\s+", " ", summary).strip(), _unfold_description(body))
    return out


def parse_dumpavail(text: str) -> dict[str, tuple[str, list[str]]]:
    """``{package: (section, tags)}`` from ``apt-cache dumpavail`` output; ``contrib/x`` -> ``x``."""
    out: dict[str, tuple[str, list[str]]] = {}
    for stanza in _stanzas(text):
        fields = dict((k, v) for k, v in stanza)
        package, section = fields.get("Package"), fields.get("Section")
        if not package or not section or package in out:
            continue
        tags = [t.strip() for t in fields.get("Tag", "").replace("\n", " ").split(",") if t.strip()]
        out[package] = (section.split("/")[-1].strip(), tags)
    return out


def _decompress(path: str) -> str:
    if path.endswith(".lz4"):
        try:
            import lz4.frame  # optional python package

            with open(path, "rb") as f:
                return lz4.frame.decompress(f.read()).decode("utf-8")
        except ImportError:
            return subprocess.run(["lz4", "-dc", path], check=True, capture_output=True).stdout.decode("utf-8")
    if path.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    if path.endswith(".xz"):
        import lzma

        with lzma.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_translation_files(pattern: str = DEFAULT_TRANSLATIONS) -> dict[str, tuple[str, str]]:
    paths = sorted(p for p in glob.glob(pattern) if not p.endswith(".diff") and os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"no Translation-en files match {pattern!r}; run "
                                "'apt-get -o Acquire::Languages=en update' (and 'apt-get install lz4')")
    merged: dict[str, tuple[str, str]] = {}
    for path in paths:  # sorted: bookworm_main before bookworm-security/-updates is fine; first wins
        for package, value in parse_translations(_decompress(path)).items():
            merged.setdefault(package, value)
    return merged


def _dumpavail_text(path: str | None) -> str:
    if path:
        return _decompress(path)
    return subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True).stdout.decode("utf-8", "replace")


# ---------------------------------------------------------------------- building
def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip(" ,;:") + " ..."


def build_examples(translations: dict[str, tuple[str, str]], sections: dict[str, tuple[str, list[str]]], *,
                   seed: int = 0, n_train: int = 6000, n_dev: int = 500, n_class_per_section: int = 40,
                   negatives: int = 2, min_chars: int = 120, max_chars: int = 700,
                   max_per_section: int = 700) -> dict[str, list[dict]]:
    """``{"train": rows, "dev_retrieval": rows, "dev_classification": rows}`` (deterministic given seed)."""
    from ...validation import as_int

    rng = random.Random(as_int("seed", seed))  # random.Random refuses numpy integers
    seen_desc, seen_summary = set(), set()
    by_section: dict[str, list[dict]] = defaultdict(list)
    for package in sorted(translations):
        if package not in sections:
            continue
        summary, long = translations[package]
        long = _cut(long, max_chars)
        if len(long) < min_chars or len(summary) < 8:
            continue
        key_d, key_s = long.lower(), summary.lower()
        if key_d in seen_desc or key_s in seen_summary:
            continue
        seen_desc.add(key_d)
        seen_summary.add(key_s)
        by_section[sections[package][0]].append({"package": package, "summary": summary, "description": long,
                                                 "section": sections[package][0]})
    # Classification: held out first, balanced, from well-separated sections.
    classification = []
    for section in CLASSIFICATION_SECTIONS:
        pool = by_section.get(section, [])
        rng.shuffle(pool)
        take = min(n_class_per_section, len(pool) // 4)
        classification += [{"text": e["description"], "label": section, "package": e["package"]} for e in pool[:take]]
        by_section[section] = pool[take:]
    # Cap each section, then split the rest into dev retrieval / train.
    pool = []
    for section in sorted(by_section):
        entries = list(by_section[section])
        rng.shuffle(entries)
        pool += entries[:max_per_section]
    rng.shuffle(pool)
    dev, train = pool[:n_dev], pool[n_dev:n_dev + n_train]

    def rows(entries):
        groups = defaultdict(list)
        for e in entries:
            groups[e["section"]].append(e)
        out = []
        for e in entries:
            others = [o for o in groups[e["section"]] if o is not e]
            negs = rng.sample(others, min(negatives, len(others)))
            out.append({"query": e["summary"], "pos": [e["description"]], "neg": [o["description"] for o in negs],
                        "instruction": INSTRUCTION, "package": e["package"], "section": e["section"]})
        return out

    rng.shuffle(classification)
    return {"train": rows(train), "dev_retrieval": rows(dev), "dev_classification": classification}


def build(out: str, *, translations: str = DEFAULT_TRANSLATIONS, dumpavail: str | None = None,
          **options) -> dict:
    """Build the three files and ``manifest.json`` in ``out``; returns the manifest."""
    trans = read_translation_files(translations)
    sections = parse_dumpavail(_dumpavail_text(dumpavail))
    splits = build_examples(trans, sections, **options)
    os.makedirs(out, exist_ok=True)
    manifest = {"seed": options.get("seed", 0), "options": options, "instruction": INSTRUCTION,
                "classification_instruction": CLASSIFICATION_INSTRUCTION,
                "source_packages": {"translations": len(trans), "with_section": len(set(trans) & set(sections))},
                "files": {}}
    for name, rows in splits.items():
        digest = write_jsonl_gz(os.path.join(out, f"{name}.jsonl.gz"), rows)
        key = "label" if name == "dev_classification" else "section"
        per_section = defaultdict(int)
        for r in rows:
            per_section[r[key]] += 1
        manifest["files"][f"{name}.jsonl.gz"] = {"rows": len(rows), "sha256": digest,
                                                  "per_section": dict(sorted(per_section.items()))}
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return manifest
