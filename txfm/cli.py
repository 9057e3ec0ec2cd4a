"""The ``txfm`` command: ``txfm data synth|convert``, ``txfm train``, ``txfm embed``,
``txfm genes``, ``txfm eval relationships|perturbation``.

Each subpackage registers its own subcommands (``register(subparsers)`` in its ``cli``
module) and imports its heavy dependencies only when its command runs.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from txfm.data.cli import register as register_data
    from txfm.eval.cli import register as register_eval
    from txfm.train.cli import register as register_train

    parser = argparse.ArgumentParser(prog="txfm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_data(sub)
    register_train(sub)
    register_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
