"""pytest plugin for PEFT's generic suite on SMoA (``python -m pytest tests/peft_generic``; see test_peft_generic.py).

- The suite is collected only when asked for (a path inside ``tests/peft_generic`` on the command line), so the
  main ``python -m pytest`` run neither downloads PEFT's tests nor runs them twice.
- Of PEFT's test classes only the tests parametrized with our rows are kept; PEFT's method-specific tests (LoRA,
  DoRA, ...) that take no row are deselected, and the carve-outs of ``test_peft_generic.CARVE_OUTS`` are marked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SUITE = "test_peft_generic.py"


def _asked_for(config: pytest.Config) -> bool:
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        path = (base / arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config):
    if collection_path.resolve() == HERE / SUITE and not _asked_for(config):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        if Path(str(item.path)).resolve() != HERE / SUITE:
            keep.append(item)
            continue
        selected = item.module.selection(item)  # the suite module (it was imported, or there would be no items)
        if selected is None:
            drop.append(item)
            continue
        reason, strict = selected
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=strict))
        keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
