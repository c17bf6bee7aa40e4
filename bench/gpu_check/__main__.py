"""``python -m bench.gpu_check``: the one-shot GPU check (see the package docstring)."""
import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned precompile worker imports this module as __mp_main__
    sys.exit(main())
