"""gircse.mteb: GIRCSEEncoder under mteb.evaluate on small local tasks (no network), scores equal to those
computed from GIRCSE.encode directly; the instruction table; ModelMeta."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

mteb = pytest.importorskip("mteb")

from datasets import Dataset, DatasetDict  # noqa: E402  (mteb's dependency)
from mteb.abstasks.pair_classification import AbsTaskPairClassification  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402

from gircse import evaluation  # noqa: E402
from gircse.mteb import GIRCSEEncoder, load_instructions, model_meta  # noqa: E402

COMMON = dict(description="local test task", reference=None, dataset={"path": "local/gircse-test", "revision": "1"},
              category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"], date=None, dialect=None, domains=None,
              task_subtypes=None, license=None, annotations_creators=None, modalities=["text"],
              sample_creation=None, bibtex_citation=None)
QUERIES = ["tallest mountain on earth", "how plants make food", "a language for data science",
           "why sleep matters", "famous tower in paris"]
DOCS = ["Mount Everest is the highest mountain above sea level.",
        "Photosynthesis converts light energy into chemical energy.",
        "Python is popular for data science and machine learning.",
        "Sleep improves memory and concentration.",
        "The Eiffel Tower is a wrought-iron lattice tower in Paris.",
        "The stock market fell after the rate decision.",
        "The Amazon rainforest hosts millions of species."]
PAIRS = [("A man is playing a guitar.", "A person plays an instrument.", 4.2),
         ("A cat sleeps on the sofa.", "The stock market fell sharply.", 0.1),
         ("Kids are playing football.", "Children play soccer outside.", 4.6),
         ("The sun is shining.", "It is a bright sunny day.", 3.9),
         ("He is cooking dinner.", "A plane lands at the airport.", 0.4),
         ("She reads a book.", "A woman is reading.", 4.0)]
QUERY_INSTRUCTION = "Given a question, retrieve passages that answer it"


class LocalRetrieval(AbsTaskRetrieval):
    metadata = TaskMetadata(type="Retrieval", name="GircseLocalRetrieval", main_score="ndcg_at_10", **COMMON)

    def load_data(self, **kwargs):
        split = RetrievalSplitData(
            queries=Dataset.from_list([{"id": f"q{i}", "text": q} for i, q in enumerate(QUERIES)]),
            corpus=Dataset.from_list([{"id": f"d{j}", "text": d} for j, d in enumerate(DOCS)]),
            relevant_docs={f"q{i}": {f"d{i}": 1} for i in range(len(QUERIES))}, top_ranked=None)
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


class LocalSTS(AbsTaskSTS):
    metadata = TaskMetadata(type="STS", name="GircseLocalSTS", main_score="cosine_spearman", **COMMON)
    min_score, max_score = 0, 5

    def load_data(self, **kwargs):
        rows = [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in PAIRS]
        self.dataset = {"default": {"test": Dataset.from_list(rows)}}
        self.data_loaded = True


class LocalPairs(AbsTaskPairClassification):
    metadata = TaskMetadata(type="PairClassification", name="GircseLocalPairs", main_score="max_ap", **COMMON)

    def load_data(self, **kwargs):
        self.dataset = DatasetDict({"test": Dataset.from_dict({
            "sentence1": [a for a, _, _ in PAIRS], "sentence2": [b for _, b, _ in PAIRS],
            "labels": [int(s > 2) for _, _, s in PAIRS]})})
        self.data_loaded = True


INSTRUCTIONS = {"GircseLocalRetrieval": {"query": QUERY_INSTRUCTION, "document": None},
                "GircseLocalSTS": "Retrieve semantically similar text.",
                "GircseLocalPairs": "Retrieve semantically similar text."}


def _run(encoder, tasks):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = mteb.evaluate(encoder, tasks, co2_tracker=False, cache=None, show_progress_bar=False)
    return {r.task_name: r.scores["test"][0] for r in result.task_results}


def test_mteb_scores_equal_scores_from_encode(make_tiny):
    model = make_tiny("llama", k=3)
    scores = _run(GIRCSEEncoder(model, instructions=INSTRUCTIONS), [LocalRetrieval(), LocalSTS(), LocalPairs()])

    q = model.encode(QUERIES, QUERY_INSTRUCTION)
    d = model.encode(DOCS)  # retrieval corpus: bare
    expected = evaluation.retrieval_metrics(q @ d.T, [[i] for i in range(len(QUERIES))])
    assert scores["GircseLocalRetrieval"]["ndcg_at_10"] == pytest.approx(expected["ndcg@10"], abs=1e-5)
    assert scores["GircseLocalRetrieval"]["recall_at_1"] == pytest.approx(expected["recall@1"], abs=1e-5)

    sts_instruction = INSTRUCTIONS["GircseLocalSTS"]
    a = model.encode([p[0] for p in PAIRS], sts_instruction)
    b = model.encode([p[1] for p in PAIRS], sts_instruction)
    cosine = (a * b).sum(1)
    assert scores["GircseLocalSTS"]["cosine_spearman"] == pytest.approx(
        evaluation.spearman(cosine, [p[2] for p in PAIRS]), abs=1e-6)
    assert scores["GircseLocalPairs"]["cosine_ap"] == pytest.approx(
        evaluation.average_precision(cosine, [int(p[2] > 2) for p in PAIRS]), abs=1e-6)


def test_encoder_passes_the_instruction_of_each_side(make_tiny):
    model = make_tiny("llama", k=2)
    calls = []
    original = model.encode
    model.encode = lambda texts, instruction=None, **kw: calls.append((list(texts), instruction)) or original(
        texts, instruction, **kw)
    _run(GIRCSEEncoder(model, instructions=INSTRUCTIONS), [LocalRetrieval(), LocalSTS()])
    by_texts = {tuple(texts): instruction for texts, instruction in calls}
    assert by_texts[tuple(QUERIES)] == QUERY_INSTRUCTION
    assert by_texts[tuple(DOCS)] is None
    assert by_texts[tuple(p[0] for p in PAIRS)] == "Retrieve semantically similar text."


def test_instruction_table_covers_mteb_eng_v2():
    table = load_instructions()
    encoder = GIRCSEEncoder.__new__(GIRCSEEncoder)
    encoder.instructions, encoder._warned = table, set()
    for task in mteb.get_benchmark("MTEB(eng, v2)").tasks:
        meta = task.metadata
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a task missing from the table would warn
            query = encoder.task_instruction(meta, mteb.types.PromptType.query)
            document = encoder.task_instruction(meta, mteb.types.PromptType.document)
        assert query, meta.name
        if meta.type == "Retrieval" and not meta.name.startswith("CQADupstack"):
            assert document is None, meta.name  # retrieval corpora are embedded bare
        else:  # CQADupstack's corpora are questions too: instructed in the authors' table
            assert document, meta.name  # reranking documents and symmetric tasks are instructed
    sci = mteb.get_task("SciDocsRR").metadata
    assert encoder.task_instruction(sci, mteb.types.PromptType.document) == table["SciDocsRR"]["document"]
    assert encoder.task_instruction(mteb.get_task("STS12").metadata, None) == "Retrieve semantically similar text."


def test_unknown_task_warns_and_uses_the_task_prompt(make_tiny):
    encoder = GIRCSEEncoder(make_tiny("llama", k=2))
    meta = LocalRetrieval.metadata.model_copy(update={"prompt": {"query": "Find the answer"}})
    with pytest.warns(UserWarning, match="no instruction for task 'GircseLocalRetrieval'"):
        assert encoder.task_instruction(meta, mteb.types.PromptType.query) == "Find the answer"
    assert encoder.task_instruction(meta, mteb.types.PromptType.document) is None
    with pytest.raises(ValueError, match=r"instructions\['X'\]"):
        GIRCSEEncoder(make_tiny("llama", k=2), instructions={"X": 3})


def test_empty_texts_get_zero_vectors(make_tiny):
    model = make_tiny("llama", k=2)
    encoder = GIRCSEEncoder(model, instructions=INSTRUCTIONS)
    loader = torch.utils.data.DataLoader([{"text": t} for t in ["hello world", " ", "bye"]], batch_size=2,
                                         collate_fn=lambda b: {"text": [x["text"] for x in b]})
    with pytest.warns(UserWarning, match="1 empty text"):
        out = encoder.encode(loader, task_metadata=LocalSTS.metadata, hf_split="test", hf_subset="default")
    assert out.shape == (3, 32) and not out[1].any()
    np.testing.assert_allclose(out[[0, 2]], model.encode(["hello world", "bye"], INSTRUCTIONS["GircseLocalSTS"]),
                               atol=2e-5)


def test_model_meta(make_tiny):
    model = make_tiny("llama", k=3, base_model="tiny-base")
    meta = model_meta(model)
    assert meta.name == "gircse/tiny-base-gircse-k3" and meta.embed_dim == 32 and meta.max_tokens == 512
    assert meta.similarity_fn_name.value == "cosine" and meta.use_instructions
    assert meta.n_parameters == sum(p.numel() for p in model.parameters())
