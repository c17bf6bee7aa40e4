"""The shapes a gpu_check run covers, and how the budget is shared between its sections."""
from __future__ import annotations

# The LM heads of the roofline issue, (V, d, d_e, tied): timed, and checked for correctness.
MODELS = {
    "SmolLM2-135M": (49152, 576, 576, True),
    "Qwen2.5-0.5B": (151936, 896, 896, True),
    "Mistral-7B": (32000, 4096, 4096, False),
    "Qwen2-7B": (152064, 3584, 3584, False),
}
# Checked for correctness only: every real shape is a multiple of the tiles, so without this one the
# vocabulary and feature boundary masks would never run on the GPU.
UNEVEN = {"uneven-50257x1000": (50257, 1000, 1000, False)}
# --small / --device cpu: the same logic on shapes the interpreter runs in seconds. tiny-tied holds d
# and d_e in registers, tiny-wide mixes a register d_e with a chunked d, tiny-uneven walks both in
# chunks with a partial last chunk and a prime vocabulary.
SMALL_MODELS = {"tiny-tied": (300, 48, 48, True), "tiny-wide": (257, 200, 72, False)}
SMALL_UNEVEN = {"tiny-uneven": (523, 144, 136, False)}

BATCHES = (1, 8, 32, 128, 512, 4096)  # timings: the roofline goals' batches
SMALL_BATCHES = (1, 64)
# Correctness: batches that reach every configuration family the dispatcher returns at the real
# shapes (16-row decode, 64-row decode at B = 17-63 on the narrow models, the GEMM path from 17 or
# 64 rows); B = 17 and 33 are no multiple of a row block, so the row masks run too. Families a
# dtype reaches only elsewhere get a case of their own (``oracle.correctness_cases``).
CORRECTNESS_BATCHES = (1, 16, 17, 33, 64, 512)
SMALL_CORRECTNESS_BATCHES = (1, 16, 17, 33, 64, 96)
# Batches over which the families a shape can reach are enumerated.
FAMILY_SEARCH_BATCHES = range(1, 4097)
PASSES = ("forward", "dh-backward", "full-backward")

SECTIONS = ("precompile", "calibration", "correctness", "graphs", "timings", "sweep")
DEFAULT_BUDGET_S = 420.0
# A section starts no new cell once this share of the budget has passed (or when its longest cell
# so far would not fit before it): correctness first, then the graphs, the timings and the sweep, and
# what is left ends the run with time to write. Precompilation gets up to PRECOMPILE_SHARE.
END_BY = {"precompile": 0.30, "calibration": 0.35, "correctness": 0.58, "graphs": 0.64, "timings": 0.88,
          "sweep": 0.95, "install": 0.97}
PRECOMPILE_SHARE = 0.30


def model_shapes(small: bool, *, correctness: bool) -> dict:
    """The shapes of one section: the LM heads, plus the uneven shape for correctness."""
    base = dict(SMALL_MODELS if small else MODELS)
    if correctness:
        base.update(SMALL_UNEVEN if small else UNEVEN)
    return base
