"""Command line: ``gircse demo``."""
from __future__ import annotations

import argparse
import time


def _demo(args) -> int:
    import torch

    import gircse_kernels
    from gircse_kernels import reference

    torch.manual_seed(0)
    hidden = torch.randn(args.batch, 576)
    weight = torch.randn(49152, 576) / 576 ** 0.5
    start = time.perf_counter()
    fused = gircse_kernels.soft_token_embedding(hidden, weight, weight)
    fused_s = time.perf_counter() - start
    start = time.perf_counter()
    ref = reference.soft_token_embedding(hidden, weight, weight)
    ref_s = time.perf_counter() - start
    err = (fused - ref).abs().max().item()
    print(f"soft_token_embedding B={args.batch} V=49152 d=576: fused {fused_s * 1e3:.1f} ms, "
          f"reference {ref_s * 1e3:.1f} ms, max |diff| {err:.2e}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gircse")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the fused op against the reference")
    demo.add_argument("--batch", type=int, default=8)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)
