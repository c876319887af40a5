"""PEFT's own generic tests (``tests/test_custom_models.py`` of the installed peft version) run on SMoA, and on PEFT's
HiRA with :func:`smoa.apply_smoa_to_hira` on.

The three test files come from the peft sdist on PyPI at test time (:mod:`tests.peft_generic.fetch`; cached, so a
rerun is offline). PEFT's row tables are replaced, in place and before collection, by ours: the ``TEST_CASES`` of
``TestPeftCustomModel``, ``ALL_PEFT_CONFIG_CLASSES``, ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` of
``TestMultipleActiveAdapters`` and ``MIXED_ADAPTER_TEST_CASES`` of ``TestMixedAdapterBatches``. PEFT's tests that
take none of these rows are method-specific (LoRA, DoRA, ...) and are deselected by ``conftest.py``.

Run: ``python -m pytest tests/peft_generic -q``. Carve-outs: :data:`CARVE_OUTS`, listed in docs/testing.md.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft", reason="PEFT's generic suite needs the [peft] extra")

from tests.peft_generic.fetch import FetchError, fetch_peft_tests  # noqa: E402

try:
    _ROOT = fetch_peft_tests(peft.__version__)
except FetchError as _error:
    pytest.skip(f"PyPI is unreachable, so PEFT's tests cannot be fetched: {_error}", allow_module_level=True)
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

if "diffusers" not in sys.modules and importlib.util.find_spec("diffusers") is None:
    # testing_common imports diffusers' StableDiffusionPipeline at its top for its Stable Diffusion tests, which are
    # not run here; diffusers is not a dependency of smoa, so a placeholder module stands in for the import only.
    _diffusers = types.ModuleType("diffusers")
    _diffusers.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})
    sys.modules["diffusers"] = _diffusers

import torch  # noqa: E402
from peft import HiraConfig  # noqa: E402
from peft_tests import test_custom_models as peft_suite  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: F401, E402

import smoa  # noqa: E402
from smoa.peft import SMoAConfig  # noqa: E402

# ---- our rows ------------------------------------------------------------------------------------------------------
# MLP: lin0 10→20, lin1 20→2 (bias); "MLP no bias": the same without bias (peft_suite.MLP(bias=False));
# EmbConv1D: a transformers Conv1D 5→1 (d_out = 1, so K = 1 only).
SMOA_ROWS = [
    ("Vanilla MLP 1 SMoA", "MLP", SMoAConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 SMoA K=1", "MLP", SMoAConfig, {"target_modules": ["lin0"], "num_blocks": 1, "r": 4}),
    ("Vanilla MLP 3 SMoA", "MLP", SMoAConfig, {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 SMoA", "MLP", SMoAConfig, {"target_modules": ["lin0", "lin1"], "r": 4}),
    ("Vanilla MLP 5 SMoA", "MLP", SMoAConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 SMoA", "MLP", SMoAConfig, {"target_modules": ["lin0", "lin1"], "lora_dropout": 0.1}),
    ("MLP no bias SMoA", "MLP no bias", SMoAConfig, {"target_modules": ["lin0", "lin1"]}),
    ("MLP no bias SMoA K=1", "MLP no bias", SMoAConfig, {"target_modules": ["lin0", "lin1"], "num_blocks": 1}),
    ("Embedding + transformers Conv1D SMoA", "EmbConv1D", SMoAConfig, {"target_modules": ["conv1d"], "num_blocks": 1}),
]
SMOA_NAMES = {row[0] for row in SMOA_ROWS}
# PEFT's own HiRA rows on Linear/Conv1D targets, run with smoa.apply_smoa_to_hira() on (the Embedding ones too: an
# Embedding HiRA layer is not accelerated, the Linear/Conv1D ones beside it are)
HIRA_ROWS = [row for row in peft_suite.TEST_CASES if row[2] is HiraConfig and row[1] in ("MLP", "EmbConv1D")]
HIRA_ROWS = [row for row in HIRA_ROWS if row[3].get("target_modules") != ["emb"]]
HIRA_NAMES = {row[0] for row in HIRA_ROWS}

MULTI_ROWS = [
    ("SMoA Same", "smoa", SMoAConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin0"], "init_weights": False}),
    ("SMoA Different", "smoa", SMoAConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin1"], "init_weights": False}),
    ("SMoA Same K=1", "smoa", SMoAConfig, {"target_modules": ["lin0"], "init_weights": False, "num_blocks": 1},
     {"target_modules": ["lin0"], "init_weights": False, "num_blocks": 1}),
    *[row for row in peft_suite.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES if row[2] is HiraConfig],
]  # fmt: skip
MIXED_ROWS = [
    ("SMoA mixed adapter", SMoAConfig(target_modules=["lin0"], init_weights=False),
     SMoAConfig(target_modules=["lin0"], r=16, init_weights=False)),
]  # fmt: skip

peft_suite.TEST_CASES[:] = SMOA_ROWS + HIRA_ROWS
peft_suite.ALL_PEFT_CONFIG_CLASSES[:] = [HiraConfig, SMoAConfig]
peft_suite.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES[:] = MULTI_ROWS
peft_suite.MIXED_ADAPTER_TEST_CASES[:] = MIXED_ROWS
OUR_ROW_NAMES = SMOA_NAMES | HIRA_NAMES | {row[0] for row in MULTI_ROWS} | {row[0] for row in MIXED_ROWS}

_from_pretrained = peft_suite.MockTransformerWrapper.from_pretrained.__func__


@classmethod
def _with_our_models(cls, model_id, dtype=None):
    if model_id == "MLP no bias":
        torch.manual_seed(0)
        return peft_suite.MLP(bias=False).to(dtype or torch.float32)
    return _from_pretrained(cls, model_id, dtype)


peft_suite.MockTransformerWrapper.from_pretrained = _with_our_models

# ---- carve-outs: (test function name, predicate on the row name, reason) --------------------------------------------
# Deterministic failures are strict (an XPASS fails the run, so a carve-out that is no longer needed is noticed).
CARVE_OUTS: list[tuple[str, object, str, bool]] = [
    (
        "test_only_params_are_updated",
        lambda row: row == "Embedding + transformers Conv1D SMoA",
        "W0-scaled gradients: the Conv1D's W0 ~ N(0, 0.02) scales every SMoA gradient (ΔW = (BA) ⊙ W0), so 3 SGD "
        "steps at PEFT's lr = 0.5 move A by ~1e-4, under the test's tolerance; PEFT raises the lr to 100 for HiRA "
        "for the same reason (the MLP rows, W0 ~ U(±0.3), pass at lr = 0.5)",
        True,
    ),
    *[
        (
            name,
            lambda row: row in SMOA_NAMES or "SMoA" in str(row),
            "safetensors only: smoa refuses to write (and to read) a pickle adapter_model.bin for SMoA, which can run "
            "code; PEFT's test saves with safe_serialization=False, which raises a ValueError naming it",
            True,
        )
        for name in ("test_save_pretrained_pickle", "test_save_pretrained_selected_adapters_pickle")
    ],
]


def selection(item: pytest.Item) -> tuple[str, bool] | None:
    """``None``: not one of ours (deselect); ``("", _)``: run; ``(reason, strict)``: run as an expected failure."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    row = params.get("test_name")
    config_cls = params.get("config_cls")
    if row not in OUR_ROW_NAMES and not (row is None and config_cls in (HiraConfig, SMoAConfig)):
        return None
    name = item.originalname if hasattr(item, "originalname") else item.name
    for function, applies, reason, strict in CARVE_OUTS:
        if function == name and applies(row or config_cls.__name__):
            return reason, strict
    return "", False


@pytest.fixture(autouse=True, scope="module")
def _hira_accelerated():
    """Every PEFT HiRA Linear created in this module runs smoa's forward (the HiRA rows test smoa.accelerate)."""
    smoa.apply_smoa_to_hira()
    yield
    smoa.revert_smoa_to_hira()


TestPeftCustomModel = peft_suite.TestPeftCustomModel
TestMultipleActiveAdapters = peft_suite.TestMultipleActiveAdapters
TestMixedAdapterBatches = peft_suite.TestMixedAdapterBatches
