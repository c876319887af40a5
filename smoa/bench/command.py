"""``smoa bench`` as a light subcommand: registering it imports nothing heavy, so ``smoa --help`` stays fast; the
real parser (:func:`smoa.bench.run.register`, which needs torch and the provider registry) is built only when
``smoa bench`` runs, and parses the rest of the command line (``smoa bench --help`` prints its full help)."""

from __future__ import annotations

import argparse

HELP = "time SMoA against a frozen layer, PEFT LoRA/HiRA and the reference (forward, backward, full, memory)"


def _command(args: argparse.Namespace) -> int:
    from smoa.bench.run import register
    from smoa.cli import OneLineParser, run

    parser = OneLineParser(prog="smoa")
    register(parser.add_subparsers(dest="command", parser_class=OneLineParser))
    return run(parser, ["bench", *args.extra_args])


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help=HELP, add_help=False)
    parser.set_defaults(func=_command, takes_extra_args=True)
