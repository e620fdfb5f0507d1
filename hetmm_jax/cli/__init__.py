"""The ``hetmm`` command line.

This package only parses arguments, calls the library and reports. Each sub-command lives in its
own module that exposes ``register(subparsers)``; the parser it adds sets ``func``, a callable
taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from hetmm_jax.errors import HetmmError

_COMMAND_MODULES = ("weights", "detect", "demo")

log = logging.getLogger("hetmm_jax")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetmm",
        description="HETMM anomaly detection in JAX: fit on defect-free images, find defects.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"hetmm_jax.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except HetmmError as err:
        print(f"hetmm: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hetmm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
