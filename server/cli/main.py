"""`customllm` command line: one sub-command module per concern."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

# sub-command name → module that defines `add_parser(subparsers)`; each parser sets `func`.
SUBCOMMANDS = {
    "serve": "server.cli.serve",
    "weights": "server.cli.weights",
    "bench": "server.cli.bench.cli",
}


def package_version() -> str:
    try:
        return importlib.metadata.version("customllm-server")
    except importlib.metadata.PackageNotFoundError:   # running from a source tree that was not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="customllm", description="CustomLLM inference server")
    parser.add_argument("--version", action="version", version=f"customllm {package_version()}")
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
