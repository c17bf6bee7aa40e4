"""``gircse encode-corpus``: embed a corpus into resumable shards, one process or many under torchrun.

    gircse encode-corpus docs.jsonl.gz out/ --shard-size 10000
    torchrun --nproc_per_node 4 -m gircse encode-corpus docs.jsonl.gz out/     # each rank its own shards

Everything that needs no model is checked first (options, every input row, OUT_DIR against an earlier run), so
bad input is one line and exit status 2 before the model loads. Under torchrun each rank takes one GPU
(``cuda:LOCAL_RANK``) on a GPU machine; on CPU the cores are divided between the ranks on a node.
"""
from __future__ import annotations

import argparse
import os
import sys

from .common import _add_model_arguments, _load, check_model_options, int_at_least


def add_encode_corpus_parser(sub) -> None:
    parser = sub.add_parser("encode-corpus", help="embed a corpus (JSONL or text, .gz ok) into resumable shards; "
                                                  "torchrun spreads the shards over processes")
    parser.add_argument("input", metavar="INPUT", help="JSONL rows with an id and a text field (.jsonl, .ndjson, "
                                                       ".json; .gz ok), or plain text: one text per line, id = line "
                                                       "number")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory for the shards and the manifest; a rerun "
                                                           "with the same options resumes it")
    _add_model_arguments(parser)
    parser.add_argument("--instruction", default=None, help="instruction for the documents (default: none, the "
                                                            "text alone)")
    parser.add_argument("--format", choices=("auto", "jsonl", "text"), default="auto",
                        help="input format (default: from the file name)")
    parser.add_argument("--id-field", default="id", help="JSONL field holding the id (default: id)")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--shard-size", type=int_at_least(1), default=10_000, help="rows per shard")
    parser.add_argument("--shard-format", choices=("safetensors", "npy"), default="safetensors")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32)
    parser.add_argument("--no-normalize", action="store_true", help="skip L2 normalization")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="CPU threads per process (default: the cores divided by the processes on this node)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar with texts/s and ETA, on rank 0 (default: when stderr is a terminal)")
    parser.set_defaults(func=run_encode_corpus)


def _launch() -> dict[str, int]:
    """This process's place under torchrun (one process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return {"rank": int(os.environ.get("RANK", "0")), "world": world,
            "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
            "local_world": int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))}


def _rank_device(device: str | None, local_rank: int, world: int) -> str | None:
    """One GPU per rank: ``cuda`` (or no --device on a CUDA machine) becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if world <= 1:
        return device
    if device == "cuda" or device is None:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{local_rank}"
    return device


def _cpu_threads(requested: int | None, local_world: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return requested or max(1, cores // max(1, local_world))


def run_encode_corpus(args) -> int:
    import datetime
    import time

    from ..corpus.encode import CorpusJob
    from ..corpus.model_spec import requested_model_spec

    launch = _launch()
    start = time.perf_counter()
    args.device = _rank_device(args.device, launch["local_rank"], launch["world"])
    try:
        check_model_options(args)
        spec = requested_model_spec(args.model, adapter=args.adapter, method=args.method, k=args.k,
                                    max_length=args.max_length, prompt_style=args.prompt_style, dtype=args.dtype,
                                    device=args.device)
        job = CorpusJob.prepare(args.input, args.out_dir, model=spec, instruction=args.instruction,
                                format=args.format, id_field=args.id_field, text_field=args.text_field,
                                shard_size=args.shard_size, shard_format=args.shard_format,
                                normalize=not args.no_normalize)
    except (ValueError, OSError, ImportError):
        if launch["rank"] > 0:
            return 2  # every rank checks the same options and input: rank 0 reports
        raise

    import torch

    from ..training.distributed import setup_from_env

    if args.device is None or torch.device(args.device).type == "cpu":
        torch.set_num_threads(_cpu_threads(args.threads, launch["local_world"]))
    # gloo for the two barriers around the manifest, whatever the device; a rank may wait long for the others.
    created = setup_from_env(backend="gloo", timeout=datetime.timedelta(days=30))
    try:
        pending = job.plan(log=lambda message: print(f"gircse encode-corpus: {message}", file=sys.stderr, flush=True))
        model = _load(args) if pending else None  # a rank with nothing left to encode loads no model
        progress = args.progress if args.progress is not None else sys.stderr.isatty()
        corpus = job.run(model, pending=pending, batch_size=args.batch_size,
                         progress=progress and launch["rank"] == 0)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    if launch["rank"] == 0:
        print(f"gircse encode-corpus: {len(corpus):,} texts -> {args.out_dir} ({len(corpus.embeddings.parts)} "
              f"shards, d={corpus.dim}) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0
