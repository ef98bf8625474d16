"""`repa-kernels info | bench | demo | cache`: each subcommand lives in its own module and is imported lazily."""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.util import find_spec

# subcommand -> (module, help); each module provides add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "info": ("repa_kernels.info", "versions and which backend runs on CPU and CUDA, and why"),
    "bench": ("repa_kernels.bench.cli", "run the benchmark workloads (docs/contract.md §8) and write CSV and plots"),
    "demo": ("repa_kernels.demo", "a short CREPA fine-tune of a tiny Wan transformer on CPU"),
    "cache": ("repa_kernels.cache_info", "what a teacher-feature cache holds: identity, entries, size"),
}


def optional_modules(command: str, args: argparse.Namespace) -> dict[str, str]:
    """{module: extra that installs it} that `command` will import with these arguments.

    Checked before the command starts, so a missing plotting library is said at once, not after a
    training run (the demo used to train all its steps and then fail in its plot)."""
    if command == "demo":
        return {name: "demo" for name in ("diffusers", "transformers", "matplotlib", "tqdm")}
    if command == "bench":
        needed = {} if args.list else {"matplotlib": "bench"}
        if args.e2e:
            needed |= {"diffusers": "diffusers", "transformers": "diffusers"}
        return needed
    return {}


def missing_modules_message(command: str, needed: dict[str, str]) -> str | None:
    missing = {name: extra for name, extra in needed.items() if find_spec(name) is None}
    if not missing:
        return None
    extras = ",".join(sorted(set(missing.values())))
    return (f"`{command}` needs {', '.join(sorted(missing))}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: pip install 'repa-kernels[{extras}]'")


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
    args = parser.parse_args(argv)
    problem = missing_modules_message(chosen.command, optional_modules(chosen.command, args))
    if problem is not None:
        print(f"repa-kernels {chosen.command}: error: {problem}", file=sys.stderr)
        return 2
    return int(module.run(args) or 0)

if __name__ == "__main__":
    sys.exit(main())
