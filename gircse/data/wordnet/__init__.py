"""Held-out evaluation text from another domain than Debian: English dictionary definitions (WordNet 3.0).

The shipped model is trained and tuned on Debian package descriptions only. These two task files
measure whether what it learned carries over to text it was never trained or tuned on: general
English vocabulary and definitions, no software. Both are ``gircse.evaluation`` task files
(``gircse eval --task ...``; ``gircse.evaluation.evaluate(model, task, ks=...)``).

* ``task_retrieval.jsonl.gz``: ``{"query": the synonyms of a synset, "pos": [its definition],
  "instruction": RETRIEVAL_INSTRUCTION}``, 500 rows; the corpus is the 500 definitions. The task: find a
  word group's definition ("car, auto, automobile, machine, motorcar" -> "a motor vehicle with four
  wheels; ..."). Only synsets with at least two words, and whose definition does not contain any of
  them (no lexical shortcut), from nouns, verbs and adjectives.
* ``task_classification.jsonl.gz``: ``{"text": a noun's definition, "label": its lexicographer file
  (WordNet's semantic category, e.g. noun.animal), "instruction": CLASSIFICATION_INSTRUCTION}``, 40 per
  category of ``CLASSIFICATION_CATEGORIES`` (480 rows); chance is 1/12.
* ``manifest.json``: counts, seed, options, each file's SHA-256.

Source: the ``wordnet-base`` Debian package (``apt-get download wordnet-base`` and
``dpkg-deb -x wordnet-base_*.deb DIR``; the files are in ``DIR/usr/share/wordnet``). The build is
deterministic: the same files and seed give byte-identical output. WordNet 3.0 Copyright 2006 by
Princeton University, redistributed under its license (``LICENSE`` in this directory).
"""
from __future__ import annotations

import json
import os
import random
import re
from typing import NamedTuple

from ..jsonl import write_jsonl_gz

__all__ = ["CLASSIFICATION_CATEGORIES", "CLASSIFICATION_INSTRUCTION", "LEXICOGRAPHER_FILES",
           "RETRIEVAL_INSTRUCTION", "Synset", "build", "parse_data_file", "task_path"]

HERE = os.path.dirname(os.path.abspath(__file__))
TASK_FILES = {"retrieval": "task_retrieval.jsonl.gz", "classification": "task_classification.jsonl.gz"}
RETRIEVAL_INSTRUCTION = "Given a group of English synonyms, retrieve their dictionary definition"
CLASSIFICATION_INSTRUCTION = "Classify the dictionary definition of a noun into its semantic category"
# WordNet 3.0's lexicographer files by number (lexnames(5WN)); the data files name them by number only.
LEXICOGRAPHER_FILES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl")
# Twelve noun categories whose members a reader tells apart from the definition alone (as the Debian
# classification task's twelve sections); the vaguer ones (act, attribute, state, ...) are left out.
CLASSIFICATION_CATEGORIES = ("noun.animal", "noun.artifact", "noun.body", "noun.communication", "noun.feeling",
                             "noun.food", "noun.location", "noun.person", "noun.plant", "noun.quantity",
                             "noun.substance", "noun.time")
RETRIEVAL_PARTS = ("data.noun", "data.verb", "data.adj")


class Synset(NamedTuple):
    """One line of a WordNet data file."""
    offset: str                 # the synset's byte offset in its file (its id within one part of speech)
    category: str               # lexicographer file, e.g. noun.animal
    words: tuple[str, ...]      # the synonyms, as written in text
    definition: str             # the gloss without its quoted examples


def _definition(gloss: str) -> str:
    """The definition part of a gloss: ``def; "example"; "example"`` -> ``def`` (whitespace normalized)."""
    quote = gloss.find('"')
    text = gloss if quote < 0 else gloss[:quote]
    return re.sub(r"\s+", " ", text).strip().rstrip(";").strip()


def parse_data_file(path: str) -> list[Synset]:
    """Every synset of a WordNet ``data.*`` file (wndb(5WN)): ``offset lex_filenum ss_type w_cnt (word lex_id)*
    ... | gloss``; the license header (lines starting with two spaces) is skipped. Words lose their syntactic
    marker (``(a)``, ``(p)``, ``(ip)``) and have underscores as spaces."""
    synsets = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("  ") or not line.strip():
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            try:
                offset, lex_file, count = fields[0], int(fields[1]), int(fields[3], 16)
                words = tuple(re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * count:2])
                category = LEXICOGRAPHER_FILES[lex_file]
            except (IndexError, ValueError) as e:
                raise ValueError(f"{path}:{number}: not a WordNet data line ({e})") from None
            if not sep or len(words) != count:
                raise ValueError(f"{path}:{number}: not a WordNet data line (no gloss or too few words)")
            synsets.append(Synset(offset, category, words, _definition(gloss)))
    return synsets


def _names_a_word(definition: str, words) -> bool:
    """Whether a definition contains one of the words (or a token of 4+ letters of a multi-word one)."""
    text = definition.lower()
    tokens = {t for w in words for t in re.findall(r"[a-z]{4,}", w.lower())} | {w.lower() for w in words}
    return any(re.search(rf"\b{re.escape(t)}", text) for t in tokens)


def build(wordnet_dir: str, out: str, *, seed: int = 0, n_retrieval: int = 500, n_per_category: int = 40,
          min_chars: int = 30) -> dict:
    """Write the two task files and ``manifest.json`` to ``out`` from the data files in ``wordnet_dir``;
    returns the manifest. A synset appears in at most one task, and no definition twice."""
    missing = [name for name in RETRIEVAL_PARTS if not os.path.isfile(os.path.join(wordnet_dir, name))]
    if missing:
        raise FileNotFoundError(f"wordnet_dir {wordnet_dir} lacks {', '.join(missing)}; pass the directory with "
                                "WordNet's data files (usr/share/wordnet of the wordnet-base package)")
    rng = random.Random(seed)
    seen: set[str] = set()
    by_part = {name: parse_data_file(os.path.join(wordnet_dir, name)) for name in RETRIEVAL_PARTS}

    def fresh(synset: Synset) -> bool:
        return len(synset.definition) >= min_chars and synset.definition.lower() not in seen

    classification = []
    for category in CLASSIFICATION_CATEGORIES:
        pool = [s for s in by_part["data.noun"] if s.category == category and fresh(s)]
        if len(pool) < n_per_category:
            raise ValueError(f"{category}: {len(pool)} usable definitions, fewer than n_per_category={n_per_category}")
        for s in rng.sample(pool, n_per_category):
            seen.add(s.definition.lower())
            classification.append({"text": s.definition, "label": category, "instruction": CLASSIFICATION_INSTRUCTION,
                                   "synset": f"{s.category}:{s.offset}"})
    pool = [s for name in RETRIEVAL_PARTS for s in by_part[name]
            if len(s.words) >= 2 and fresh(s) and not _names_a_word(s.definition, s.words)]
    retrieval = []
    for s in rng.sample(pool, len(pool)):
        if len(retrieval) == n_retrieval:
            break
        if s.definition.lower() in seen:  # two synsets may share a definition
            continue
        seen.add(s.definition.lower())
        retrieval.append({"query": ", ".join(s.words), "pos": [s.definition], "instruction": RETRIEVAL_INSTRUCTION,
                          "synset": f"{s.category}:{s.offset}"})
    if len(retrieval) < n_retrieval:
        raise ValueError(f"{len(retrieval)} usable synsets for retrieval, fewer than n_retrieval={n_retrieval}")
    os.makedirs(out, exist_ok=True)
    manifest = {"source": "WordNet 3.0 (Debian wordnet-base)", "seed": seed, "min_chars": min_chars,
                "retrieval_instruction": RETRIEVAL_INSTRUCTION,
                "classification_instruction": CLASSIFICATION_INSTRUCTION, "files": {}}
    for name, rows in (("retrieval", retrieval), ("classification", classification)):
        digest = write_jsonl_gz(os.path.join(out, TASK_FILES[name]), rows)
        manifest["files"][TASK_FILES[name]] = {"rows": len(rows), "sha256": digest}
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return manifest


def task_path(name: str) -> str:
    """Path of a shipped task file: ``name`` is "retrieval" or "classification"."""
    if name not in TASK_FILES:
        raise ValueError(f"name must be one of {tuple(TASK_FILES)}, got {name!r}")
    path = os.path.join(HERE, TASK_FILES[name])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not shipped; build it with python -m gircse.data.wordnet --wordnet DIR")
    return path


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gircse.data.wordnet", description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", default="/usr/share/wordnet",
                        help="directory with WordNet's data.noun, data.verb, data.adj (default: %(default)s)")
    parser.add_argument("--out", default=HERE, help="output directory (default: the package's data directory)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = build(args.wordnet, args.out, seed=args.seed)
    for name, info in manifest["files"].items():
        print(f"{os.path.join(args.out, name)}  {info['rows']} rows  sha256 {info['sha256']}")
    return 0
