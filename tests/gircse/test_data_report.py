import pytest

from gircse.data.debian.report import comparison_table, main, plot_k_scaling


def _result(method, ks, base):
    return {"method": method, "k": ks,
            "retrieval": {str(k): {"ndcg@10": base + k / 100, "mrr@10": base, "recall@1": base, "recall@10": base}
                          for k in ks},
            "classification": {str(k): {"knn_accuracy": base + k / 200} for k in ks}}


def test_table_has_one_row_per_model_and_k():
    table = comparison_table({"raw": _result("gircse", [1, 5], 0.1), "eos": _result("causal-eos", [1], 0.3)})
    rows = table.splitlines()[2:]
    assert len(rows) == 3
    assert rows[1].startswith("| raw | gircse | 5 | 0.1500 |")
    assert rows[2].startswith("| eos | causal-eos | - | 0.3100 |")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "k.png"
    plot_k_scaling({"g": _result("gircse", [1, 3, 5], 0.2), "eos": _result("causal-eos", [1], 0.3)}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_unlabelled_results():
    with pytest.raises(SystemExit):
        main(["results.json"])


def test_cli_names_a_malformed_results_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"method": "gircse",')
    with pytest.raises(ValueError, match=r"r.json: invalid JSON"):
        main([f"g={path}"])
