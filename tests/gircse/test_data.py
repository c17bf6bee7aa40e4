"""JSONL reader (line-numbered errors, .gz, skip) and the Debian builder on synthetic apt snippets."""
import gzip
import json
import os
import subprocess
import sys

import pytest

from gircse.data import DataError, count_rows, iter_rows
from gircse.data import debian


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_iter_rows_valid_gz_and_skip(tmp_path):
    rows = [{"query": f"q{i}", "pos": [f"p{i}"], "neg": [f"n{i}"], "instruction": "ins"} for i in range(5)]
    plain = _write(tmp_path / "a.jsonl", [json.dumps(r) for r in rows[:2]] + [""] + [json.dumps(r) for r in rows[2:]])
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(open(plain).read())
    for path in (plain, str(tmp_path / "a.jsonl.gz")):
        got = list(iter_rows(path))
        assert [r["query"] for r in got] == [f"q{i}" for i in range(5)]
        assert [r["_line"] for r in got] == [1, 2, 4, 5, 6]  # blank line 3 skipped, numbering kept
        assert [r["query"] for r in iter_rows(path, skip=3)] == ["q3", "q4"]
        assert count_rows(path) == 5
    # optional fields
    path = _write(tmp_path / "b.jsonl", [json.dumps({"query": "q", "pos": "p"})])
    (row,) = iter_rows(path)
    assert row["pos"] == ["p"] and row["neg"] == [] and row["instruction"] is None


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"pos": ["p"]}), "'query' must be a non-empty string"),
    (json.dumps({"query": "q"}), "missing 'pos'"),
    (json.dumps({"query": "q", "pos": []}), "at least 1"),
    (json.dumps({"query": "q", "pos": [""]}), r"pos\[0\] must be a non-empty string"),
    (json.dumps({"query": "q", "pos": ["p"], "neg": [3]}), r"neg\[0\]"),
    (json.dumps({"query": "q", "pos": ["p"], "instruction": 5}), "'instruction' must be a string"),
    # "neg" falsy but present is not "no negatives" (it used to become [] silently); null is
    (json.dumps({"query": "q", "pos": ["p"], "neg": 0}), "'neg' must be a list of strings, got int 0"),
    (json.dumps({"query": "q", "pos": ["p"], "neg": False}), "'neg' must be a list of strings, got bool"),
    (json.dumps({"query": "q", "pos": ["p"], "neg": {}}), "'neg' must be a list of strings, got dict"),
    (json.dumps({"query": "q", "pos": ["p"], "neg": ""}), r"neg\[0\] must be a non-empty string"),
    (json.dumps({"query": "q", "pos": ["p", "x"], "neg": ["n", "x"]}), "'x' is in both 'pos' and 'neg'"),
    ('{"query": "caf\\ud800e", "pos": ["p"]}', r"'query' is not valid Unicode: a lone surrogate '\\ud800'"),
    ('{"query": "q", "pos": ["\\udcff"]}', r"pos\[0\] is not valid Unicode"),
    ('{"query": "q", "pos": ["p"], "instruction": "Find \\ud800"}', r"'instruction' is not valid Unicode"),
])
def test_iter_rows_errors_name_the_line(tmp_path, line, message):
    good = json.dumps({"query": "q", "pos": ["p"]})
    path = _write(tmp_path / "bad.jsonl", [good, good, line])
    with pytest.raises(DataError, match=rf"bad.jsonl:3: .*{message}"):
        list(iter_rows(path))


def test_null_neg_and_blank_instruction_mean_none(tmp_path):
    path = _write(tmp_path / "x.jsonl", [json.dumps({"query": "q", "pos": ["p"], "neg": None, "instruction": "  "})])
    (row,) = iter_rows(path)
    assert row["neg"] == [] and row["instruction"] is None


@pytest.mark.parametrize("content, message", [
    ('{"query": "caf\xe9", "pos": ["p"]}\n'.encode("latin-1"), r"x.jsonl:1: not UTF-8 text \(byte 14 of the line"),
    (b'{"query": "q", "pos": ["p"]}\r{"query": "caf\xe9", "pos": ["p"]}\n', r"x.jsonl:1: not UTF-8"),
])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, content, message):
    """A latin-1 file was a bare UnicodeDecodeError ("'utf-8' codec can't decode ..."), naming no file."""
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"query": "q", "pos": ["p"]}\n' * 2 + content)
    with pytest.raises(DataError, match=message.replace("x.jsonl:1", "x.jsonl:3")):
        list(iter_rows(path))


def test_lines_split_as_text_mode_does(tmp_path):
    """"\\r\\n" and a lone "\\r" end lines, as in Python's text mode (the numbering errors refer to)."""
    from gircse.data.jsonl import numbered_lines

    path = tmp_path / "x.jsonl"
    path.write_bytes(b"a\r\nb\rc\n\nd\r")
    assert list(numbered_lines(path)) == [(1, "a\n"), (2, "b"), (3, "c\n"), (4, "\n"), (5, "d")]
    with open(path, encoding="utf-8") as f:
        assert [line.rstrip("\n") for line in f] == [line.rstrip("\n") for _, line in numbered_lines(path)]


def test_gz_that_is_not_gzip_or_is_cut_short_names_the_file(tmp_path):
    """A fake .gz was "Not a gzipped file (b'{\"')" and a truncated one an EOFError traceback, naming no file."""
    rows = [json.dumps({"query": f"q{i}", "pos": ["p"]}) for i in range(3000)]
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"fake.jsonl.gz: not a readable gzip file at its start \(Not a gzipped file"):
        count_rows(fake)
    whole = gzip.compress(("\n".join(rows) + "\n").encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: not a readable gzip file after line \d+ "
                                        r"\(Compressed file ended"):
        list(iter_rows(cut))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        count_rows(tmp_path)


def test_iter_rows_min_neg(tmp_path):
    path = _write(tmp_path / "x.jsonl", [json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]})])
    with pytest.raises(DataError, match="x.jsonl:1: 1 hard negative"):
        list(iter_rows(path, min_neg=2))


TRANSLATION = """Package: {name}
Description-md5: 0123
Description-en: {summary}
 {line1}
 .
 {line2}
"""
SECTIONS = ["games", "science", "sound", "net", "misc"]


def _synthetic(tmp_path, n=200):
    trans, avail = [], []
    for i in range(n):
        section = SECTIONS[i % len(SECTIONS)]
        trans.append(TRANSLATION.format(name=f"pkg{i:03d}", summary=f"summary number {i} for {section}",
                                        line1=f"Package {i} is a {section} tool with a long description that",
                                        line2=f"goes on for a while so that it is long enough {i} " * 3))
        avail.append(f"Package: pkg{i:03d}\nVersion: 1\nSection: {'contrib/' if i % 7 == 0 else ''}{section}\n"
                     f"Tag: role::program,\n implemented-in::c\nDescription: summary\n")
    # a duplicate description (pkg-dup repeats pkg000 with another summary) and a short one
    trans.append(TRANSLATION.format(name="pkg-dup", summary="other summary", line1=trans[0].split("\n")[3].strip(),
                                    line2=trans[0].split("\n")[5].strip()))
    avail.append("Package: pkg-dup\nSection: games\n")
    trans.append("Package: tiny\nDescription-en: tiny summary here\n short\n")
    avail.append("Package: tiny\nSection: games\n")
    (tmp_path / "Translation-en").write_text("\n".join(trans))
    (tmp_path / "dumpavail").write_text("\n".join(avail))
    return str(tmp_path / "Translation-en"), str(tmp_path / "dumpavail")


def test_parsers(tmp_path):
    tpath, apath = _synthetic(tmp_path, n=5)
    trans = debian.parse_translations(open(tpath).read())
    summary, long = trans["pkg001"]
    assert summary == "summary number 1 for science"
    assert long.startswith("Package 1 is a science tool") and "\n" in long  # " ." -> paragraph break
    avail = debian.parse_dumpavail(open(apath).read())
    assert avail["pkg000"] == ("games", ["role::program", "implemented-in::c"])  # contrib/ stripped, tags unfolded


def test_build_deterministic_and_disjoint(tmp_path):
    tpath, apath = _synthetic(tmp_path)
    opts = dict(n_train=100, n_dev=30, n_class_per_section=5, negatives=2, min_chars=60, max_chars=300,
                max_per_section=1000)
    m1 = debian.build(str(tmp_path / "o1"), translations=tpath, dumpavail=apath, **opts)
    m2 = debian.build(str(tmp_path / "o2"), translations=tpath, dumpavail=apath, **opts)
    assert m1["files"] == m2["files"]  # same sha256
    m3 = debian.build(str(tmp_path / "o3"), translations=tpath, dumpavail=apath, seed=1, **opts)
    assert m3["files"]["train.jsonl.gz"]["sha256"] != m1["files"]["train.jsonl.gz"]["sha256"]
    train = list(iter_rows(tmp_path / "o1" / "train.jsonl.gz", min_neg=2))
    dev = list(iter_rows(tmp_path / "o1" / "dev_retrieval.jsonl.gz"))
    cls = [json.loads(l) for l in gzip.open(tmp_path / "o1" / "dev_classification.jsonl.gz", "rt")]
    assert len(train) == 100 and len(dev) == 30
    assert {r["label"] for r in cls} <= set(debian.CLASSIFICATION_SECTIONS) and len(cls) == 5 * 4
    packages = [r["package"] for r in train] + [r["package"] for r in dev] + [r["package"] for r in cls]
    assert len(packages) == len(set(packages))
    assert "tiny" not in packages and not ({"pkg000", "pkg-dup"} <= set(packages))  # short / duplicate dropped
    by_desc = {r["pos"][0]: r["section"] for r in train}
    for r in train:
        assert r["instruction"] == debian.INSTRUCTION and r["pos"][0] not in r["neg"]
        assert all(by_desc[n] == r["section"] for n in r["neg"])  # same-section hard negatives
    assert not {r["pos"][0] for r in dev} & set(by_desc)


def test_cli_build(tmp_path):
    tpath, apath = _synthetic(tmp_path, n=120)
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "gircse.data.debian", "build", "--out", str(out), "--translations", tpath,
                    "--dumpavail", apath, "--n-train", "50", "--n-dev", "10", "--n-class-per-section", "3",
                    "--min-chars", "60"], check=True, capture_output=True)
    assert json.load(open(out / "manifest.json"))["files"]["train.jsonl.gz"]["rows"] == 50


def test_shipped_dataset():
    manifest = json.load(open(debian.shipped_path("manifest.json")))
    assert manifest["files"]["train.jsonl.gz"]["rows"] >= 5000
    path = debian.shipped_path("train.jsonl.gz")
    assert os.path.getsize(path) < 5e6
    first = next(iter_rows(path, min_neg=2))
    assert first["instruction"] == debian.INSTRUCTION


def test_build_examples_takes_numpy_integers(tmp_path):
    import numpy as np

    tpath, apath = _synthetic(tmp_path, n=60)
    trans, avail = debian.parse_translations(open(tpath).read()), debian.parse_dumpavail(open(apath).read())
    opts = dict(n_train=20, n_dev=10, n_class_per_section=2, min_chars=60, max_chars=300)
    assert debian.build_examples(trans, avail, seed=np.int64(3), **opts) == debian.build_examples(trans, avail, seed=3,
                                                                                                 **opts)
    with pytest.raises(TypeError, match="seed must be an int"):
        debian.build_examples(trans, avail, seed=1.5, **opts)


def test_read_jsonl_names_file_and_line(tmp_path):
    from gircse.data.jsonl import read_jsonl

    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,}\n')
    with pytest.raises(DataError, match=r"x.jsonl:3: invalid JSON \(Expecting property name"):
        read_jsonl(path)
