"""The ``smoa`` command. Subcommands register themselves from the modules listed in ``SUBCOMMAND_MODULES``; each
module provides ``register(subparsers)`` that adds its parser and sets ``func`` (called with the parsed args)."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "smoa.bench",
    "smoa.finetune",
    "smoa.study",
    "smoa.rank",
    "smoa.gpu_check",
    "smoa.official",
)


def _info(args: argparse.Namespace) -> int:
    import torch

    import smoa

    print(f"smoa {smoa.__version__}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    print(f"CUDA available: {torch.cuda.is_available()}")
    print(f"active backend: {smoa.get_backend()}")
    for name, (ok, reason) in smoa.available_backends().items():
        print(f"  {name:<10} {'available' if ok else 'unavailable: ' + reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoa", description="SMoA (Spectrum Modulation Adapter): fused kernels, benchmarks and tools."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = subparsers.add_parser("info", help="versions and which backends work on this machine")
    info.set_defaults(func=_info)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
