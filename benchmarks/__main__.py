"""``python -m benchmarks <sub-command> [options]``: the one entry point."""

from __future__ import annotations

import importlib
import sys

from benchmarks import SUBCOMMANDS


def run(name: str, argv: list[str]) -> None:
    """Run sub-command ``name`` with the arguments ``argv`` (exits on an unknown name)."""
    if name not in SUBCOMMANDS:
        sys.exit(f"unknown sub-command {name!r}; run `python -m benchmarks` for the list.")
    module, function, _ = SUBCOMMANDS[name]
    getattr(importlib.import_module(f"benchmarks.{module}"), function)(argv)


def usage() -> str:
    """The list of sub-commands."""
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:{width}s}  {summary}" for name, (_, _, summary) in SUBCOMMANDS.items()]
    return "usage: python -m benchmarks <sub-command> [options]\n\nsub-commands:\n" + "\n".join(
        lines
    )


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``argv`` (default: the command line) to its sub-command."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        if not argv:
            sys.exit(2)
        return
    run(argv[0], argv[1:])


if __name__ == "__main__":
    main()
