"""The contrastive LoRA trainer: GIRCSE (ICR loss over z_1..z_K) and the baselines (plain InfoNCE).

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` rows per rank. Each micro-batch is a
contrastive batch of its own: ``batch_size * world_size`` queries against every positive and every hard
negative of the micro-batch on all ranks.

Per micro-batch (``embed_chunk=None``: direct; an int: GradCache):

* direct: embed queries (with their instruction), positives and hard negatives with the autograd
  graph, gather across ranks, loss, backward;
* GradCache (Gao et al. 2021): embed everything without a graph in chunks of ``embed_chunk`` texts,
  compute the loss on leaf copies and take d loss / d embeddings, then re-embed chunk by chunk *with*
  the graph and backpropagate each chunk's embedding gradient. Peak activation memory is one chunk,
  whatever the batch; the gradients are those of the direct computation (tested). Requires a
  deterministic forward (LoRA dropout 0, the default).

GIRCSE embeddings come from ``GIRCSE.forward(..., return_all_steps=True)``, i.e. ``generate_soft_tokens``:
the input is prefilled once and the K soft tokens are fed one position at a time through the KV cache,
with the graph kept through the cache (a test proves the gradients equal those of uncached Algorithm 1).
Similarities and the loss are fp32 even under bf16 autocast (``gircse.losses``).

Data are read in file order (the shipped sets are pre-shuffled), streamed; ``resume`` skips the rows
already consumed, so a resumed run sees exactly the rows, optimizer and scheduler state an uninterrupted
run would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator

import torch

from ..cpu_bf16 import warn_if_slow_bf16
from ..data.jsonl import count_rows, iter_rows, json_line
from ..loading import ADAPTER_FILES
from ..loading import CONFIG_FILE as MODEL_CONFIG_FILE
from ..losses import icr_loss
from ..validation import as_path
from . import distributed as D
from .checkpoint import CHECKPOINT_FILE, checkpoint_info, load_checkpoint, load_weights, save_checkpoint
from .config import TrainConfig

__all__ = ["RunPlan", "TrainConfig", "apply_lora", "batch_gradients", "check_training_file", "embed_texts",
           "frozen_linear_weights_in_bf16", "plan_run", "train", "trainable_parameters"]

LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
# Options a resumed run may change; any other difference from the checkpoint's config is an error
# (it would silently change the data order, the schedule or the objective).
_RESUME_MAY_CHANGE = {"progress", "checkpoint_every", "log_every", "stop_at_step"}
# What a run writes into its ``out`` (the trained model: gircse_config.json and the peft adapter).
_RUN_FILES = (CHECKPOINT_FILE, LOG_FILE, CONFIG_FILE, MODEL_CONFIG_FILE) + ADAPTER_FILES


# ---------------------------------------------------------------------- model preparation
def apply_lora(model, config: TrainConfig):
    """Attach a fresh LoRA adapter to ``model.model`` (a GIRCSE), seeded; no-op if one is attached."""
    if hasattr(model.model, "peft_config"):
        for name, p in model.model.named_parameters():
            p.requires_grad_("lora_" in name)
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules, bias="none")
    model.model = get_peft_model(model.model, lora)
    return model


def _run_model(model, config: TrainConfig):
    """The model a run starts from: ``model`` (or ``GIRCSE.from_pretrained(model)`` for a name / path) with
    the config's method, K and max_length; :func:`apply_lora` comes next."""
    if isinstance(model, (str, os.PathLike)):
        from ..model import GIRCSE

        model = GIRCSE.from_pretrained(model, method=config.method, k=config.k, max_length=config.max_length)
    model.method, model.k, model.max_length = config.method, config.k, config.max_length
    return model


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.model.named_parameters() if p.requires_grad}


def _autocast(config: TrainConfig, device: torch.device):
    if config.bf16:
        warn_if_slow_bf16("bf16 autocast (--bf16, TrainConfig.bf16)", "train without --bf16 (fp32)", device)
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def frozen_linear_weights_in_bf16(model, enabled: bool = True):
    """Hold the frozen linear weights of ``model.model`` in bf16 while the block runs; restore the
    original fp32 tensors after it.

    Why: bf16 autocast casts an fp32 weight to bf16 at *every* ``F.linear`` call, and caches the cast
    only for leaf tensors that require grad, i.e. never for a LoRA run's frozen base weights. Every
    decoder call (a prefill and each of the K soft-token steps, per text group) therefore re-reads
    the fp32 weights, writes a bf16 copy and, for backward, keeps that copy alive: with K = 5 and
    three groups per micro-batch that is ~18 copies of the decoder's linear weights per step. Casting
    once up front is bit-identical (the same round-to-nearest of the same fp32 values; autocast's
    cast of a bf16 tensor to bf16 is a no-op) and every saved tensor is then the weight itself.

    Only frozen ``nn.Linear`` weights are cast: trainable ones (LoRA) stay fp32 master weights, and a
    weight shared with the input embeddings (a tied LM head) stays fp32, since embeddings and norms run
    outside autocast's bf16 list and the residual stream must keep their precision.
    """
    if not enabled:
        yield
        return
    from ..generation import base_causal_lm

    causal_lm = base_causal_lm(model.model)
    embeddings = causal_lm.get_input_embeddings().weight
    swapped = []
    for module in causal_lm.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and weight is not None and not weight.requires_grad
                and weight.dtype == torch.float32 and weight is not embeddings):
            swapped.append((weight, weight.data))
            weight.data = weight.data.to(torch.bfloat16)
    try:
        yield
    finally:
        for weight, fp32 in swapped:
            weight.data = fp32


# ---------------------------------------------------------------------- one contrastive batch
# Texts per prefill. A micro-batch's texts are embedded by one forward (``_groups``): its prefills run
# this many texts at a time, each cut to its longest text, and GIRCSE's K soft-token steps then run on
# all of them at once: a step's cost is reading every weight (and, in backward, reading them again),
# so one step over 48 rows costs about what one over 16 does.
PREFILL_ROWS = 16


def embed_texts(model, texts: list[str], instructions: list[str | None], config: TrainConfig) -> torch.Tensor:
    """``[n, S, d]`` embeddings (S = K for gircse: z_1..z_K; 1 for the baselines), graph kept if enabled.
    Prefills of ``PREFILL_ROWS`` texts; pass the texts sorted by length to keep them tight."""
    batch = model.tokenize(texts, instructions)
    with _autocast(config, batch["input_ids"].device):
        return model(**batch, k=config.k if config.method == "gircse" else None, return_all_steps=True,
                     prefill_rows=PREFILL_ROWS)


def _batch_texts(rows: list[dict], config: TrainConfig) -> tuple[list[str], list[str | None], int]:
    texts = [r["query"] for r in rows] + [r["pos"][0] for r in rows]
    instructions = [r["instruction"] for r in rows] + [None] * len(rows)
    for r in rows:
        negs = r["neg"][:config.num_negatives]
        if len(negs) < config.num_negatives:
            raise ValueError(f"row at line {r.get('_line', '?')} has {len(r['neg'])} hard negatives; "
                             f"num_negatives={config.num_negatives}")
        texts += negs
        instructions += [None] * len(negs)
    return texts, instructions, len(rows)


def _loss_from_embeddings(emb: torch.Tensor, n_rows: int, config: TrainConfig):
    """Split local embeddings [n, S, d] into q/p/n, gather over ranks, ICR loss (plain InfoNCE for S=1)."""
    q, p = emb[:n_rows], emb[n_rows:2 * n_rows]
    neg = emb[2 * n_rows:].reshape(n_rows, config.num_negatives, *emb.shape[1:]) if config.num_negatives else None
    q, p = D.all_gather_with_grad(q), D.all_gather_with_grad(p)
    if neg is not None:
        neg = D.all_gather_with_grad(neg)
    lam = config.lam if config.method == "gircse" else 0.0
    return icr_loss(q, p, neg, temperature=config.temperature, lam=lam, step_reduction=config.step_reduction)


def _groups(texts: list[str], chunk: int | None) -> list[list[int]]:
    """Index groups embedded by one forward each: every text of the micro-batch (direct), or ``chunk``
    texts per group (GradCache, bounded memory); longest first, so that each group's prefills, of
    ``PREFILL_ROWS`` texts each (``embed_texts``), are cut to texts of similar length."""
    ordered = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    size = chunk or len(texts)
    return [ordered[s:s + size] for s in range(0, len(ordered), size)]


def _embed_groups(model, texts, instructions, groups, config, out=None):
    """Embed each group; returns ``[n, S, d]`` in the original text order."""
    parts = [(g, embed_texts(model, [texts[i] for i in g], [instructions[i] for i in g], config)) for g in groups]
    first = parts[0][1]
    if out is None:
        out = first.new_empty((len(texts),) + tuple(first.shape[1:]))
    index = torch.tensor([i for g, _ in parts for i in g], device=first.device)
    return out.index_copy(0, index, torch.cat([e for _, e in parts]))


def batch_gradients(model, rows: list[dict], config: TrainConfig, *, scale: float = 1.0):
    """Accumulate ``scale * d loss / d params`` of one contrastive micro-batch (this rank's ``rows``)
    into ``.grad``; returns ``(loss, per_step)`` detached. Direct or GradCache per ``config.embed_chunk``.

    Texts are embedded longest first by one forward (``embed_chunk`` texts per forward under GradCache),
    whose prefills run ``PREFILL_ROWS`` texts at a time; the result is in row order.
    """
    texts, instructions, n_rows = _batch_texts(rows, config)
    groups = _groups(texts, config.embed_chunk)
    if config.embed_chunk is None:
        emb = _embed_groups(model, texts, instructions, groups, config)
        loss, per_step = _loss_from_embeddings(emb, n_rows, config)
        (loss * scale).backward()
        return loss.detach(), per_step.detach()
    with torch.no_grad():
        cached = _embed_groups(model, texts, instructions, groups, config)
    leaf = cached.detach().requires_grad_(True)
    loss, per_step = _loss_from_embeddings(leaf, n_rows, config)
    (loss * scale).backward()
    grad = leaf.grad
    for group in groups:
        emb = embed_texts(model, [texts[i] for i in group], [instructions[i] for i in group], config)
        emb.backward(grad[torch.tensor(group, device=grad.device)].to(emb.dtype))
    return loss.detach(), per_step.detach()


# ---------------------------------------------------------------------- the loop
def _micro_batches(path: str, config: TrainConfig, skip_rows: int, world: int, rank: int) -> Iterator[list[dict]]:
    """This rank's slice of each global micro-batch (``batch_size * world`` rows), file order, epochs
    chained; incomplete trailing batches are dropped. ``skip_rows`` counts global rows already used."""
    global_batch = config.batch_size * world
    epoch_rows = (count_rows(path) // (global_batch * config.grad_accum)) * global_batch * config.grad_accum
    for epoch in range(config.epochs):
        start = epoch * epoch_rows
        if skip_rows >= start + epoch_rows:
            continue
        skip = max(skip_rows - start, 0)
        used, buffer = skip, []
        for row in iter_rows(path, skip=skip, min_neg=config.num_negatives):
            if used >= epoch_rows:
                break
            buffer.append(row)
            used += 1
            if len(buffer) == global_batch:
                yield buffer[rank * config.batch_size:(rank + 1) * config.batch_size]
                buffer = []


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _rewrite_log(path: str, keep_through_step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [l for n, l in enumerate(f, start=1)
                 if l.strip() and json_line(l, f"{path}:{n}").get("step", 0) <= keep_through_step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def check_training_file(path, config: TrainConfig) -> int:
    """Validate every row of the training file (format, and ``config.num_negatives`` hard negatives per
    row) and return the row count: a bad row fails before the model is loaded, not at step 900."""
    path = as_path("data", path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"training data {path} is a directory; name a JSONL(.gz) file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such training data file: {path}")
    return sum(1 for _ in iter_rows(path, min_neg=config.num_negatives))


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run into ``out`` will do, known before any model loads (:func:`plan_run`)."""

    data_sha256: str           # the data file's identity: a resumed run must read the same bytes
    rows_per_step: int
    total_steps: int
    warmup_steps: int
    replaces: tuple[str, ...]  # an earlier run's files in ``out``, deleted when a fresh run starts


def plan_run(data, out, config: TrainConfig, *, resume: bool = False, overwrite: bool = False,
             world_size: int = 1) -> RunPlan:
    """Check a run before the model loads and say what it will do. Every data row is validated; the run
    must fit one optimizer step; ``out`` must be a directory. Without ``resume``, an ``out`` that holds a
    checkpointed or finished run (or another saved model) is refused unless ``overwrite``, which starts
    again. With ``resume``, the checkpoint must exist, and its options, world size and data file (by
    SHA-256 of its bytes: the same rows in the same order) must equal this run's."""
    data, out = as_path("data", data), as_path("out", out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out} is a file; name a directory")
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it again; choose one")
    n_rows = check_training_file(data, config)
    rows_per_step = config.batch_size * world_size * config.grad_accum
    steps_per_epoch = n_rows // rows_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{data}: {n_rows} rows, fewer rows than one optimizer step needs ({rows_per_step} = "
                         f"batch_size {config.batch_size} x {world_size} rank(s) x grad_accum {config.grad_accum})")
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    sha256 = file_sha256(data)
    checkpoint = os.path.join(out, CHECKPOINT_FILE)
    replaces = ()
    if resume:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--resume: no checkpoint in {out} (no {CHECKPOINT_FILE}); nothing to continue, "
                                    "start the run without --resume")
        _check_resumable(checkpoint, config, data, sha256, world_size)
    else:
        replaces = tuple(name for name in _RUN_FILES if os.path.isfile(os.path.join(out, name)))
        finished = [name for name in replaces if name not in (LOG_FILE, CONFIG_FILE)]  # a log alone: no checkpoint yet
        if finished and not overwrite:
            raise FileExistsError(f"--out {out} already holds a run ({', '.join(finished)}); pass --resume to "
                                  "continue it, or --overwrite to start again and replace its checkpoint, log "
                                  "and model")
    return RunPlan(data_sha256=sha256, rows_per_step=rows_per_step, total_steps=total,
                   warmup_steps=math.ceil(config.warmup_ratio * total), replaces=replaces)


def _previous_resumes(config_path: str) -> list[int]:
    """The steps earlier legs of a run resumed from, as its ``train_config.json`` records them."""
    try:
        with open(config_path, encoding="utf-8") as f:
            return list(json.load(f).get("resumed_at_steps", []))
    except (OSError, ValueError):  # absent or unreadable: the checkpoint, not this file, is the run's record
        return []


def _check_resumable(checkpoint: str, config: TrainConfig, data: str, sha256: str, world_size: int) -> None:
    """The checkpoint belongs to this run: the same options (but ``_RESUME_MAY_CHANGE``), ranks and data."""
    info = checkpoint_info(checkpoint)
    saved = info["config"]
    current = config.public()
    defaults = TrainConfig().public()  # an option added after the checkpoint was written had its default
    for key in sorted(set(saved) | set(current)):
        if key in _RESUME_MAY_CHANGE:
            continue
        if saved.get(key, defaults.get(key)) != current.get(key):
            raise ValueError(f"--resume: checkpoint has {key}={saved.get(key)!r}, this run {current.get(key)!r}")
    if info.get("world_size", 1) != world_size:
        raise ValueError(f"--resume: checkpoint was written with {info.get('world_size')} ranks, now {world_size}")
    if "data_sha256" not in info:
        warnings.warn(f"gircse: {checkpoint} predates data checksums; that --data {data} is the file it was "
                      "trained on cannot be checked", UserWarning, stacklevel=3)
    elif info["data_sha256"] != sha256:
        raise ValueError(f"--resume: the checkpoint was trained on {info.get('data')} (sha256 "
                         f"{info['data_sha256'][:12]}...), this run's data {data} differs (sha256 {sha256[:12]}...); "
                         "resume with the same file")


def train(model, data: str, out: str, config: TrainConfig | None = None, *, resume: bool = False,
          overwrite: bool = False, **overrides):
    """Train ``model`` (a ``GIRCSE`` or a name/path for ``GIRCSE.from_pretrained``) on a JSONL file.

    Writes to ``out``: ``checkpoint.safetensors`` (every ``checkpoint_every`` steps and at the end),
    ``train_log.jsonl`` (one line per step: loss, L_1..L_K, lr, seconds), ``train_config.json`` (the options of
    the latest leg; a resumed run adds ``resumed_at_steps``) and, when
    the model has a base-model reference, the trained GIRCSE directory (``gircse_config.json`` + peft
    adapter; load with ``GIRCSE.from_pretrained(out)``). ``resume=True`` continues from the checkpoint
    with the same data order, optimizer, scheduler and RNG; it needs the checkpoint, and the same options
    and data file. A run into an ``out`` that holds a checkpointed or finished run needs ``resume`` or
    ``overwrite`` (which replaces it); see :func:`plan_run`. Under ``torchrun`` (``WORLD_SIZE`` > 1) the
    process group is initialized (gloo on CPU) and negatives span all ranks. Returns the model.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides).validate()
    data, out = as_path("data", data), as_path("out", out)
    owns_group = D.setup_from_env()
    world, rank = D.world_size(), D.rank()
    try:
        plan = plan_run(data, out, config, resume=resume, overwrite=overwrite, world_size=world)
        model = apply_lora(_run_model(model, config), config)
        model.train()
        if config.gradient_checkpointing:
            from ..generation import base_causal_lm

            base_causal_lm(model.model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        params = trainable_parameters(model)
        optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
        rows_per_step, total = plan.rows_per_step, plan.total_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(plan.warmup_steps, total))
        os.makedirs(out, exist_ok=True)
        ckpt_path, log_path = os.path.join(out, CHECKPOINT_FILE), os.path.join(out, LOG_FILE)
        step = 0
        run_config = {**config.public(), "data": os.path.abspath(data), "data_sha256": plan.data_sha256,
                      "world_size": world, "total_steps": total, "warmup_steps": plan.warmup_steps}
        if resume:
            step = load_checkpoint(ckpt_path, named_params=params, optimizer=optimizer, scheduler=scheduler)["step"]
            if rank == 0:
                _rewrite_log(log_path, step)
                # The options a resume may change (stop_at_step, ...) are this leg's; the steps it started
                # from are kept, so the file never describes a run other than the one in --out.
                run_config["resumed_at_steps"] = _previous_resumes(os.path.join(out, CONFIG_FILE)) + [step]
        elif rank == 0:
            for name in plan.replaces:  # with overwrite, or a log left by a run killed before its first checkpoint
                os.remove(os.path.join(out, name))
        if rank == 0:
            with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump(run_config, f, indent=2)

        def checkpoint():
            if rank == 0:
                save_checkpoint(ckpt_path, named_params=params, optimizer=optimizer, scheduler=scheduler,
                                info={"step": step, "rows_consumed": step * rows_per_step, "world_size": world,
                                      "config": config.public(), "total_steps": total,
                                      "data": os.path.abspath(data), "data_sha256": plan.data_sha256})
            if D.is_distributed():
                torch.distributed.barrier()

        batches = _micro_batches(data, config, step * rows_per_step, world, rank)
        # stop_at_step pauses the run inside its schedule (the lr follows ``total``); resume continues it.
        end = total if config.stop_at_step is None else min(total, config.stop_at_step)
        bar = None
        if config.progress and rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=step, desc=f"train {config.method}", unit="step", file=sys.stderr)
        # bf16 autocast: the frozen weights are cast once here instead of at every linear call.
        with frozen_linear_weights_in_bf16(model, enabled=config.bf16):
            while step < end:
                started = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                losses, steps_l = [], []
                for _ in range(config.grad_accum):
                    rows = next(batches)
                    loss, per_step = batch_gradients(model, rows, config, scale=1.0 / config.grad_accum)
                    losses.append(loss)
                    steps_l.append(per_step)
                D.all_reduce_gradients(params.values())
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                step += 1
                loss = torch.stack(losses).mean().item()
                per_step = torch.stack(steps_l).mean(0).tolist()
                if rank == 0:
                    if step % config.log_every == 0 or step == end:
                        with open(log_path, "a", encoding="utf-8") as f:
                            f.write(json.dumps({"step": step, "loss": loss, "L": per_step, "lr": lr,
                                                "seconds": round(time.perf_counter() - started, 4)}) + "\n")
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.4f}", L_K=f"{per_step[-1]:.4f}")
                if config._kill_after_step is not None and step == config._kill_after_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if step == end or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    checkpoint()
        if bar is not None:
            bar.close()
        model.eval()
        if rank == 0 and model.base_model is not None:
            model.save_pretrained(out)
        return model
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def export_checkpoint(model, checkpoint, out) -> int:
    """Write the GIRCSE directory (``gircse_config.json`` + peft adapter) of the weights in a training
    checkpoint, loadable with ``GIRCSE.from_pretrained(out)``: a run evaluated at an earlier step than
    its end (e.g. at the wall-clock time another run took). Returns the checkpoint's step.

    ``model``: the run's base model (a ``GIRCSE`` without an adapter, or a name/path for
    ``GIRCSE.from_pretrained``); ``checkpoint``: a ``checkpoint.safetensors`` written by :func:`train`
    (its training config gives the method, K, max_length and LoRA settings).
    """
    checkpoint, out = as_path("checkpoint", checkpoint), as_path("out", out)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"no such checkpoint file: {checkpoint}")
    info = checkpoint_info(checkpoint)
    config = TrainConfig(**info["config"]).validate()
    model = _run_model(model, config)
    if hasattr(model.model, "peft_config"):  # checked after loading: a saved directory may bring one
        raise ValueError("model: pass the base model; it already has an adapter")
    apply_lora(model, config)
    load_weights(checkpoint, named_params=trainable_parameters(model))
    model.eval()
    model.save_pretrained(out)
    return int(info["step"])
