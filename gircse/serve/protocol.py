"""The OpenAI embeddings wire format: request validation and response encoding.

Every bad request becomes an :class:`APIError` that renders as OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``; the checks run before anything reaches the
model, so a request is either rejected whole or embedded whole. No web framework here, only the
standard library (numpy for the vectors), so the rules are testable without a server.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass

__all__ = ["APIError", "EmbeddingRequest", "Limits", "check_content_type", "embeddings_response", "error_body",
           "parse_embedding_request", "truncate_dimensions"]

ENCODING_FORMATS = ("float", "base64")
INPUT_TYPES = ("query", "document")
# OpenAI's fields, plus two extensions for instruction-following embedders: ``instruction`` (the task
# description of the query prompt) and ``input_type`` (query | document). ``user`` is accepted and unused.
REQUEST_FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "instruction", "input_type")


class APIError(Exception):
    """An HTTP error with an OpenAI-shaped body. ``type`` is "invalid_request_error" for the client's
    mistakes (4xx) and "server_error" for ours (5xx)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The body limit is enforced while the body is read."""

    max_inputs_per_request: int = 256
    max_input_chars: int = 16384
    max_body_bytes: int = 4 * 1024 * 1024

    def __post_init__(self):
        for name in ("max_inputs_per_request", "max_input_chars", "max_body_bytes"):
            check_positive_int(name, getattr(self, name))


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated ``POST /v1/embeddings`` body. ``instruction`` is what the model gets (None: the
    text alone), after ``input_type`` and the server's default query instruction are applied."""

    texts: list[str]
    instruction: str | None
    dimensions: int | None
    encoding_format: str


def check_positive_int(name: str, value) -> int:
    """A configuration value that must be an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are distinct: with two ``"model"`` keys, json.loads would keep the last
    silently, and another parser the first."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _invalid(f"the request body has the key {key!r:.60} twice; send each field once", None,
                           "invalid_json")
        seen[key] = value
    return seen


def check_content_type(content_type: str | None) -> None:
    """The body must be JSON: a ``Content-Type`` header, when sent, must be ``application/json`` (or a
    ``+json`` type) with no charset other than UTF-8 (RFC 8259), as OpenAI's API expects. No header: read as
    JSON (a raw body). 415 otherwise."""
    if content_type is None:
        return
    media_type, *parameters = [part.strip().lower() for part in content_type.split(";")]
    charset = next((p.split("=", 1)[1].strip('" ') for p in parameters if p.startswith("charset=")), "utf-8")
    if (media_type != "application/json" and not media_type.endswith("+json")) or charset not in ("utf-8", "utf8"):
        raise APIError(415, f"Content-Type {content_type!r:.100} is not supported; send the body as JSON with "
                            "Content-Type: application/json (UTF-8)", code="unsupported_media_type")


def _invalid(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(value, what: str, param: str, max_chars: int) -> str:
    """A non-empty, well-formed string of at most ``max_chars`` characters."""
    if not isinstance(value, str):
        raise _invalid(f"{what} must be a string, got {_json_type(value)}", param, "invalid_type")
    if not value.strip():
        raise _invalid(f"{what} is empty (or only whitespace); an empty text has no embedding", param)
    if len(value) > max_chars:
        raise _invalid(f"{what} has {len(value)} characters; this server accepts at most {max_chars}", param,
                       "input_too_long")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800", legal in JSON but not text
        raise _invalid(f"{what} is not valid Unicode (it contains a lone surrogate escape)", param) from None
    return value


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _parse_input(value, limits: Limits) -> list[str]:
    if isinstance(value, str):
        return [_check_text(value, "input", "input", limits.max_input_chars)]
    if not isinstance(value, list):
        raise _invalid(f"input must be a string or an array of strings, got {_json_type(value)}", "input",
                       "invalid_type")
    if not value:
        raise _invalid("input is an empty array; send at least one text", "input")
    if _is_int(value[0]) or (isinstance(value[0], list) and value[0] and all(_is_int(t) for t in value[0])):
        raise _invalid("input as token ids is not supported; send the text (a string or an array of strings)",
                       "input", "invalid_type")
    if len(value) > limits.max_inputs_per_request:
        raise _invalid(f"input has {len(value)} texts; this server accepts at most "
                       f"{limits.max_inputs_per_request} per request", "input", "too_many_inputs")
    return [_check_text(text, f"input[{i}]", "input", limits.max_input_chars) for i, text in enumerate(value)]


def parse_embedding_request(body: bytes, *, model_name: str, embedding_dim: int, limits: Limits,
                            query_instruction: str | None = None) -> EmbeddingRequest:
    """Validate a request body; raise :class:`APIError` (400, or 404 for an unknown model) naming the
    parameter at fault.

    ``instruction`` + no ``input_type`` (or ``"query"``): a query with that instruction.
    ``input_type: "query"`` alone: a query with ``query_instruction`` (the server's default; None
    embeds the text alone). ``input_type: "document"``: the text alone; with an instruction it is
    ambiguous and rejected.
    """
    try:
        text = body.decode("utf-8")  # not json.loads(bytes), which would also take UTF-16 and UTF-32
    except UnicodeDecodeError as error:
        raise _invalid(f"the request body is not UTF-8 (byte {error.start}: {error.reason}); JSON requests must be "
                       "UTF-8 (RFC 8259)", None, "invalid_json") from None
    try:
        payload = json.loads(text.removeprefix("\ufeff"), parse_constant=_reject_constant,
                             object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as error:
        raise _invalid(f"the request body is not valid JSON: {error}", None, "invalid_json") from None
    if not isinstance(payload, dict):
        raise _invalid(f"the request body must be a JSON object, got {_json_type(payload)}", None, "invalid_json")
    unknown = sorted(set(payload) - set(REQUEST_FIELDS))
    if unknown:
        raise _invalid(f"Unrecognized request argument supplied: {unknown[0]} (accepted: "
                       f"{', '.join(REQUEST_FIELDS)})", unknown[0], "unknown_parameter")
    for required in ("model", "input"):
        if required not in payload:
            raise _invalid(f"you must provide '{required}'", required, "missing_required_parameter")

    model = payload["model"]
    if not isinstance(model, str):
        raise _invalid(f"model must be a string, got {_json_type(model)}", "model", "invalid_type")
    if model != model_name:
        raise APIError(404, f"The model '{model:.200}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")

    texts = _parse_input(payload["input"], limits)

    encoding_format = payload.get("encoding_format")
    if encoding_format is None:
        encoding_format = "float"
    if encoding_format not in ENCODING_FORMATS:
        raise _invalid(f"encoding_format must be one of {list(ENCODING_FORMATS)}, got {encoding_format!r:.60}",
                       "encoding_format")

    dimensions = payload.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or not 1 <= dimensions <= embedding_dim):
        raise _invalid(f"dimensions must be an integer from 1 to {embedding_dim} (the model's embedding size), "
                       f"got {dimensions!r:.60}", "dimensions")

    user = payload.get("user")
    if user is not None and not isinstance(user, str):
        raise _invalid(f"user must be a string, got {_json_type(user)}", "user", "invalid_type")

    instruction = payload.get("instruction")
    if instruction is not None:
        instruction = _check_text(instruction, "instruction", "instruction", limits.max_input_chars)
    input_type = payload.get("input_type")
    if input_type is not None and input_type not in INPUT_TYPES:
        raise _invalid(f"input_type must be one of {list(INPUT_TYPES)}, got {input_type!r:.60}", "input_type")
    if input_type == "document" and instruction is not None:
        raise _invalid("input_type 'document' embeds the text alone; drop 'instruction' or use input_type "
                       "'query'", "instruction")
    if input_type == "query" and instruction is None:
        instruction = query_instruction

    return EmbeddingRequest(texts=texts, instruction=instruction, dimensions=dimensions,
                            encoding_format=encoding_format)


def truncate_dimensions(vectors, dimensions: int | None):
    """Matryoshka-style: keep the first ``dimensions`` components of ``[n, d]`` numpy vectors and
    L2-normalize again (a zero vector stays zero). None leaves the vectors as they are."""
    import numpy as np

    if dimensions is None or dimensions == vectors.shape[-1]:
        return vectors
    kept = vectors[..., :dimensions]
    norms = np.linalg.norm(kept, axis=-1, keepdims=True)
    return kept / np.where(norms > 0, norms, 1.0)


def embeddings_response(vectors, *, model_name: str, prompt_tokens: int, encoding_format: str) -> bytes:
    """The JSON body of a successful response for ``[n, d]`` numpy vectors; ``base64`` is the
    little-endian float32 bytes of each vector (what the OpenAI client decodes)."""
    import numpy as np

    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    if not np.isfinite(vectors).all():  # json.dumps would write a bare NaN: not JSON, and no embedding
        raise ValueError(f"{int((~np.isfinite(vectors)).any(axis=-1).sum())} embedding(s) are not finite (NaN or "
                         "infinite)")
    if encoding_format == "base64":
        encoded = [base64.b64encode(vector.tobytes()).decode("ascii") for vector in vectors]
    else:
        encoded = vectors.tolist()
    return json.dumps({
        "object": "list",
        "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(encoded)],
        "model": model_name,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }, separators=(",", ":"), allow_nan=False).encode("utf-8")
