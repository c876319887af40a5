"""The research harness behind ``results/``: not part of the installed ``smoa`` package (like PEFT's
``method_comparison/``). Run it from the repository root::

    python -m experiments finetune --adapter smoa -r 8 -K 2 --lr 3e-2 --train-size 4000 -o smoa.json
    python -m experiments study --quick
    python -m experiments rank results/study/spectra.json --out results/rank

:mod:`experiments.data` (bundled tweets / BBC News), :mod:`experiments.finetune` (one fine-tune of MiniLM-L6),
:mod:`experiments.study` (the SMoA vs LoRA/HiRA study), :mod:`experiments.rank` (effective rank of trained ΔW).
Outputs go to ``smoa-results/`` in the current directory (git-ignored) unless ``--out``/``-o`` says otherwise.
It builds on the product (``smoa``, ``smoa.peft``); the product never imports it.
"""
