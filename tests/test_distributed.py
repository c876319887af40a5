"""SMoA PEFT adapters under torch.distributed on the CPU (gloo, 2 processes via torch.multiprocessing.spawn):

- DDP: 2 ranks on half a batch each end with the same factors as 1 process on the concatenated batch;
- FSDP2 (``fully_shard``): frozen base weights and trainable SMoA factors, sharded per SMoA layer and at the root,
  train to the same factors, and the adapter gathered with ``get_model_state_dict(full_state_dict=True)`` and saved
  by rank 0 reloads into a plain model with the single-process outputs;
- the spectral partition runs on the full weight: ``get_peft_model`` before ``fully_shard`` (the orders are replicated
  buffers, never sharded), or, on an already-sharded model, on the gathered DTensor.

One spawn runs every phase (process start-up and imports dominate the cost); the tests read its results.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn as nn

pytest.importorskip("peft", reason="needs the [peft] extra")
pytest.importorskip("transformers", reason="needs the [peft] extra")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from peft import PeftModel, get_peft_model

from smoa.peft import SMoAConfig
from tests.utils import Toy

WORLD_SIZE = 2
STEPS = 3
LR = 0.05


def make_model() -> PeftModel:
    torch.manual_seed(0)  # identical base and adapter init on every rank
    config = SMoAConfig(r=4, num_blocks=2, target_modules=["lin0", "lin1"], init_weights=False)
    return get_peft_model(Toy(), config)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=generator), torch.randn(8, 8, generator=generator)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = STEPS) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()  # mean over the local batch: DDP/FSDP average across ranks
        optimizer.step()


def factors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("module."): p.detach().clone() for n, p in model.named_parameters() if ".smoa_" in n}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        x, y = make_data()
        local = slice(rank * 4, rank * 4 + 4)
        results = {}

        # DDP
        ddp = DistributedDataParallel(make_model())
        train(ddp, x[local], y[local])
        results["ddp"] = factors(ddp)

        # FSDP2: orders computed on the full weight by get_peft_model, then sharding (factors and base weights)
        model = make_model()
        orders = {n: b.clone() for n, b in model.named_buffers() if "_order" in n}
        for module in model.modules():
            if type(module).__name__ == "Linear" and hasattr(module, "smoa_A"):
                fully_shard(module)
        fully_shard(model)
        sharded = [n for n, p in model.named_parameters() if isinstance(p, DTensor)]
        results["fsdp_sharded_params"] = sharded
        results["fsdp_orders_unchanged"] = all(
            torch.equal(orders[n], b) and not isinstance(b, DTensor) for n, b in model.named_buffers() if n in orders
        )
        frozen_before = {n: p.full_tensor().clone() for n, p in model.named_parameters() if not p.requires_grad}
        train(model, x[local], y[local])
        results["fsdp_frozen_unchanged"] = all(
            torch.equal(p.full_tensor(), frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad
        )
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        results["fsdp"] = {
            k: v for k, v in full.items() if ".smoa_" in k and "_order" not in k and "_partition_info" not in k
        }
        if rank == 0:
            model.save_pretrained(os.path.join(out_dir, "fsdp_adapter"), state_dict=full)

        # get_peft_model on an already-sharded base: the SVD sees the gathered weight
        torch.manual_seed(0)
        base = Toy()
        fully_shard(base)
        sharded_model = get_peft_model(base, SMoAConfig(r=4, target_modules=["lin0", "lin1"]))
        results["orders_from_sharded_base"] = {n: b.clone() for n, b in sharded_model.named_buffers() if "_order" in n}
        results["orders_from_full_base"] = orders
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    torch.multiprocessing.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    reference = make_model()
    x, y = make_data()
    train(reference, x, y)  # one process, the concatenated batch
    return out_dir, results, reference


def assert_same_factors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys() and len(got) == 4
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_ddp_two_processes_equal_one_process_on_the_concatenated_batch(distributed):
    _, results, reference = distributed
    expected = factors(reference)
    assert not torch.equal(
        expected["base_model.model.lin0.smoa_B.default.weight"],
        make_model().state_dict()["base_model.model.lin0.smoa_B.default.weight"],
    )  # fmt: skip  (the factors did move)
    for rank_results in results:
        assert_same_factors(rank_results["ddp"], expected)


def test_fsdp2_trains_sharded_factors_like_one_process(distributed):
    _, results, reference = distributed
    for rank_results in results:
        assert len(rank_results["fsdp_sharded_params"]) == 8  # 2 base weights + 2 biases + 4 factors
        assert rank_results["fsdp_orders_unchanged"] and rank_results["fsdp_frozen_unchanged"]
    # full_state_dict with cpu_offload materialises the gathered tensors on rank 0 only
    assert_same_factors(results[0]["fsdp"], factors(reference))
    assert results[1]["fsdp"] == {}


def test_fsdp2_saved_adapter_reloads_with_the_single_process_outputs(distributed):
    out_dir, _, reference = distributed
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Toy(), str(out_dir / "fsdp_adapter"))  # the same base weights (seed 0)
    x, _ = make_data()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), atol=1e-6, rtol=1e-5)


def test_orders_under_sharding_come_from_the_full_weight(distributed):
    _, results, _ = distributed
    for rank_results in results:
        full, sharded = rank_results["orders_from_full_base"], rank_results["orders_from_sharded_base"]
        assert full.keys() == sharded.keys() and len(full) == 4
        for name in full:
            assert torch.equal(full[name], sharded[name]), name


def test_sharding_a_factor_leaf_on_its_own_is_refused(tmp_path):
    """fully_shard(smoa_A) alone would hand the layer a sharded weight: the forward says what to shard instead."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = make_model()
        fully_shard(model.base_model.model.lin0.smoa_A["default"])
        with pytest.raises(RuntimeError, match="FSDP-wrapped on their own"):
            model(torch.randn(2, 16))
    finally:
        dist.destroy_process_group()
