"""The `detrkit` command. Each feature module registers its own subcommands."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module -> it defines `register(subparsers)`; each registered parser sets `func(args) -> int`
_COMMAND_MODULES = (
    "detrkit.data.commands",      # data synth | check | convert
    "detrkit.engine.commands",    # train, eval, main-job
    "detrkit.engine.panoptic_commands",  # train-masks (panoptic, the paper's second stage)
    "detrkit.predict_command",    # predict
    "detrkit.viz.commands",       # viz queries | attention | curves
    "detrkit.export.commands",    # export onnx | hf
    "detrkit.bench",              # bench
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("detrkit")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detrkit", description="DETR: train, evaluate, predict, visualise.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)  # a module that fails to import is an error, not a gap
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .errors import run_reporting_errors

    return run_reporting_errors(lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
