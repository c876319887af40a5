"""Many SMoA adapters of one base in one batch, from the user's side: PEFT's ``adapter_names=`` through the one-pass
multi-adapter kernel (when the triton backend runs the layer) against each sample run through its adapter alone, the
routes that keep the per-sub-batch loop (and give the same outputs), the bank's cache, and ``smoa.multi.adapter_bank``
for ``SMoALinear`` layers. The kernels themselves: tests/kernels/test_multi_adapter.py."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("peft", reason="the PEFT route needs the [peft] extra")
pytest.importorskip("triton", reason="the one-pass route is the triton backend's")

from peft import get_peft_model

import smoa
import smoa_kernels.triton.multi_adapter as triton_multi
from smoa.layer import SMoALinear
from smoa.multi import adapter_bank
from smoa.peft import SMoAConfig
from tests.utils import Toy, seeded

NAMES = ["first", "second", "third"]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    original = triton_multi.multi_adapter_forward

    def counting(*args, **kwargs):
        calls.append(args[3].num_adapters)
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_multi, "multi_adapter_forward", counting)
    return calls


def model_with_adapters(num_blocks=(2, 2, 2), ranks=(4, 2, 6), dropout=0.0):
    torch.manual_seed(seeded(0))
    base = Toy()
    config = {"target_modules": ["lin0", "lin1"], "init_weights": False, "lora_dropout": dropout}
    model = get_peft_model(base, SMoAConfig(r=ranks[0], num_blocks=num_blocks[0], **config), adapter_name=NAMES[0])
    for name, K, r in zip(NAMES[1:], num_blocks[1:], ranks[1:]):
        model.add_adapter(name, SMoAConfig(r=r, num_blocks=K, lora_alpha=2 * r, **config))
    return model.eval()


@torch.no_grad()
def alone(model, x, adapter_names):
    """Each sample through its own adapter (or the base), one sample at a time: the oracle."""
    rows = []
    for i, name in enumerate(adapter_names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(model(x[i : i + 1]))
        else:
            model.set_adapter(name)
            rows.append(model(x[i : i + 1]))
    return torch.cat(rows)


def inputs(n=7, shape=()):
    return torch.randn(n, *shape, 16, generator=torch.Generator().manual_seed(seeded(1)))


MIXES = {
    "all-three-and-base": ["first", "second", "__base__", "third", "first", "second", "third"],
    "one-adapter": ["second"] * 7,
    "base-and-one": ["__base__", "third", "__base__", "__base__", "third", "__base__", "__base__"],
    "one-token-each": ["third", "first", "second", "__base__", "__base__", "__base__", "__base__"],
}


@pytest.mark.parametrize("mix", MIXES, ids=list(MIXES))
@pytest.mark.parametrize("shape", [(), (3,)], ids=["tokens", "sequences"])
def test_adapter_names_take_one_pass_and_match_each_adapter_alone(mix, shape, kernel_calls):
    model = model_with_adapters()
    x, names = inputs(shape=shape), MIXES[mix]
    expected = alone(model, x, names)
    with torch.no_grad(), smoa.use_backend("triton"):
        out = model(x, adapter_names=names)
    assert len(kernel_calls) == 2  # lin0 and lin1, each in one launch for every adapter of the batch
    scale = expected.detach().abs().max()
    torch.testing.assert_close(out, expected, atol=1e-5 * float(scale), rtol=1e-5)


def test_the_sub_batch_route_gives_the_same_outputs(kernel_calls):
    model = model_with_adapters()
    x, names = inputs(), MIXES["all-three-and-base"]
    with torch.no_grad():
        with smoa.use_backend("torch"):  # another backend: the per-sub-batch loop
            loop = model(x, adapter_names=names)
        assert kernel_calls == []
        with smoa.use_backend("triton"):
            one_pass = model(x, adapter_names=names)
    assert len(kernel_calls) == 2
    torch.testing.assert_close(one_pass, loop, atol=1e-5 * float(loop.abs().max()), rtol=1e-5)


def test_adapters_of_another_num_blocks_fall_back_to_the_sub_batch_route(kernel_calls):
    model = model_with_adapters(num_blocks=(2, 3, 2))
    x, names = inputs(), MIXES["all-three-and-base"]
    expected = alone(model, x, names)
    with torch.no_grad(), smoa.use_backend("triton"):
        out = model(x, adapter_names=names)
        assert kernel_calls == []  # refused by the bank (one K per pass), so the loop ran
        same_k = model(x, adapter_names=["first", "third"] * 3 + ["__base__"])
    assert len(kernel_calls) == 2  # a batch of only the K = 2 adapters takes the one pass again
    torch.testing.assert_close(out, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)
    torch.testing.assert_close(same_k, alone(model, x, ["first", "third"] * 3 + ["__base__"]), atol=1e-4, rtol=1e-5)


def test_training_and_dropout_keep_the_autograd_route(kernel_calls):
    model = model_with_adapters(dropout=0.1)
    x, names = inputs(), MIXES["all-three-and-base"]
    layer = model.base_model.model.lin0
    with smoa.use_backend("triton"):
        layer.train()  # PEFT refuses adapter_names on a model in training mode; a layer called directly does not
        with torch.no_grad():
            layer(x, adapter_names=names)  # dropout on each adapter's input: the loop applies it
        assert kernel_calls == []
        layer.eval()
        for name, param in model.named_parameters():
            param.requires_grad_("smoa_" in name)
        out = model(x, adapter_names=names)  # grad mode with trainable factors: the kernel is forward only
        assert kernel_calls == []
        out.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "smoa_A.second" in n]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_a_factor_update_rebuilds_the_bank(kernel_calls):
    model = model_with_adapters()
    x, names = inputs(), MIXES["all-three-and-base"]
    with torch.no_grad(), smoa.use_backend("triton"):
        before = model(x, adapter_names=names)
        for name, param in model.named_parameters():
            if "smoa_B.second" in name:
                param.mul_(3.0)  # an optimizer-like in-place write: the version counter moves
        after = model(x, adapter_names=names)
    expected = alone(model, x, names)
    torch.testing.assert_close(after, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)
    changed = [i for i, n in enumerate(names) if n == "second"]
    assert not torch.allclose(before[changed], after[changed])


def smoa_linears(count=3, seed=0):
    torch.manual_seed(seeded(seed))
    base = nn.Linear(24, 18)
    layers = {}
    for i in range(count):
        torch.manual_seed(seeded(seed + 1 + i))
        layers[f"task{i}"] = SMoALinear.from_linear(base, r=4 + 2 * i, num_blocks=3, alpha=2.0, init_weights=False)
    return base, layers


def test_adapter_bank_of_smoalinear_layers_matches_each_layer():
    _, layers = smoa_linears()
    bank = adapter_bank(layers)
    x = torch.randn(5, 4, 24, generator=torch.Generator().manual_seed(seeded(2)))
    names = ["task2", "__base__", "task0", "task1", "task2"]
    index = bank.index_for(names, x.shape[:-1])
    first = next(iter(layers.values()))
    for backend in ("torch", "triton"):
        with torch.no_grad():
            out = bank(x, first.bias, index, backend=backend)
            for i, name in enumerate(names):
                expected = (
                    nn.functional.linear(x[i], first.weight, first.bias) if name == "__base__" else layers[name](x[i])
                )
                torch.testing.assert_close(out[i], expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-5)


def test_adapter_bank_refuses_other_bases_and_merged_layers():
    _, layers = smoa_linears(2)
    _, others = smoa_linears(1, seed=5)
    with pytest.raises(ValueError, match=r"layers\['other'\] adapts another base weight"):
        adapter_bank({**layers, "other": others["task0"]})
    layers["task1"].merge()
    with pytest.raises(ValueError, match=r"layers\['task1'\] is merged"):
        adapter_bank(layers)
    with pytest.raises(RuntimeError, match="holds another SMoA layer's merged update"):
        adapter_bank({"task0": layers["task0"]})  # task1 (not in the bank) merged into the W0 task0 shares
    layers["task1"].unmerge()
    adapter_bank(layers)  # unmerged: accepted again
    with pytest.raises(TypeError, match=r"layers\[0\] must be an SMoALinear, got Linear"):
        adapter_bank([nn.Linear(3, 3)])
    with pytest.raises(ValueError, match="layers is empty"):
        adapter_bank([])


def test_the_layers_of_one_forward_share_one_segment_table(monkeypatch):
    import smoa.multi as multi

    built = []
    original = multi.build_segments
    monkeypatch.setattr(multi, "build_segments", lambda index, n: built.append(n) or original(index, n))
    model = model_with_adapters()
    x = inputs(shape=(3,))
    with torch.no_grad(), smoa.use_backend("triton"):
        first = model(x, adapter_names=MIXES["all-three-and-base"])
        assert len(built) == 1  # lin0 and lin1: one table for the batch
        model(x, adapter_names=MIXES["one-adapter"])  # other names: a new table
        assert len(built) == 2
        again = model(x, adapter_names=list(MIXES["all-three-and-base"]))  # equal names (another list): rebuilt or
    torch.testing.assert_close(again, first, atol=0, rtol=0)  # reused, the same table and the same outputs


def test_generate_with_adapter_names_takes_one_pass_per_layer(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    calls = []
    original = triton_multi.multi_adapter_forward
    monkeypatch.setattr(triton_multi, "multi_adapter_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(seeded(0))
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)  # fmt: skip
    smoa_config = {"r": 4, "num_blocks": 2, "target_modules": ["q_proj", "v_proj"], "init_weights": False}
    model = get_peft_model(LlamaForCausalLM(config), SMoAConfig(**smoa_config), adapter_name="a")
    model.add_adapter("b", SMoAConfig(**smoa_config))
    model.eval()
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(seeded(1)))
    names = ["a", "__base__", "b"]
    options = {"max_new_tokens": 2, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        with smoa.use_backend("triton"):
            out = model.generate(input_ids=ids, adapter_names=names, **options)
        assert calls  # q_proj and v_proj took the one-pass kernel at every step
        with smoa.use_backend("torch"):  # the per-sub-batch loop
            loop = model.generate(input_ids=ids, adapter_names=names, **options)
    first, first_loop = out.scores[0], loop.scores[0]
    torch.testing.assert_close(first, first_loop, atol=1e-4 * float(first_loop.abs().max()), rtol=1e-4)
