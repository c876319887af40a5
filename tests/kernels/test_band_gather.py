"""The coalesced band gather (``blocked.gather_bands_t``) against ``index_select`` on edge shapes, under the Triton
interpreter: exact copies (no arithmetic), so the comparison is exact."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from smoa_kernels.blocks import block_bounds, padded_band_starts
from smoa_kernels.triton import blocked
from tests.utils import triton_interpreter


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    with triton_interpreter():
        yield


TILE = blocked.configs.default_config("band_gather", torch.float16)


@pytest.mark.parametrize(
    ("n", "d", "k", "layout", "dtype"),
    [
        (1, 48, 2, "contiguous", torch.float32),  # one token: a padded token tile
        (TILE["BLOCK_N"] + 1, 67, 3, "contiguous", torch.float16),  # a second token tile; bands of 23, 22, 22
        (9, TILE["BLOCK_C"] + 1, 4, "transposed", torch.float32),  # a second column tile; strides (1, N)
        (5, 20, 1, "strided", torch.float16),  # K = 1: one band; a column slice of a wider tensor
        (16, 33, 33, "contiguous", torch.float32),  # K = d: bands of one column each
    ],
)
def test_band_gather_is_index_select_in_token_minor_bands(n, d, k, layout, dtype):
    torch.manual_seed(0)
    if layout == "transposed":
        t = torch.randn(d, n).to(dtype).t()
    elif layout == "strided":
        t = torch.randn(n, 2 * d).to(dtype)[:, ::2]
    else:
        t = torch.randn(n, d).to(dtype)
    order = torch.randperm(d)
    orders = blocked.prepare_orders(order, order)
    bands = blocked.gather_bands_t(t, orders, "col", k)
    ld = -(-n // 16) * 16
    assert bands.shape == (blocked.band_width(d, k), ld) and bands.dtype == dtype
    starts = padded_band_starts(d, k, blocked.ALIGN)
    for b, (lo, hi) in enumerate(block_bounds(d, k)):
        band = bands[starts[b] : starts[b] + hi - lo]
        assert torch.equal(band[:, :n], t.index_select(1, order[lo:hi]).t())  # exact copies
        assert not band[:, n:].abs().max() > 0 if ld > n else True  # padding tokens are written as zeros


def test_band_gather_of_no_tokens_launches_nothing():
    order = torch.randperm(24)
    orders = blocked.prepare_orders(order, order)
    with blocked.configs.capture_launches() as launches:
        bands = blocked.gather_bands_t(torch.empty(0, 24), orders, "row", 2)
    assert bands.shape == (blocked.band_width(24, 2), 0) and not launches
