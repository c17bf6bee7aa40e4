"""Input validation, the instruction prompt format, truncation that keeps the instruction, left padding."""
from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet

import torch

from .validation import as_int, lone_surrogate

__all__ = ["PROMPT_STYLES", "QUERY_FORMAT", "REFERENCE_QUERY_FORMAT", "check_instruction", "check_prompt_style",
           "check_query_format", "check_text", "format_input", "left_pad", "per_text_instructions",
           "reference_document_instruction", "to_left_padding", "token_ids", "validate_texts"]

# The paper's query format; documents (and queries without an instruction) are the text alone.
QUERY_FORMAT = "Instruct: {instruction}\nQuery: {text}"
# The authors' released code (github.com/Roytsai27/GIRCSE, embedding/base.py and data.py) writes no space
# after "Query:" and tokenizes with add_special_tokens=False (no BOS/EOS). Their adapters were trained so.
REFERENCE_QUERY_FORMAT = "Instruct: {instruction}\nQuery:{text}"
# "gircse": QUERY_FORMAT, the tokenizer's special tokens, documents instructed only when asked.
# "reference": the authors' prompts (see reference_document_instruction for their document rule).
PROMPT_STYLES = ("gircse", "reference")


def check_prompt_style(prompt_style: str) -> str:
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
    return prompt_style


def reference_document_instruction(instruction: str | None) -> str | None:
    """The authors' rule for documents (their ``format_passage_text``): a document keeps the task instruction
    unless the instruction asks to retrieve something and is not about semantic similarity ("Given a question,
    retrieve passages ..." -> bare passages; "Retrieve semantically similar text." -> instructed)."""
    if instruction is None:
        return None
    lowered = instruction.lower()
    return None if "retrieve" in lowered and "semantic" not in lowered else instruction


def check_text(name: str, text) -> str:
    """A non-empty, well-formed str (no lone surrogate), or an error naming ``name``."""
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}: {text!r:.60}")
    if not text.strip():
        raise ValueError(f"{name} is empty (or only whitespace); an empty text has no embedding")
    position = lone_surrogate(text)
    if position is not None:
        raise ValueError(f"{name} is not valid Unicode: a lone surrogate {text[position]!r} at character {position}")
    return text


def validate_texts(texts) -> list[str]:
    """A list of non-empty strings, or a clear error naming the first bad item. An unordered collection
    (a set, a dict) is refused: row i of the output must be the i-th text given."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
    if isinstance(texts, (AbstractSet, Mapping)):
        raise TypeError(f"texts must be an ordered sequence (a list or tuple), got a {type(texts).__name__}: its "
                        "order is not defined, so the rows of the output would match no particular text")
    texts = list(texts)  # tuples, numpy arrays of str, generators
    for index, text in enumerate(texts):
        check_text(f"texts[{index}]", text)
    return [str(text) for text in texts]  # plain str (numpy.str_ and other subclasses)


def format_input(text: str, instruction: str | None = None, query_format: str = QUERY_FORMAT) -> tuple[str, int]:
    """``(prompt, prefix_chars)``: the model input and how many leading characters are the instruction part."""
    if instruction is None:
        return text, 0
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str or None, got {type(instruction).__name__}")
    prefix = query_format.split("{text}")[0].format(instruction=instruction)
    return query_format.format(instruction=instruction, text=text), len(prefix)


def _truncate_text_tokens(ids: list[int], offsets: list[tuple[int, int]], prefix_chars: int,
                          budget: int) -> list[int]:
    """Drop tokens from the end of the *text* part until ``len(ids) <= budget``.

    Tokens with an empty character span are special tokens (BOS/EOS): kept where they are. Tokens
    that end inside the instruction prefix are kept. A token straddling the boundary (e.g. " hi"
    after "Query:") counts as text.
    """
    is_text = [end > start and end > prefix_chars for start, end in offsets]
    n_text = sum(is_text)
    keep_text = budget - (len(ids) - n_text)
    if keep_text < 1:
        raise ValueError(f"the instruction alone takes {len(ids) - n_text} tokens, leaving no room for the "
                         f"text within max_length ({budget} tokens available); raise max_length or shorten "
                         "the instruction")
    kept, seen = [], 0
    for token, text_token in zip(ids, is_text):
        if text_token:
            seen += 1
            if seen > keep_text:
                continue
        kept.append(token)
    return kept


def per_text_instructions(instruction, n: int) -> list[str | None]:
    """One instruction per text: a str (or None) applies to all; a list gives one each (None: no instruction).
    An empty or whitespace-only instruction is an error, as in the server: it would embed
    ``"Instruct: \\nQuery: ..."``, neither the text alone nor an instructed query; pass None for no instruction."""
    if instruction is None or isinstance(instruction, str):
        return [None if instruction is None else check_instruction("instruction", instruction)] * n
    if isinstance(instruction, Sequence):
        instructions = list(instruction)
        if len(instructions) != n:
            raise ValueError(f"got {len(instructions)} instructions for {n} texts")
        return [None if item is None else check_instruction(f"instruction[{i}]", item)
                for i, item in enumerate(instructions)]
    raise TypeError(f"instruction must be a str, a list of str/None, or None; got {type(instruction).__name__}")


def check_instruction(name: str, instruction) -> str:
    """An instruction: non-empty, not only whitespace, well-formed text; an error naming ``name`` otherwise."""
    if not isinstance(instruction, str):
        raise TypeError(f"{name} must be a str or None, got {type(instruction).__name__}")
    if not instruction.strip():
        raise ValueError(f"{name} is empty (or only whitespace); pass None for no instruction")
    return check_text(name, instruction)


def token_ids(tokenizer, texts: list[str], instruction, max_length: int, *,
              append_eos: bool = False, query_format: str = QUERY_FORMAT,
              add_special_tokens: bool = True, truncated: list[int] | None = None) -> list[list[int]]:
    """Token ids per text: tokenizer defaults (``add_special_tokens=True``: BOS where the tokenizer adds
    one), no chat template. ``add_special_tokens=False`` is the authors' reference tokenization.

    ``instruction``: a str or None for all texts, or a list with one (str or None) per text.
    Inputs longer than ``max_length`` lose tokens from the end of the text; the instruction and any
    special tokens are kept. ``append_eos`` (Causal-EOS) adds the EOS id after everything, within
    ``max_length``. ``truncated``: a list that receives the index of every truncated text.
    """
    max_length = as_int("max_length", max_length, minimum=2)
    eos = None
    if append_eos:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("method 'causal-eos' needs a tokenizer with an eos_token")
    instructions = per_text_instructions(instruction, len(texts))
    formatted = [format_input(t, i, query_format) for t, i in zip(texts, instructions)]
    prompts, prefixes = zip(*formatted) if formatted else ((), ())
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    budget = max_length - (1 if append_eos else 0)
    result = []
    for index, ids in enumerate(encoded):
        ids = list(ids)
        if append_eos and ids and ids[-1] == eos:
            ids = ids[:-1]  # the tokenizer already appends EOS: keep exactly one
        if len(ids) > budget:
            if not getattr(tokenizer, "is_fast", False):
                raise ValueError("truncation that keeps the instruction needs a fast tokenizer (character offsets)")
            enc = tokenizer(prompts[index], add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
            if append_eos and ids and ids[-1] == eos:
                ids, offsets = ids[:-1], offsets[:-1]
            ids = _truncate_text_tokens(ids, offsets, prefixes[index], budget)
            if truncated is not None:
                truncated.append(index)
        if not ids:
            raise ValueError(f"texts[{index}] tokenizes to nothing")
        result.append(ids + [eos] if append_eos else ids)
    return result


def left_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, ``[B, L]``, padded on the left so column -1 is real in every row."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, length - len(seq):] = 1
    return input_ids.to(device), attention_mask.to(device)


def check_query_format(query_format) -> str:
    """A query format names ``{instruction}`` then ``{text}``, once each, and no other field: without
    ``{text}`` every query would embed to the same vector; without ``{instruction}`` instructions would
    be dropped; truncation keeps the part before ``{text}``, so the instruction must come first."""
    if not isinstance(query_format, str):
        raise TypeError(f"query_format must be a str, got {type(query_format).__name__}")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(query_format) if field is not None]
    except ValueError as error:
        raise ValueError(f"query_format {query_format!r} is not a valid format string: {error}") from None
    if fields != ["instruction", "text"]:
        raise ValueError(f"query_format must contain {{instruction}} then {{text}}, once each and no other field; "
                         f"got {query_format!r} (fields {fields})")
    return query_format


def to_left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with every row's real tokens moved to the right end, in order (left padding).

    A batch whose last column is real in every row is returned as it is. Otherwise (right padding,
    the tokenizers' default) every row is reordered: padding first, then the real tokens in order
    (positions count real tokens only, so where the padding sits changes nothing else). A row without
    any real token is an error.
    """
    if attention_mask.shape != input_ids.shape or attention_mask.ndim != 2:
        raise ValueError(f"input_ids and attention_mask must both be [B, L]; got {tuple(input_ids.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    empty = ~real.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"attention_mask row {int(empty.nonzero()[0, 0])} has no real token")
    if bool(real[:, -1].all()):
        return input_ids, attention_mask
    order = torch.sort(real.to(torch.uint8), dim=1, stable=True).indices  # padding first, real tokens in order
    return input_ids.gather(1, order), attention_mask.gather(1, order)
