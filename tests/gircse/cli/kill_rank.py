"""``gircse`` under torchrun with one rank SIGKILLed in the middle of its second shard (for the resume test).

    python -m torch.distributed.run --nproc_per_node 2 -m tests.gircse.cli.kill_rank encode-corpus ...

Rank ``GIRCSE_TEST_KILL_RANK`` writes its second shard's embeddings file, then half of the ids file's temporary
file, and kills itself with SIGKILL: the shard is left with a data file, a partial temporary file and no record.
torchrun then stops the other rank wherever it is.
"""
import os
import signal
import sys

from gircse import cli
from gircse.corpus import store

if os.environ.get("RANK") == os.environ["GIRCSE_TEST_KILL_RANK"]:
    write_atomic, shards_started = store._write_atomic, []

    def write_then_die(path, data):
        if path.endswith(".safetensors"):
            shards_started.append(path)
        if len(shards_started) == 2 and path.endswith(".ids.jsonl"):
            with open(f"{path}.tmp.{os.getpid()}", "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        write_atomic(path, data)

    store._write_atomic = write_then_die

raise SystemExit(cli.main(sys.argv[1:]))
