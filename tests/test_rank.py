"""experiments.rank: numerical and entropy effective rank on matrices of known rank, and the report/CLI plumbing."""

import json
import math

import pytest
import torch

from experiments.rank import (
    _layer_kind,
    effective_rank,
    load_spectra,
    markdown,
    numerical_rank,
    rank_report,
    singular_values,
)


def _matrix_of_rank(rank: int, rows: int = 40, cols: int = 30, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, cols, generator=generator, dtype=torch.float64)
    return left @ right


@pytest.mark.parametrize("rank", [1, 3, 7, 30])  # 30 = min(rows, cols): full rank
def test_numerical_rank_of_low_rank_products(rank):
    assert numerical_rank(singular_values(_matrix_of_rank(rank))) == rank


def test_numerical_rank_threshold_is_relative_to_sigma_max():
    sigma = [10.0, 1.0, 0.0101, 0.0099, 0.0]
    assert numerical_rank(sigma) == 3  # 0.0101 > 1e-3·10, 0.0099 is not
    assert numerical_rank(sigma, tol=0.05) == 2
    assert numerical_rank([0.0, 0.0]) == 0


def test_effective_rank_of_flat_and_decaying_spectra():
    assert effective_rank([2.0] * 5 + [0.0] * 3) == pytest.approx(5.0)  # k equal singular values: exactly k
    assert effective_rank(singular_values(torch.eye(12, dtype=torch.float64))) == pytest.approx(12.0)
    assert effective_rank([1.0]) == pytest.approx(1.0)
    assert effective_rank([0.0, 0.0]) == 0.0
    decaying = [2.0**-i for i in range(10)]
    assert 1.0 < effective_rank(decaying) < numerical_rank(decaying) == 10
    p = [v / sum(decaying) for v in decaying]
    assert effective_rank(decaying) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))


def test_rank_report_and_table(tmp_path):
    spectra = {
        "low": {"bert.encoder.layer.0.attention.self.query": singular_values(_matrix_of_rank(2))},
        "full": {"bert.encoder.layer.0.attention.self.query": singular_values(_matrix_of_rank(30))},
    }
    path = tmp_path / "spectra.json"
    path.write_text(json.dumps(spectra))
    loaded = load_spectra([path])
    report = rank_report(loaded)
    assert report["low"]["mean_numerical_rank"] == 2
    assert report["full"]["by_kind"]["query"]["mean_numerical_rank"] == 30
    table = markdown(report)
    assert "| low | 2.0 /" in table and "query (30)" in table


def test_layer_kinds_of_a_bert():
    assert _layer_kind("bert.encoder.layer.3.attention.self.query") == "query"
    assert _layer_kind("bert.encoder.layer.3.attention.output.dense") == "attention.output.dense"
    assert _layer_kind("bert.encoder.layer.3.output.dense") == "output.dense"  # not merged with the attention's
    assert _layer_kind("bert.pooler.dense") == "pooler.dense"
