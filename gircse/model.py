"""``GIRCSE``: one object for GIRCSE embeddings and the Causal-EOS / Bidirectional-Avg baselines."""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from torch import nn

from . import loading
from .baselines import bidirectional_mean, causal_eos_state
from .cpu_bf16 import warn_if_slow_bf16
from .generation import (base_causal_lm, check_k, generate_soft_tokens, pool_steps, prefill_chunks,
                         soft_token_embedding_of)
from .methods import METHODS, POOLING, check_method
from .prompts import (QUERY_FORMAT, REFERENCE_QUERY_FORMAT, check_prompt_style, check_query_format, left_pad,
                      reference_document_instruction, to_left_padding, token_ids, validate_texts)
from .validation import as_bool, as_int, as_path

__all__ = ["GIRCSE", "METHODS", "load_default", "load_model"]

CONFIG_VERSION = loading.CONFIG_VERSION
# encode's automatic decode group (see GIRCSE.encode): rows of the K soft-token steps, and the KV cache
# those rows may hold. 1 GiB lets SmolLM2 in fp32 at max_length 128 step 128 rows at once: encode of 128 dev
# documents went from 1.18x / 1.73x Causal-EOS (32 rows, the old 256 MiB) to 1.10x / 1.39x at K = 5 / 20,
# for ~0.9 GB of peak memory against ~0.3 GB (bench/probes/decode-group, AMX Xeon, 2 threads).
_DECODE_ROWS, _DECODE_KV_BUDGET = 128, 1 << 30


class GIRCSE(nn.Module):
    """A causal LLM used as an embedding model (GIRCSE, or a fair baseline on the same backbone).

    Attributes:
        model: the wrapped transformers causal LM (a peft model when an adapter is attached).
        tokenizer: its tokenizer.
        method: "gircse" | "causal-eos" | "bidirectional-avg" | "two-stage" (``gircse.two_stage``).
        k: default number of soft tokens (GIRCSE; two-stage: hard tokens of the expansion).
        prompt_style: "gircse" (``QUERY_FORMAT``, the tokenizer's special tokens) or "reference" (the
            authors' released code: ``REFERENCE_QUERY_FORMAT``, no special tokens, their document rule).

    ``forward(input_ids, attention_mask, k=None, return_all_steps=False)`` is differentiable (the
    training path); ``encode`` is the batched inference path (inference mode, numpy out).
    """

    def __init__(self, model: nn.Module, tokenizer, *, method: str = "gircse", k: int = 20,
                 max_length: int = 512, base_model: str | None = None, gguf_file: str | None = None,
                 query_format: str | None = None, prompt_style: str = "gircse"):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.method = check_method(method)
        self.k = self._check_k(k)
        self.max_length = as_int("max_length", max_length, minimum=2)
        # Where the base weights come from, recorded by save_pretrained (None: an in-memory model).
        self.base_model = None if base_model is None else as_path("base_model", base_model)
        self.gguf_file = gguf_file
        self.prompt_style = check_prompt_style(prompt_style)
        if query_format is None:
            query_format = REFERENCE_QUERY_FORMAT if prompt_style == "reference" else QUERY_FORMAT
        self.query_format = check_query_format(query_format)
        self._warned_truncation = False  # warn once per model when inputs exceed max_length
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
        if weight is not None and weight.dtype == torch.bfloat16:
            warn_if_slow_bf16("a bf16 model (dtype='bfloat16', --dtype bf16)",
                              "load it in fp32 (dtype='float32', --dtype float32)", weight.device)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, method: str | None = None, k: int | None = None,
                        adapter: str | None = None, gguf_file: str | None = None, device=None, dtype=None,
                        max_length: int | None = None, prompt_style: str | None = None) -> "GIRCSE":
        """Load a base causal LM (hub id, local directory, ``"smollm2-135m"``) or a saved GIRCSE directory.

        ``method``/``k``/``max_length``/``prompt_style`` left as None take the saved directory's values,
        else "gircse" / 20 (5 with ``prompt_style="reference"``) / 512 / "gircse". ``adapter``: a peft
        adapter directory to attach (the authors' released adapters: ``prompt_style="reference"``).
        ``dtype`` None: fp32 on CPU, bf16 on CUDA.
        """
        k = None if k is None else check_k(k)
        max_length = None if max_length is None else as_int("max_length", max_length, minimum=2)
        method = None if method is None else check_method(method)
        settings = loading.resolve_pretrained(name_or_path, adapter=adapter, gguf_file=gguf_file, method=method,
                                              k=k, max_length=max_length, prompt_style=prompt_style)
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        dtype = loading.resolve_dtype(dtype, device)
        model, tokenizer = loading.load_base(settings["base_model"], gguf_file=settings["gguf_file"], device=device,
                                             dtype=dtype)
        if settings["adapter"] is not None:
            model = _attach_adapter(model, settings["adapter"], settings["base_model"]).to(device).eval()
        return cls(model, tokenizer, method=settings["method"], k=settings["k"], max_length=settings["max_length"],
                   base_model=settings["base_model"], gguf_file=settings["gguf_file"],
                   query_format=settings["query_format"], prompt_style=settings["prompt_style"])

    def save_pretrained(self, directory) -> None:
        """Write ``gircse_config.json`` (base model reference, method, k, pooling, prompt format),
        the peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``) when one is
        attached, and, for an in-memory model with no reference, the base weights under ``base/``.
        safetensors only. Saving over an earlier save replaces it: a stale adapter is removed.
        """
        directory = as_path("directory", directory)
        has_adapter = hasattr(self.model, "peft_config")
        if self.base_model is None and has_adapter:
            raise ValueError("this GIRCSE wraps an in-memory base model with a peft adapter and no base "
                             "reference; construct it with base_model=<path or name> (e.g. save the base "
                             "model first) so the adapter can be saved against it")
        base, write_base = loading.prepare_save_directory(directory, self.base_model)
        if write_base:
            self.model.save_pretrained(os.path.join(directory, base), safe_serialization=True)
            self.tokenizer.save_pretrained(os.path.join(directory, base))
        if has_adapter:
            self.model.save_pretrained(directory, safe_serialization=True)
        loading.write_json_atomic(os.path.join(directory, loading.CONFIG_FILE), {
            "gircse_config_version": CONFIG_VERSION,
            "base_model": base,
            "gguf_file": self.gguf_file,
            "method": self.method,
            "k": self.k,
            "pooling": POOLING[self.method],
            "query_format": self.query_format,
            "prompt_style": self.prompt_style,
            "max_length": self.max_length,
            "adapter": has_adapter,
        })

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embedding_dim(self) -> int:
        return base_causal_lm(self.model).config.hidden_size

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, k={self.k}, max_length={self.max_length}, base_model={self.base_model!r}, "
                f"prompt_style={self.prompt_style!r}")

    # ------------------------------------------------------------------ tokenization and the differentiable path
    def tokenize(self, texts: list[str], instruction: str | list[str | None] | None = None
                 ) -> dict[str, torch.Tensor]:
        """Left-padded ``{"input_ids", "attention_mask"}`` on the model's device, ready for ``forward``.

        ``instruction``: one for all texts, or a list with one (or None) per text (training rows).
        """
        texts = validate_texts(texts)
        if not texts:
            raise ValueError("texts is empty")
        return self._pad(self._token_ids(texts, instruction))

    def count_tokens(self, texts: list[str], instruction: str | list[str | None] | None = None, *,
                     tokenizer=None) -> list[int]:
        """Tokens of each text as the model reads it (the ``usage`` a server reports): the query format,
        the special tokens of ``prompt_style``, the EOS of the EOS methods, truncation to ``max_length``.
        Two-stage: the text before its generated expansion (stage 1 is not run). ``tokenizer``: a copy to
        use instead of the model's (tokenizers are not shareable across threads)."""
        return [len(x) for x in self._prompt_token_ids(validate_texts(texts), instruction, tokenizer=tokenizer)]

    def _prompt_token_ids(self, texts: list[str], instruction, *, tokenizer=None,
                          truncated: list[int] | None = None) -> list[list[int]]:
        """Token ids of the texts as given: this model's query format, prompt style, EOS and max_length."""
        return token_ids(tokenizer or self.tokenizer, texts, instruction, self.max_length,
                         append_eos=self.method in ("causal-eos", "two-stage"), query_format=self.query_format,
                         add_special_tokens=self.prompt_style != "reference", truncated=truncated)

    def _token_ids(self, texts: list[str], instruction, k: int | None = None) -> list[list[int]]:
        if self.method == "two-stage":  # stage 1: the backbone writes each text's expansion
            from .two_stage import join_expansion

            texts = [join_expansion(t, e) for t, e in zip(texts, self.expand(texts, k=k))]
        truncated: list[int] = []
        ids = self._prompt_token_ids(texts, instruction, truncated=truncated)
        if truncated and not self._warned_truncation:
            self._warned_truncation = True
            warnings.warn(f"gircse: {len(truncated)} of {len(texts)} inputs exceed max_length={self.max_length} "
                          f"tokens and lose text from the end (first: texts[{truncated[0]}]); the instruction is "
                          "kept. Pass max_length= to change the limit. (Shown once per model.)",
                          UserWarning, stacklevel=3)
        return ids

    def expand(self, texts, *, k: int | None = None, batch_size: int = 16) -> list[str]:
        """Stage 1 of the two-stage baseline: the backbone's greedy expansion of each text (at most ``k``
        tokens, default ``self.k``; adapter off). Any method may call it, e.g. to time stage 1 alone."""
        from .two_stage import expand_texts

        return expand_texts(self.model, self.tokenizer, validate_texts(texts), self.k if k is None else self._check_k(k),
                            max_length=self.max_length, batch_size=as_int("batch_size", batch_size, minimum=1))

    def _check_k(self, k) -> int:
        """K as an int >= 1 that leaves the input at least one of the model's positions."""
        k = check_k(k)
        limit = self._max_positions()
        if limit is not None and k >= limit:
            raise ValueError(f"k={k} soft tokens do not fit in the model's {limit} positions "
                             "(max_position_embeddings), which must also hold the input")
        return k

    def _max_positions(self) -> int | None:
        limit = getattr(getattr(base_causal_lm(self.model), "config", None), "max_position_embeddings", None)
        return limit if isinstance(limit, int) and limit > 0 else None

    def _decode_group_rows(self, batch_size: int, decode_batch_size, longest: int, k: int) -> int:
        """Rows ``encode`` hands one ``forward`` (see ``encode``): prefills of ``batch_size`` rows,
        then the K steps on all of them. Baselines have no steps: ``batch_size``."""
        if decode_batch_size is not None:
            decode_batch_size = as_int("decode_batch_size", decode_batch_size, minimum=1)
        if self.method != "gircse":
            return batch_size
        if decode_batch_size is not None:
            return max(batch_size, decode_batch_size)
        if batch_size == 1:
            return 1
        config = base_causal_lm(self.model).config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype_bytes = next(self.model.parameters()).element_size()
        kv_per_row = 2 * config.num_hidden_layers * heads * head_dim * dtype_bytes * (longest + k)
        fits = _DECODE_KV_BUDGET // max(1, kv_per_row)
        return max(batch_size, min(_DECODE_ROWS, fits) // batch_size * batch_size)

    def _pad(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id or 0  # any id: padded positions are masked out
        input_ids, attention_mask = left_pad(sequences, pad_id, self.device)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, k: int | None = None,
                return_all_steps: bool = False, prefill_rows: int | None = None) -> torch.Tensor:
        """Unnormalized embeddings of a left-padded batch; differentiable when grad is enabled.

        GIRCSE: ``[B, d]`` = z_k, or ``[B, k, d]`` = z_1..z_k with ``return_all_steps``.
        Baselines: ``[B, d]``, or ``[B, 1, d]`` with ``return_all_steps`` (they have one step).
        Right-padded input (the tokenizers' default) is moved to left padding first.
        ``prefill_rows``: run the input in chunks of this many rows, each cut to its longest row (rows
        sorted by length make the chunks tight); GIRCSE then runs the K steps on the whole batch at once
        (``gircse.generation.generate_soft_tokens``).
        """
        input_ids, attention_mask = to_left_padding(input_ids, attention_mask)
        k = self.k if k is None else self._check_k(k)
        limit, length = self._max_positions(), int(attention_mask.sum(dim=1).max())
        needed = length + (k if self.method == "gircse" else 0)
        if limit is not None and needed > limit:
            raise ValueError(f"{length} input tokens" + (f" + k={k} soft tokens" if self.method == "gircse" else "")
                             + f" exceed the model's {limit} positions (max_position_embeddings); lower "
                             "max_length" + (" or k" if self.method == "gircse" else ""))
        if self.method == "gircse":
            generated = generate_soft_tokens(self.model, soft_token_embedding_of(self.model),
                                             input_ids, attention_mask, k, prefill_rows=prefill_rows)
            return pool_steps(generated, return_all_steps=return_all_steps)
        # two-stage: the expansion is already in input_ids
        pool = causal_eos_state if self.method in ("causal-eos", "two-stage") else bidirectional_mean
        pooled = torch.cat([pool(self.model, input_ids[rows, first:], attention_mask[rows, first:])
                            for rows, first in prefill_chunks(attention_mask, prefill_rows)])
        return pooled.unsqueeze(1) if return_all_steps else pooled

    # ------------------------------------------------------------------ inference
    def encode(self, texts, instruction: str | list[str | None] | None = None, *, k: int | None = None, batch_size: int = 32,
               normalize_embeddings: bool = True, convert_to_numpy: bool = True,
               show_progress_bar: bool | None = None, return_all_steps: bool = False,
               prompt: str | None = None, convert_to_tensor: bool = False, decode_batch_size: int | None = None,
               on_batch=None):
        """Embed texts: ``[n, d]`` (``[n, k, d]`` with ``return_all_steps``; a single str gives ``[d]``).

        Queries take ``instruction`` in the format ``"Instruct: {instruction}\\nQuery: {text}"``; no
        instruction embeds the text alone; a list gives one instruction (or None) per text. Texts are sorted by length (longest first) so batches
        carry little padding; the output is in the input order. fp32 output.

        sentence-transformers-style callers: ``prompt`` is a literal prefix put before every text (instead
        of ``instruction``), ``convert_to_tensor=True`` returns a torch tensor. Unlike
        sentence-transformers, ``normalize_embeddings`` defaults to True.

        ``batch_size`` texts share a prefill; GIRCSE's K soft-token steps run on ``decode_batch_size`` texts
        at once (several prefills' rows). A step multiplies one position per text by every weight, so at
        32 rows it is bound by reading the weights, not by its FLOPs; more rows amortize that read.
        ``None``: up to 128 rows (at least ``batch_size``) whose KV cache fits 1 GiB, and 1 when
        ``batch_size`` is 1 (so that a text encoded with ``batch_size=1`` never depends on the others).

        Batch invariance, per dtype: in fp32 a text embeds the same alone or in any batch, to round-off
        (~1e-5). In bf16/fp16 it does not: other batch shapes round differently at every layer and the K
        soft-token steps feed that back (SmolLM2 on CPU, cosine alone vs in a batch: >= 0.99 with the
        shipped adapter, down to 0.88 for the raw base model at K = 20). Guaranteed in every dtype: the
        same call repeats bit for bit, and with ``batch_size=1`` a text's embedding does not depend on
        the other texts.

        A NaN or infinite embedding (broken weights, an fp16 overflow) is a ValueError naming the text,
        never a returned vector: it would score as a perfect match in some metrics and is not valid JSON.

        ``on_batch``: called after each decode group with the number of texts it embedded (e.g. a caller's
        own progress bar spanning several calls).
        """
        single = isinstance(texts, str)
        texts = validate_texts([texts] if single else texts)
        normalize_embeddings = as_bool("normalize_embeddings", normalize_embeddings)
        convert_to_numpy, convert_to_tensor = as_bool("convert_to_numpy", convert_to_numpy), as_bool(
            "convert_to_tensor", convert_to_tensor)
        return_all_steps = as_bool("return_all_steps", return_all_steps)
        if show_progress_bar is not None:
            show_progress_bar = as_bool("show_progress_bar", show_progress_bar)
        if prompt is not None:
            if instruction is not None:
                raise ValueError("give either instruction= (formatted with the query format) or prompt= (a literal "
                                 "prefix), not both")
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            texts = [prompt + text for text in texts]
        if convert_to_tensor:
            convert_to_numpy = False
        batch_size = as_int("batch_size", batch_size, minimum=1)
        k = self.k if k is None else self._check_k(k)
        steps = (k if self.method == "gircse" else 1) if return_all_steps else None
        shape = (len(texts),) + ((steps,) if steps else ()) + (self.embedding_dim,)
        out = torch.empty(shape, dtype=torch.float32)
        if texts:
            sequences = self._token_ids(texts, instruction, k)
            order = sorted(range(len(texts)), key=lambda i: -len(sequences[i]))
            if show_progress_bar is None:
                show_progress_bar = len(texts) > 256
            group = self._decode_group_rows(batch_size, decode_batch_size, len(sequences[order[0]]), k)
            starts = range(0, len(order), group)
            if show_progress_bar:
                from tqdm.auto import tqdm

                starts = tqdm(starts, total=math.ceil(len(order) / group), desc="encode", unit="batch")
            was_training = self.training
            self.eval()
            try:
                with torch.inference_mode():
                    for start in starts:
                        index = order[start:start + group]
                        batch = self._pad([sequences[i] for i in index])
                        emb = self.forward(**batch, k=k, return_all_steps=return_all_steps,
                                           prefill_rows=batch_size).float()
                        _check_finite_embeddings(emb, index)
                        if normalize_embeddings:
                            emb = torch.nn.functional.normalize(emb, dim=-1)
                        out[torch.tensor(index)] = emb.cpu()
                        if on_batch is not None:
                            on_batch(len(index))
            finally:
                self.train(was_training)
        if single:
            out = out[0]
        return out.numpy() if convert_to_numpy else out

    def encode_queries(self, texts, instruction: str | None = None, **kwargs):
        """Queries: ``"Instruct: {instruction}\\nQuery: {text}"`` (the text alone without instruction)."""
        return self.encode(texts, instruction, **kwargs)

    def encode_documents(self, texts, instruction: str | list[str | None] | None = None, **kwargs):
        """Documents: the text alone unless an instruction is given. ``prompt_style="reference"`` follows the
        authors' rule: the instruction is dropped when it asks to retrieve something that is not semantic
        similarity (``gircse.prompts.reference_document_instruction``)."""
        if self.prompt_style == "reference":
            if instruction is None or isinstance(instruction, str):
                instruction = reference_document_instruction(instruction)
            else:
                instruction = [reference_document_instruction(i) for i in instruction]
        return self.encode(texts, instruction, **kwargs)

    # sentence-transformers (>= 5) names: drop-in where encode_query / encode_document are expected.
    def encode_query(self, sentences, instruction: str | None = None, **kwargs):
        return self.encode_queries(sentences, instruction, **kwargs)

    def encode_document(self, sentences, instruction: str | None = None, **kwargs):
        return self.encode_documents(sentences, instruction, **kwargs)

    def similarity(self, a, b) -> np.ndarray:
        """Cosine similarity matrix between two sets of embeddings ``[n, d]`` x ``[m, d]``."""
        a = torch.nn.functional.normalize(torch.as_tensor(np.asarray(a), dtype=torch.float32), dim=-1)
        b = torch.nn.functional.normalize(torch.as_tensor(np.asarray(b), dtype=torch.float32), dim=-1)
        return (a @ b.T).numpy()

    @torch.inference_mode()
    def explain(self, text: str, instruction: str | None = None, k: int | None = None, top: int = 30
                ) -> list[list[tuple[str, float]]]:
        """Per generation step j = 1..k (default: the model's K), the ``top`` tokens of the soft-token
        distribution s_j with their probabilities (the paper's Table 4 analysis). The vocabulary is
        scanned in chunks, so no [k, V] tensor is built.
        """
        if self.method != "gircse":
            raise ValueError(f"explain shows soft-token distributions; method {self.method!r} generates none")
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        k = self._check_k(self.k if k is None else k)
        top = as_int("top", top, minimum=1)
        batch = self.tokenize([text], instruction)
        ste = soft_token_embedding_of(self.model)
        generated, prefill_state = generate_soft_tokens(self.model, ste, batch["input_ids"],
                                                        batch["attention_mask"], k, return_prefill_state=True)
        # s_1 comes from the input's last state, s_j (j > 1) from the state at d_{j-1}'s position.
        queries = torch.cat([prefill_state[:, None], generated[:, :-1]], dim=1)[0]
        probs, ids = top_soft_token_probs(queries, ste, top)
        return [[(self.tokenizer.decode([int(t)]), float(p)) for p, t in zip(step_p, step_t)]
                for step_p, step_t in zip(probs.tolist(), ids.tolist())]


def _attach_adapter(model, adapter_dir: str, base: str):
    """``PeftModel.from_pretrained``, with an adapter whose weights have other shapes than ``base``'s layers
    (trained on another architecture or size) reported in one line naming both."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter_dir)
    except RuntimeError as error:
        mismatches = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        if not mismatches:
            raise
        raise ValueError(f"adapter {adapter_dir} does not fit base model {base!r}: {len(mismatches)} weight(s) "
                         f"have other shapes (first: {mismatches[0]}); it was trained on another model") from None


def _check_finite_embeddings(embeddings: torch.Tensor, index: list[int]) -> None:
    """ValueError when a row of ``embeddings`` (texts ``index``, in that order) holds NaN or inf."""
    finite = torch.isfinite(embeddings).flatten(1).all(dim=1)
    if bool(finite.all()):
        return
    bad = sorted(index[i] for i in (~finite).nonzero()[:, 0].tolist())
    raise ValueError(f"the model produced a non-finite (NaN or infinite) embedding for {len(bad)} text(s) of a "
                     f"batch (the first: texts[{bad[0]}]); its weights or its dtype (an fp16 overflow) are "
                     "broken, and no embedding is returned")


def top_soft_token_probs(hidden: torch.Tensor, soft_token_embedding, top: int, chunk: int = 8192
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs, ids)``, ``[n, top]``: the largest entries of ``softmax(lm_head(hidden))``.

    Streams the vocabulary in chunks with a running top-k and log-sum-exp (memory O(n * chunk)).
    Honours the op's LM-head bias, temperature and softcap, in the op's order
    (``gircse_kernels.reference``: temperature first, then the softcap).
    """
    weight, bias = soft_token_embedding.lm_head_weight, soft_token_embedding.lm_head_bias
    temperature, softcap = soft_token_embedding.temperature, soft_token_embedding.softcap
    hidden = hidden.float()
    vocab = weight.shape[0]
    top = min(top, vocab)
    best_vals = hidden.new_full((hidden.shape[0], 0), float("-inf"))
    best_ids = torch.empty((hidden.shape[0], 0), dtype=torch.long, device=hidden.device)
    lse = hidden.new_full((hidden.shape[0],), float("-inf"))
    for start in range(0, vocab, chunk):
        logits = hidden @ weight[start:start + chunk].float().T
        if bias is not None:
            logits = logits + bias[start:start + chunk].float()
        logits = logits / temperature
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
        ids = torch.arange(start, start + logits.shape[1], device=hidden.device).expand_as(logits)
        vals = torch.cat([best_vals, logits], dim=1)
        cand = torch.cat([best_ids, ids], dim=1)
        best_vals, pos = vals.topk(min(top, vals.shape[1]), dim=1)
        best_ids = cand.gather(1, pos)
    return (best_vals - lse[:, None]).exp(), best_ids


def load_default(*, method: str | None = None, k: int | None = None, device=None, dtype=None,
                 max_length: int | None = None, prompt_style: str | None = None) -> GIRCSE:
    """SmolLM2-135M with the shipped GIRCSE adapter (``gircse/default_adapter/``, a directory written by
    ``GIRCSE.save_pretrained``); without that directory, the untrained base model, with a warning.
    Arguments left as None take the shipped configuration's values: K=5 and max_length=128 tokens (what
    the adapter was trained and evaluated with; longer inputs lose text from the end, with a warning).
    """
    kwargs = dict(method=method, k=k, device=device, dtype=dtype, max_length=max_length, prompt_style=prompt_style)
    reference = loading.default_model_reference()
    if reference == loading.DEFAULT_ADAPTER_DIR:
        return GIRCSE.from_pretrained(reference, **kwargs)
    warnings.warn("gircse: no trained adapter is shipped yet (gircse/default_adapter/); load_default() returns "
                  "the raw SmolLM2-135M base model with GIRCSE generation, untrained for embeddings.",
                  UserWarning, stacklevel=2)
    return GIRCSE.from_pretrained(reference, **kwargs)


def load_model(name_or_path="default", *, adapter=None, **kwargs) -> GIRCSE:
    """``"default"`` (or None): ``load_default(**kwargs)``; anything else: ``GIRCSE.from_pretrained(name_or_path,
    adapter=adapter, **kwargs)``. What the command line's ``--model`` / ``--adapter`` options load."""
    if name_or_path in (None, "default"):
        if adapter is not None:
            raise ValueError("adapter needs a model (the base model it was trained on), not 'default'")
        return load_default(**kwargs)
    return GIRCSE.from_pretrained(name_or_path, adapter=adapter, **kwargs)
