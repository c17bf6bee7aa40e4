"""``gircse.corpus.ray_data.RayEncoder``: the encoding of ``GIRCSE.encode_documents`` as a Ray Data
``map_batches`` callable; run on a local Ray (2 CPUs, 2 actors) when ``ray`` is installed."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from gircse.corpus.ray_data import RayEncoder

from .corpus_data import TEXTS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_batches_get_the_documents_embeddings(tiny_dir, tiny_model):
    encoder = RayEncoder(tiny_dir, instruction="Represent it", batch_size=3)
    batch = {"id": np.array(["a", "b", "c", "d"]), "text": np.array(TEXTS[:4])}
    out = encoder(batch)
    assert list(out) == ["id", "text", "embedding"] and out["embedding"].dtype == np.float32
    np.testing.assert_allclose(out["embedding"], tiny_model.encode_documents(TEXTS[:4], "Represent it"), atol=1e-5)
    import pandas as pd

    frame = RayEncoder(tiny_dir, text_column="body", output_column="vec")(pd.DataFrame({"body": TEXTS[:2]}))
    np.testing.assert_allclose(np.stack(frame["vec"]), tiny_model.encode_documents(TEXTS[:2]), atol=1e-5)
    with pytest.raises(ValueError, match=r"no column 'text' \(its columns: \['body'\]\)"):
        encoder({"body": np.array(["x"])})
    with pytest.raises(ValueError, match="text_column must be a non-empty str"):
        RayEncoder(tiny_dir, text_column="")


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install 'gircse[ray]'); the Ray Data run is skipped")
def test_map_batches_on_a_local_ray(tiny_dir, tiny_model):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}})
    try:
        ds = ray.data.from_items([{"id": f"doc-{i}", "text": t} for i, t in enumerate(TEXTS)])
        rows = ds.map_batches(RayEncoder, fn_constructor_kwargs={"model": tiny_dir, "batch_size": 4}, batch_size=5,
                              compute=ray.data.ActorPoolStrategy(size=2)).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["id"] for r in rows) == sorted(f"doc-{i}" for i in range(len(TEXTS)))
    got = np.stack([r["embedding"] for r in sorted(rows, key=lambda r: int(r["id"].split("-")[1]))])
    np.testing.assert_allclose(got, tiny_model.encode_documents(TEXTS), atol=1e-5)
