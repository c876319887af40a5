"""pytest-benchmark suite of ``smoa bench``'s providers at CPU-sized shapes (``pytest benchmarks --benchmark-only``).

Not part of the default test run (pyproject's ``testpaths = ["tests"]``). Setup, providers, oracles and the FLOP
floors come from :mod:`smoa.bench` — the same code ``smoa bench`` times — and every case passes the same correctness
guard against :mod:`smoa_kernels.reference` (the oracle the tests use) before it is timed.
"""
