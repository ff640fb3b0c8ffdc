"""`customllm` command line: one sub-command module per concern."""
from __future__ import annotations

import argparse
import importlib
import sys

# sub-command name → module that defines `add_parser(subparsers)`; each parser sets `func`.
SUBCOMMANDS = {
    "serve": "server.cli.serve",
    "weights": "server.cli.weights",
    "bench": "server.cli.bench.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="customllm", description="CustomLLM inference server")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"customllm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
