"""The ``smoa`` command.

Subcommands register themselves from the modules listed in ``SUBCOMMAND_MODULES``; each module provides
``register(subparsers)`` that adds its parser and sets ``func`` (called with the parsed args). A listed module that
is not installed is left out (the list names commands that other branches add). Module tops import only the standard
library, so ``smoa --help`` answers without importing torch; a command whose parser needs heavy imports registers a
light stub with ``set_defaults(takes_extra_args=True)`` and parses the rest itself (``args.extra_args``).

Errors: a bad argument, a missing or unreadable file, or an invalid value exits with status 2 and one line
``smoa <command>: error: ...`` naming it (no traceback; ``SMOA_DEBUG=1`` re-raises for one).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys

SUBCOMMAND_MODULES: tuple[str, ...] = ("smoa.bench.command", "smoa.gpu_check", "smoa.official")

# what a command raises for a bad argument or file: reported in one line, exit status 2
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, json.JSONDecodeError)


class CommandError(Exception):
    """Raise from a command for a user error that is not a ValueError/OSError (reported in one line, status 2)."""


class OneLineParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _torch_build_cuda() -> str | None:
    """``torch.version.cuda`` read from torch's ``version.py`` without importing torch (``None``: a CPU build)."""
    import ast
    from pathlib import Path

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        tree = ast.parse((Path(spec.submodule_search_locations[0]) / "version.py").read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                      else None)  # fmt: skip
        if isinstance(target, ast.Name) and target.id == "cuda" and isinstance(node.value, ast.Constant):
            return node.value.value
    return None


def _driver_cuda_devices() -> int:
    """CUDA devices the NVIDIA driver reports (``cuInit`` + ``cuDeviceGetCount``; 0 without a driver)."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1" if sys.platform.startswith("linux") else "nvcuda.dll")
        count = ctypes.c_int(0)
        if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except (OSError, AttributeError):
        return 0


def _info(args: argparse.Namespace) -> int:
    """Versions and backends in well under a second: nothing heavy is imported unless ``--full``."""
    if args.full:
        import torch

        import smoa

        print(f"smoa {smoa.__version__}  torch {torch.__version__}  triton {_version('triton') or 'not installed'}")
        print(f"CUDA available (torch): {torch.cuda.is_available()}")
        print(f"active backend: {smoa.get_backend()}")
        for name, (ok, reason) in smoa.available_backends().items():
            print(f"  {name:<10} {'available' if ok else 'unavailable: ' + reason}")
        return 0
    from smoa import __version__

    torch_version, triton_version = _version("torch"), _version("triton")
    build_cuda, devices = _torch_build_cuda(), _driver_cuda_devices()
    print(f"smoa {__version__}  torch {torch_version or 'not installed'}  triton {triton_version or 'not installed'}")
    print(f"torch built with CUDA: {build_cuda or 'no (CPU build)'}; CUDA devices seen by the driver: {devices}")
    backend = os.environ.get("SMOA_BACKEND", "").strip() or "auto"
    print(f"active backend: {backend}" + (" (from $SMOA_BACKEND)" if backend != "auto" else ""))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if triton_version is None:
        triton_status = "unavailable: triton is not installed"
    elif (build_cuda and devices) or interpret:
        triton_status = "available" + (" (TRITON_INTERPRET=1: the interpreter, on CPU tensors)" if interpret else "")
    else:
        triton_status = "unavailable: no CUDA device and TRITON_INTERPRET is not set to 1"
    for name, status in (("reference", "available"), ("torch", "available"), ("triton", triton_status)):
        print(f"  {name:<10} {status}")
    print("(smoa info --full imports torch and checks the backends themselves)")
    return 0


def _module_is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def build_parser(modules: tuple[str, ...] = SUBCOMMAND_MODULES, prog: str = "smoa") -> argparse.ArgumentParser:
    """The ``smoa`` parser with ``info`` and every installed module of ``modules`` registered."""
    parser = OneLineParser(
        prog=prog, description="SMoA (Spectrum Modulation Adapter): fused kernels, benchmarks and tools."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    if prog == "smoa":
        info = subparsers.add_parser("info", help="versions and which backends work on this machine")
        info.add_argument("--full", action="store_true", help="import torch and check every backend itself (slower)")
        info.set_defaults(func=_info)
    for module in modules:
        if _module_is_installed(module):
            importlib.import_module(module).register(subparsers)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` with ``parser`` and run the chosen command; user errors → one line on stderr, status 2."""
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "func", None) is None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.print_help()
        return 0
    if extra and not getattr(args, "takes_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    try:
        return int(args.func(args) or 0)
    except (*USER_ERRORS, CommandError) as error:
        if os.environ.get("SMOA_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in message:
            message = f"{message}: {error.filename}"
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes (imported by peft) logs a hint about an optional CPU kernel package on AVX512-BF16 CPUs at import;
    # in the command's output it reads like an error of ours, so the command keeps only that logger's errors
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
