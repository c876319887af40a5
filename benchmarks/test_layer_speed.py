"""Per-provider, per-mode timings of one adapted linear layer (CPU-sized), via pytest-benchmark."""

from __future__ import annotations

import pytest
import torch

from smoa.bench import MODES, PROVIDERS, TOLERANCES, BenchInputs, build_case, flop_floor

pytest.importorskip("pytest_benchmark")
pytest.importorskip("peft")

D_IN, D_OUT, TOKENS, RANK, BLOCKS = 256, 256, 512, 16, 2  # small enough for a 2-core CPU, K·r_k = r as in the paper
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CASES = [(name, variant) for name, p in PROVIDERS.items() for variant in ("", "merged")[: 1 + p.merged_variant]]


@pytest.fixture(scope="module")
def inputs() -> BenchInputs:
    return BenchInputs.make(D_IN, D_OUT, TOKENS, torch.float32, DEVICE)


@pytest.fixture(scope="module")
def cases(inputs):
    """Built (and checked) once per provider/variant; an unavailable provider maps to its skip reason."""
    built = {}
    for name, variant in CASES:
        reason = PROVIDERS[name].unavailable(DEVICE)
        if reason:
            built[name, variant] = reason
            continue
        case = build_case(name, inputs, RANK, BLOCKS, variant)
        error, _ = case.check()
        assert error <= TOLERANCES[inputs.dtype], f"{case.label}: max relative error {error:.3g} against the oracle"
        built[name, variant] = case
    return built


PARAMS = [(name, variant, mode) for name, variant in CASES for mode in (("inference",) if variant else MODES)]


@pytest.mark.parametrize(
    ("provider", "variant", "mode"), PARAMS, ids=[f"{n}{'-' + v if v else ''}-{m}" for n, v, m in PARAMS]
)
def test_layer(benchmark, cases, provider, variant, mode):
    case = cases[provider, variant]
    if isinstance(case, str):
        pytest.skip(case)
    rank = case.provider.rank(RANK, BLOCKS)
    floor = flop_floor(case.provider.family, mode, TOKENS, D_IN, D_OUT, rank, BLOCKS, merged=variant == "merged")
    benchmark.group = f"{mode} {D_IN}x{D_OUT} N={TOKENS} r={RANK} K={BLOCKS}"
    benchmark.extra_info.update(floor_gflop=floor / 1e9, adapter_rank=rank, threads=torch.get_num_threads())
    benchmark(case.step(mode))
