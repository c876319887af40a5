"""``python -m experiments {finetune,study,rank} ...``: the research harness's command line (see the package doc)."""

from __future__ import annotations

import sys

from smoa.cli import build_parser, run

COMMAND_MODULES: tuple[str, ...] = ("experiments.finetune", "experiments.study", "experiments.rank")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(COMMAND_MODULES, prog="python -m experiments")
    parser.description = "The fine-tuning study behind results/: MiniLM-L6 on bundled tweets, LoRA/HiRA/SMoA."
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
