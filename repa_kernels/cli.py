"""`repa-kernels info | bench | demo`: each subcommand lives in its own module and is imported lazily."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help); each module provides add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "info": ("repa_kernels.info", "versions and which backend runs on CPU and CUDA, and why"),
    "bench": ("repa_kernels.bench.cli", "run the SPEC §8 benchmark workloads and write CSV and plots"),
    "demo": ("repa_kernels.demo", "a short CREPA fine-tune of a tiny Wan transformer on CPU"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="repa-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub_parsers = {name: sub.add_parser(name, help=help_text, add_help=False)
                   for name, (_, help_text) in SUBCOMMANDS.items()}
    # Only the chosen subcommand's module is imported; if that fails, the import error is the message
    # (not an "unrecognized arguments" from a sub-parser that never got its options).
    chosen, _ = parser.parse_known_args(argv)
    try:
        module = importlib.import_module(SUBCOMMANDS[chosen.command][0])
    except ImportError as exc:
        parser.error(f"`{chosen.command}` is unavailable: {exc}")
    sub_parser = sub_parsers[chosen.command]
    sub_parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    module.add_arguments(sub_parser)
    return int(module.run(parser.parse_args(argv)) or 0)

if __name__ == "__main__":
    sys.exit(main())
