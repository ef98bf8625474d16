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
    parser = argparse.ArgumentParser(prog="repa-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            sub_parser.set_defaults(_import_error=exc)
            continue
        module.add_arguments(sub_parser)
        modules[name] = module
    args = parser.parse_args(argv)
    if args.command not in modules:
        parser.error(f"`{args.command}` is unavailable: {args._import_error}")
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
