"""gircse.data.wordnet: the held-out WordNet task files (parser, build, shipped files)."""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter

import pytest

from gircse import evaluation
from gircse.data import wordnet
from gircse.data.jsonl import read_jsonl

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by Princeton\n"


def _line(offset, lex_file, pos, words, gloss):
    pairs = " ".join(f"{w} 0" for w in words)
    return f"{offset} {lex_file:02d} {pos} {len(words):02x} {pairs} 000 | {gloss}  \n"


def _write_wordnet(root, n_per_category=3, n_extra=6):
    """A small WordNet directory: n_per_category nouns in each classification category, plus extra
    two-word synsets in every part of speech for retrieval."""
    root.mkdir(parents=True, exist_ok=True)
    noun, verb, adj = [HEADER], [HEADER], [HEADER]
    offset = 1000
    for category in wordnet.CLASSIFICATION_CATEGORIES:
        lex = wordnet.LEXICOGRAPHER_FILES.index(category)
        for i in range(n_per_category):
            offset += 1
            noun.append(_line(f"{offset:08d}", lex, "n", [f"thing{offset}"],
                              f'a distinct {category} definition number {i} of some length; "an example"'))
    for i in range(n_extra):
        offset += 1
        noun.append(_line(f"{offset:08d}", 6, "n", [f"gadget_{i}", f"widget{i}"],
                          f"a made object used for purpose {i} in the home"))
        verb.append(_line(f"{offset:08d}", 38, "v", [f"stroll{i}", f"amble{i}"],
                          f'to go on foot slowly, variant {i}; "they went slowly"'))
        adj.append(_line(f"{offset:08d}", 0, "s", [f"quick{i}(a)", f"rapid{i}"],
                         f"moving fast or happening soon, variant {i}"))
    # a definition that names its word is no retrieval row
    noun.append(_line("00099999", 6, "n", ["hammer", "mallet"], "a hammer with a large head for driving stakes"))
    for name, lines in (("data.noun", noun), ("data.verb", verb), ("data.adj", adj)):
        (root / name).write_text("".join(lines), encoding="utf-8")
    return root


def test_parse_data_file_reads_words_category_and_definition(tmp_path):
    (tmp_path / "data.adj").write_text(HEADER + _line("00020103", 0, "s", ["outback(a)", "remote"],
                                                      'inaccessible and sparsely populated; "an outback town"'))
    (synset,) = wordnet.parse_data_file(str(tmp_path / "data.adj"))
    assert synset == ("00020103", "adj.all", ("outback", "remote"), "inaccessible and sparsely populated")
    (tmp_path / "data.noun").write_text("02084071 05 n 03 dog 0 domestic_dog 0 | a domesticated canid\n")
    with pytest.raises(ValueError, match=r"data.noun:1: not a WordNet data line"):
        wordnet.parse_data_file(str(tmp_path / "data.noun"))


def test_build_is_deterministic_balanced_and_disjoint(tmp_path):
    source = _write_wordnet(tmp_path / "wn")
    first = wordnet.build(str(source), str(tmp_path / "a"), n_retrieval=12, n_per_category=3)
    second = wordnet.build(str(source), str(tmp_path / "b"), n_retrieval=12, n_per_category=3)
    assert first["files"] == second["files"]
    retrieval = read_jsonl(tmp_path / "a" / "task_retrieval.jsonl.gz")
    classification = read_jsonl(tmp_path / "a" / "task_classification.jsonl.gz")
    assert Counter(r["label"] for r in classification) == {c: 3 for c in wordnet.CLASSIFICATION_CATEGORIES}
    assert len(retrieval) == 12 and all(len(r["query"].split(", ")) == 2 for r in retrieval)
    assert not any("hammer" in r["query"] for r in retrieval)
    definitions = [r["pos"][0] for r in retrieval] + [r["text"] for r in classification]
    assert len(set(definitions)) == len(definitions)
    assert all('"' not in d and not d.endswith(";") for d in definitions)
    # both are valid gircse.evaluation task files of the right type
    assert evaluation.load_task(tmp_path / "a" / "task_retrieval.jsonl.gz").type == "retrieval"
    assert evaluation.load_task(tmp_path / "a" / "task_classification.jsonl.gz").type == "classification"
    with pytest.raises(ValueError, match="fewer than n_retrieval=100"):
        wordnet.build(str(source), str(tmp_path / "c"), n_retrieval=100, n_per_category=3)
    with pytest.raises(FileNotFoundError, match="wordnet_dir .* lacks data.noun"):
        wordnet.build(str(tmp_path), str(tmp_path / "d"))


def test_shipped_task_files_match_their_manifest():
    manifest = json.load(open(os.path.join(wordnet.HERE, "manifest.json"), encoding="utf-8"))
    for name in ("retrieval", "classification"):
        path = wordnet.task_path(name)
        entry = manifest["files"][os.path.basename(path)]
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == entry["sha256"]
        assert evaluation.load_task(path).type == name and len(read_jsonl(path)) == entry["rows"]
    with pytest.raises(ValueError, match="name must be one of"):
        wordnet.task_path("sts")
