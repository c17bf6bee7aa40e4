"""Triton backend (``backend="triton"``): the op as single-query attention over the vocabulary.

Queries are hidden rows, keys are LM-head rows W_j, values are embedding rows E_j. Nothing of size
[B, V] is ever written: logits exist one [BLOCK_M, BLOCK_V] tile at a time, in registers.

One module per kernel phase, as Apple's Cut Cross-Entropy keeps its kernels, and small host modules:

    ``forward``         online softmax per vocabulary split, and the exact combine of the splits
    ``backward_dh``     d hidden alone (LoRA: W and E frozen), and the split sum of the dh partials
    ``backward_tiles``  every gradient of a vocabulary tile (dW, dE, db; dh folded in)
    ``gemm_path``       larger batches at real widths: cuBLAS GEMMs per vocabulary chunk, Triton between
    ``tiles``           the ``@triton.jit`` helpers the kernels share (dots, tile loads, slices, logits)
    ``launch``          the ``Launch`` record every plan builder returns, the fused kernels' flags
    ``host``            the entry points the dispatcher calls (``forward``, ``backward``) and the launchers
    ``config``          tile shapes and split counts: a pure function of the shape (no Triton import)
    ``aot``             the ahead-of-time compile gate (``python -m gircse_kernels.triton.aot``)
    ``roofline``        bytes and FLOPs of every launch (``python -m gircse_kernels.triton.roofline``)

Each kernel module's docstring states what its kernels read and write per tile and how close that is
to the one pass over W and E the op cannot avoid. This ``__init__`` imports nothing: ``config`` stays
importable without Triton, and ``import gircse_kernels`` does not import Triton (the backend registry,
``gircse_kernels.backends``, imports ``host`` when the backend is first resolved).

Large d. When d (or d_e) fits one block of <= 128 (padded) the hidden rows, W tiles and the
accumulator live in registers: the classic one-pass online softmax. Real widths (576, 896, 3584,
4096) do not fit: logits are accumulated over d in 64-wide chunks, and a [BLOCK_M, d_e] accumulator
(forward) or [BLOCK_M, d] dh / [BLOCK_V, d] dW, dE (backward) lives in a program-private fp32 slice
that is read, updated and written chunk by chunk per tile (``tiles._rmw_product``). Only real rows touch
the slice (masked rows move no bytes), so at decode sizes it is a few KiB per program and stays in
L2; HBM sees each W / E tile once per call (row blocks of one split run side by side and share the
tiles through L2; the tied value chunks re-read a tile that was just read).

Read-modify-write discipline (no lost updates): a slice is only ever touched by the one program
that owns it, and every pass that stores to a slice another pass will reload ends with
``tl.debug_barrier()`` (a CTA barrier: it orders the warps' global stores before any later load of
the same addresses by another warp of the program; the compiler may give the load and the store
different thread layouts). Register-resident accumulators are combined in registers and stored once
(the tied dW + dE merge adds the two register tiles). The AOT gate (``aot``) checks every
compiled kernel that loads and stores one argument for a barrier.

Masked vocabularies (-inf in the bias): the online softmax uses the FlashAttention safe max (while
every logit seen is -inf it subtracts 0, so exp(-inf - -inf) never appears); empty splits carry
(m = -inf, l = 0, acc = 0) and the combine skips them. A row whose every entry is -inf behaves
exactly like ``torch.softmax`` of an all -inf row: output NaN, lse -inf, NaN gradients.

Strides: ``hidden`` and ``grad_out`` have a unit last stride; W and E take any 2-D strides (both
are kernel arguments), e.g. a transposed view of a [d, V] matrix. Triton's JIT specializes a stride
of 1 to a constant, so the row-major and the column-major layouts each get vectorized loads.

Precision: fp32 accumulation everywhere; fp32 inputs use three-pass TF32 dots (~fp32 accurate).
16-bit inputs feed tensor cores with p / dz rounded to the input dtype, as FlashAttention does. The
Triton interpreter miscomputes bf16 ``tl.dot``, so when interpreting (only) operands are upcast to
fp32 (``UPCAST``; the AOT gate checks that compiled 16-bit kernels keep 16-bit dot operands).
"""
