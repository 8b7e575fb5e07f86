"""The `detrkit` command. Each feature module registers its own subcommands."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# module -> it defines `register(subparsers)`; each registered parser sets `func(args) -> int`. These
# modules import nothing heavy at import time (torch loads when a command runs): --help stays fast.
_COMMAND_MODULES = (
    "detrkit.data.commands",      # data synth | check | convert
    "detrkit.engine.commands",    # train, eval, main-job
    "detrkit.engine.panoptic_commands",  # train-masks (panoptic, the paper's second stage)
    "detrkit.predict_command",    # predict
    "detrkit.viz.commands",       # viz queries | attention | curves
    "detrkit.export.commands",    # export onnx | hf
)
# commands whose module needs torch to build its parser: name -> (module with main(argv), one-line help);
# the module is imported only when the command runs (its --help included)
_HEAVY_COMMANDS = {
    "bench": ("detrkit.bench", "speed table: inference, training step, matcher, COCO eval"),
}


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one that the help does not already give."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
                and (action.option_strings or action.nargs in ("?", "*"))):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("detrkit")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="detrkit", description="DETR: train, evaluate, predict, visualise.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)  # a module that fails to import is an error, not a gap
    for name, (module, text) in _HEAVY_COMMANDS.items():
        p = sub.add_parser(name, help=text, add_help=False, description=f"{text} (`detrkit {name} --help`)")
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(func=lambda args, module=module: importlib.import_module(module).main(args.rest))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .errors import run_reporting_errors

    return run_reporting_errors(lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
