"""Shim: ``python benchmarks/benchmark.py <sub-command> [options]`` is
``python -m benchmarks <sub-command> [options]`` (the commands quoted before the package
split keep working)."""

import sys
from pathlib import Path

if __name__ == "__main__":
    root = str(Path(__file__).resolve().parents[1])
    # this folder's modules are the package's, not top-level names
    sys.path[0] = root
    from benchmarks.__main__ import main

    main()
