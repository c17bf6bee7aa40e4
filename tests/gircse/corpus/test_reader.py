"""``gircse.corpus.reader``: streamed JSONL / plain-text input, every bad row named by file and line."""
from __future__ import annotations

import gzip

import pytest

from gircse.corpus import reader
from gircse.corpus.reader import CorpusInputError, iter_records, scan

from .corpus_data import corpus_rows, write_jsonl


def test_jsonl_rows_in_file_order_with_string_ids(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 7, "text": "seven"}, {"id": "b", "text": "bee", "x": 1}])
    records = list(iter_records(path))
    assert [(r.row, r.line, r.id, r.text) for r in records] == [(0, 1, "7", "seven"), (1, 2, "b", "bee")]


def test_configurable_fields_gz_and_blank_lines_between_rows(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('{"package": "a", "body": "first"}\n\n   \n{"package": "b", "body": "second"}\n')
    records = list(iter_records(str(path), id_field="package", text_field="body"))
    assert [(r.row, r.line, r.id, r.text) for r in records] == [(0, 1, "a", "first"), (1, 4, "b", "second")]


def test_plain_text_ids_are_line_numbers_and_only_newline_ends_a_line(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\r\npage\x0cbreak and a lone\rcarriage\nlast")
    records = list(iter_records(str(path)))
    assert [(r.id, r.text) for r in records] == [("1", "first"), ("2", "page\x0cbreak and a lone\rcarriage"),
                                                 ("3", "last")]


def test_format_from_the_name_or_forced(tmp_path):
    assert reader.input_format("a.jsonl.gz") == "jsonl" and reader.input_format("a.ndjson") == "jsonl"
    assert reader.input_format("a.txt.gz") == "text" and reader.input_format("a.tsv") == "text"
    assert reader.input_format("a.txt", "jsonl") == "jsonl"
    with pytest.raises(ValueError, match="format must be"):
        reader.input_format("a.txt", "csv")


@pytest.mark.parametrize("content,message", [
    (b'{"id": "a", "text": "x"}\n{"id": "b", "text": "  "}\n', "d.jsonl:2: the text is empty"),
    (b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "d.jsonl:2: duplicate id 'a' (first on line 1)"),
    (b'{"id": 1, "text": "x"}\n{"id": "1", "text": "y"}\n', "duplicate id '1'"),
    (b'{"id": "a", "text": "x"}\n{"id": "b", "text": "y"\n', "d.jsonl:2: invalid JSON"),
    (b'["a", "x"]\n', "d.jsonl:1: expected a JSON object"),
    (b'{"text": "x"}\n', "d.jsonl:1: no 'id' field"),
    (b'{"id": "a", "body": "x"}\n', "d.jsonl:1: no 'text' field"),
    (b'{"id": true, "text": "x"}\n', "'id' must be a string or an integer"),
    (b'{"id": " ", "text": "x"}\n', "'id' is empty"),
    (b'{"id": "a", "text": 3}\n', "'text' must be a string"),
    (b'{"id": "a", "text": "caf\xe9"}\n', "d.jsonl:1: not UTF-8"),
    (b"\n\n", "d.jsonl: no texts"),
])
def test_bad_jsonl_names_the_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(CorpusInputError) as error:
        scan(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_plain_text_names_the_line(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(b"one\n\nthree\n")
    with pytest.raises(CorpusInputError, match=r"d.txt:2: the text is empty"):
        scan(str(path))


def test_truncated_gzip_is_one_error(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    data = gzip.compress(b"".join(b'{"id": "%d", "text": "row %d"}\n' % (i, i) for i in range(2000)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusInputError, match="d.jsonl.gz: cannot be read"):
        scan(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        scan(str(tmp_path / "nope.jsonl"))


def test_scan_counts_rows_and_fingerprints_the_content(tmp_path):
    rows = corpus_rows()
    plain = scan(write_jsonl(tmp_path / "a.jsonl", rows))
    packed = scan(write_jsonl(tmp_path / "b.jsonl.gz", rows))
    assert plain.rows == packed.rows == len(rows)
    assert plain.sha256 == packed.sha256  # the same content, compressed or not
    assert scan(write_jsonl(tmp_path / "c.jsonl", rows[:-1])).sha256 != plain.sha256


def test_colliding_id_hashes_are_not_duplicates(tmp_path, monkeypatch):
    """Duplicates are found through 64-bit hashes; on a collision the ids themselves decide."""
    monkeypatch.setattr(reader, "_id_hash", lambda identifier: 42)
    assert scan(write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}])).rows == 2
    path = write_jsonl(tmp_path / "e.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"},
                                              {"id": "b", "text": "z"}])
    with pytest.raises(CorpusInputError, match=r"e.jsonl:3: duplicate id 'b' \(first on line 2\)"):
        scan(path)


def test_keep_reads_only_the_wanted_rows_and_counts_the_others(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"id": "a", "text": "x"}\n\n{"id": "b", "text": "y"}\nnot json: never parsed\n'
                     b'{"id": "d", "text": "w"}\n')
    records = list(iter_records(str(path), keep=lambda row: row in (1, 3)))
    assert [(r.row, r.line, r.id) for r in records] == [(1, 3, "b"), (3, 5, "d")]
