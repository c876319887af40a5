"""Every test starts from the same global RNG state (``torch.manual_seed(seeded(0))``), whatever ran before it, so that
a test's random inputs depend on neither the test order nor which tests were selected, and ``SMOA_TEST_SEED`` (see
tests/utils.py, .ci/matrix) moves them all."""

from __future__ import annotations

import pytest
import torch

from tests.utils import seeded


@pytest.fixture(autouse=True)
def _seed_global_rng():
    torch.manual_seed(seeded(0))
