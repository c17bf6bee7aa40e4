"""The sweep of design choices the roofline model cannot settle: each alternative timed side by side, next to
its roofline prediction, the choice in use first."""
from __future__ import annotations

import contextlib

from .report import sticky_cuda_error

# Design choices the roofline model cannot settle, timed side by side on the GPU, each next to its roofline
# prediction; the choice in use is timed first. (pass, rows, setting, alternatives):
#   "blocks": alternatives to the ``triton_config.BLOCKS`` entry the call uses (block_m, block_v, warps,
#       stages). The narrow tied models at B = 32 sit on an L2-residency cliff of the fused kernels (per-
#       program fp32 slice + re-read W tile vs L2): on the H200's side of it (32, 64) models 1.11x the
#       one-pass traffic for Qwen2.5-0.5B against 3.06x for the entry, on the H100's side 4x. The dh-only
#       backward at B = 1: with 16-row vocabulary tiles the model keeps each W tile in L2 for the dz W pass
#       (the 7B models: 1.0x the one-pass traffic instead of 1.5x, e.g. Qwen2-7B 510 us instead of 780 on
#       the H200), but the same tiles lose at B = 8 (2.6x), so a GPU must say first. The decode forward.
#   "gemm_chunk": the GEMM path's vocabulary chunk as a fraction of V (today about V / 2, bounded by
#       GEMM_BUFFER_BYTES). Smaller chunks keep a chunk's W (tied: also its E) in L2 for the GEMM that
#       reads it again, at the price of launches and per-chunk rescaling: at B = 128 the model has
#       Qwen2.5-0.5B's forward at 2.58x the one-pass traffic with V / 2 and 1.11x with V / 16, but slower
#       (248 -> 399 us on the H200), and V / 4 faster in time on both GPUs while still at 2.02x.
# Calls that do not run the setting at that B (the GEMM path for "blocks", the fused kernels for
# "gemm_chunk") are left out.
SWEEP = (
    ("forward", 32, "blocks", [(32, 64, 8, 3), (16, 64, 8, 3), (64, 64, 8, 3)]),
    ("dh-backward", 32, "blocks", [(32, 64, 8, 3), (32, 128, 8, 3), (16, 64, 8, 3)]),
    ("forward", 128, "gemm_chunk", [4, 8, 16]),
    ("dh-backward", 128, "gemm_chunk", [4, 8, 16]),
    ("dh-backward", 1, "blocks", [(16, 16, 8, 3), (16, 32, 8, 3)]),
    ("forward", 1, "blocks", [(16, 128, 4, 3), (16, 64, 8, 4), (16, 32, 4, 4)]),
)
SWEEP_KERNELS = {"forward": "forward", "dh-backward": "backward_hidden"}


def _chunk_rows(vocab: int, fraction: int) -> int:
    from gircse_kernels.triton import config as triton_config

    align = triton_config.GEMM_CHUNK_ALIGN
    return max(align, -(-vocab // fraction // align) * align)


@contextlib.contextmanager
def overriding(blocks=None, gemm_chunk=None):
    """Plans and launches under one sweep alternative: ``blocks`` = (BLOCKS key, choice) replaces that
    entry, ``gemm_chunk`` makes every GEMM-path chunk that many rows; everything is restored after.
    With neither, nothing is touched (the plain plans of the precompile section)."""
    from gircse_kernels.triton import config as triton_config

    if blocks is None and gemm_chunk is None:
        yield
        return
    saved_blocks, saved_chunk = dict(triton_config.BLOCKS), triton_config.gemm_chunk
    try:
        if blocks is not None:
            triton_config.BLOCKS[tuple(blocks[0])] = tuple(blocks[1])
        if gemm_chunk is not None:
            triton_config.gemm_chunk = lambda rows, vocab, bytes_per_element: gemm_chunk
        triton_config.choose_config.cache_clear()
        yield
    finally:
        triton_config.BLOCKS.clear()
        triton_config.BLOCKS.update(saved_blocks)
        triton_config.gemm_chunk = saved_chunk
        triton_config.choose_config.cache_clear()


def sweep_cells(models, num_sms):
    """The SWEEP entries that apply to ``models``: dicts of model, shape, pass, rows, setting, key and
    choices (the one in use first)."""
    import torch

    from gircse_kernels.triton import config as triton_config

    cells = []
    for pass_name, rows, setting, alternatives in SWEEP:
        for name, (vocab, d, de, tied) in models.items():
            de = d if tied else de
            cfg = triton_config.choose_config(rows, vocab, d, de, torch.bfloat16, num_sms)
            if (cfg.kind == "gemm") != (setting == "gemm_chunk"):
                continue
            if setting == "blocks":
                key = (SWEEP_KERNELS[pass_name], 2, "small" if rows <= 16 else "large",
                       triton_config.feature_mode(d, de))
                choices = [triton_config.BLOCKS[key]] + [a for a in alternatives if a != triton_config.BLOCKS[key]]
            else:
                key = ("gemm_chunk",)
                current = cfg.gemm_chunk_forward if pass_name == "forward" else cfg.gemm_chunk
                choices = list(dict.fromkeys([current] + [_chunk_rows(vocab, f) for f in alternatives]))
            cells.append(dict(model=name, shape=(vocab, d, de, tied), pass_name=pass_name, rows=rows, setting=setting,
                              key=key, choices=choices))
    return cells


def sweep(models, device, recorder, hardware_model, *, end_by, l2_bytes, flush):
    """Time every choice of ``sweep_cells(models)`` as one cell of the report's ``sweep`` section (an
    alternative that fails to compile or run is reported with its error, and the sweep goes on)."""
    from gircse_kernels.triton import roofline as rl

    for cell in sweep_cells(models, hardware_model.num_sms):
        (vocab, d, de, tied), setting, key = cell["shape"], cell["setting"], cell["key"]
        for choice in cell["choices"]:
            ident = dict(setting=setting, key=list(key), choice=list(choice) if setting == "blocks" else choice,
                         model=cell["model"], rows=cell["rows"], pass_name=cell["pass_name"],
                         current=choice == cell["choices"][0])
            label = f"{cell['model']} B={cell['rows']} {cell['pass_name']} {setting}={choice}"
            if not recorder.room_for_cell("sweep", end_by):
                recorder.skip_cell("sweep", ident, label=label, reason="budget")
                continue
            override = dict(blocks=(key, choice)) if setting == "blocks" else dict(gemm_chunk=choice)

            def timed_choice(override=override, ident=ident):
                with overriding(**override):
                    row = dict(model_s=rl.predict(ident["pass_name"], ident["rows"], vocab, d, de, tied=tied,
                                                  hardware=hardware_model).seconds)
                    try:
                        row["seconds"] = _sweep_time(ident["pass_name"], ident["rows"], vocab, d, de, tied, device,
                                                     l2_bytes=l2_bytes, flush=flush)
                    except Exception as exc:
                        if sticky_cuda_error(exc):
                            raise
                        row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                    return row
            recorder.cell("sweep", ident, timed_choice, label=label)


def _sweep_time(pass_name, rows, vocab, d, de, tied, device, *, l2_bytes, flush):
    """Seconds of one call of the backend (the backward alone, from a saved forward) under the current choice."""
    import torch

    from gircse_kernels.triton import host

    from .oracle import make_inputs
    from .timing import cell_bytes, measure, side_stream

    h, w, e, _ = make_inputs(vocab, d, de, torch.bfloat16, device, rows=rows, tied=tied, bias=False)
    kw = dict(temperature=1.0, softcap=None, tied=tied)
    data, output = cell_bytes(pass_name, rows, vocab, d, de, tied)
    with side_stream(device):
        if pass_name == "forward":
            fn = lambda: host.forward(h, w, e, None, **kw)  # noqa: E731
        else:
            out32, lse = host.forward(h, w, e, None, **kw)
            go = torch.randn(rows, de, device=device, dtype=torch.bfloat16)
            delta = (go.float() * out32).sum(-1)
            fn = lambda: host.backward(go, h, w, e, None, lse, delta, **kw)  # noqa: E731
        return measure(fn, device, data_bytes=data, l2_bytes=l2_bytes, output_bytes=output, flush=flush)["seconds"]
