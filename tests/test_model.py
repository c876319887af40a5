"""apply_smoa / merge_smoa: whole-model patching without PEFT."""

import pytest
import torch
import torch.nn as nn

from smoa import SMoALinear, apply_smoa, merge_smoa, smoa_layers
from tests.utils import seeded


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.norm(x + self.q_proj(x) * torch.sigmoid(self.v_proj(x)))
        return h + self.down(torch.relu(self.up(h)))


class TinyLM(nn.Module):
    def __init__(self, d=16, vocab=11):
        super().__init__()
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)

    def get_output_embeddings(self):
        return self.lm_head


def make_model(seed=0):
    torch.manual_seed(seeded(seed))
    return TinyLM()


def test_list_targets_match_name_suffixes_and_freeze_the_rest():
    model = make_model()
    replaced = apply_smoa(model, ["q_proj", "v_proj"], r=4, num_blocks=2)
    assert replaced == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert set(smoa_layers(model)) == set(replaced)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.smoa_{f}.weight" for name in replaced for f in "AB"}
    assert sum(model.get_parameter(n).numel() for n in trainable) == 4 * 4 * (16 + 16) // 2


def test_regex_and_all_linear_excluding_output_embeddings():
    model = make_model()
    assert apply_smoa(model, r"layers\.1\.(up|down)", r=2) == ["layers.1.up", "layers.1.down"]
    model = make_model()
    replaced = apply_smoa(model, "all-linear", r=2)
    assert "lm_head" not in replaced and len(replaced) == 8
    model = make_model()
    replaced = apply_smoa(model, "all-linear", r=2, exclude_modules=["down"])
    assert len(replaced) == 6 and not any(n.endswith("down") for n in replaced)


def test_adapted_model_trains_and_merge_smoa_gives_plain_linears_with_equal_outputs():
    model = make_model()
    apply_smoa(model, "all-linear", r=4, num_blocks=2, init_weights=False)
    x = torch.randn(3, 5, 16)
    loss = model(x).pow(2).mean()
    loss.backward()
    for layer in smoa_layers(model).values():
        assert layer.smoa_A.weight.grad is not None and layer.smoa_A.weight.grad.abs().sum() > 0
        assert layer.smoa_B.weight.grad is not None and layer.smoa_B.weight.grad.abs().sum() > 0
    with torch.no_grad():
        y = model(x)
        merge_smoa(model)
        y_merged = model(x)
    assert not smoa_layers(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("proj", "up", "down")))
    torch.testing.assert_close(y_merged, y, rtol=1e-5, atol=1e-5)


def test_second_apply_keeps_earlier_adapters_trainable():
    model = make_model()
    apply_smoa(model, ["q_proj"], r=2)
    apply_smoa(model, ["v_proj"], r=2)
    assert all(layer.smoa_A.weight.requires_grad for layer in smoa_layers(model).values())
    assert len(smoa_layers(model)) == 4


@pytest.mark.parametrize(
    "targets, error, match",
    [
        (["q_proj", "k_proj"], ValueError, "target_modules entry 'k_proj' matches no module"),
        (r"layers\.\d+\.nothing", ValueError, "matches no module"),
        (["norm"], TypeError, "'layers.0.norm' is a LayerNorm; SMoA supports torch.nn.Linear only"),
        ([], ValueError, "must name at least one module"),
    ],
)
def test_bad_targets_leave_the_model_unchanged(targets, error, match):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error, match=match):
        apply_smoa(model, targets, r=2)
    assert not smoa_layers(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_hyper_parameter_leaves_the_model_unchanged():
    model = make_model()
    with pytest.raises(ValueError, match="num_blocks=0"):
        apply_smoa(model, ["q_proj", "v_proj"], r=3, num_blocks=0)
    assert not smoa_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_already_adapted_module_is_refused():
    model = make_model()
    apply_smoa(model, ["q_proj"], r=2)
    with pytest.raises(ValueError, match="already carries an SMoA adapter"):
        apply_smoa(model, ["q_proj"], r=2)
    assert isinstance(model.layers[0].q_proj, SMoALinear)
