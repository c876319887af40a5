"""Fetch PEFT's own generic test files of the installed (pinned) peft version from its source distribution on PyPI.

``pip download peft==<version> --no-deps --no-binary :all:`` (pip checks the archive against PyPI's hashes), then
only ``tests/test_custom_models.py``, ``tests/testing_common.py`` and ``tests/testing_utils.py`` are extracted, into
``$SMOA_PEFT_TESTS_CACHE`` (default ``~/.cache/smoa/peft-tests``) ``/peft-<version>/peft_tests/`` as a package (the
files import each other relatively). Nothing of PEFT's test code is stored in this repository; a second run uses the
cache and needs no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TEST_FILES = ("test_custom_models.py", "testing_common.py", "testing_utils.py")
PACKAGE = "peft_tests"


class FetchError(RuntimeError):
    """``pip download`` failed (PyPI unreachable): the suite is skipped. A downloaded sdist without the expected
    files raises ``RuntimeError`` instead (a collection error, not a skip)."""


def cache_root() -> Path:
    return Path(os.environ.get("SMOA_PEFT_TESTS_CACHE", Path.home() / ".cache" / "smoa" / "peft-tests"))


def fetch_peft_tests(version: str, timeout: float = 300.0) -> Path:
    """The folder to put on ``sys.path`` so that ``import peft_tests.test_custom_models`` works (downloads once)."""
    target = cache_root() / f"peft-{version}"
    package = target / PACKAGE
    if all((package / name).is_file() for name in (*TEST_FILES, "__init__.py")):
        return target
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", f"peft=={version}", "--no-deps", "--no-binary", ":all:"]
        command += ["-d", download, "--quiet", "--disable-pip-version-check", "--retries", "2", "--timeout", "20"]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            output = getattr(error, "stderr", "") or ""
            raise FetchError(f"`{' '.join(command)}` failed: {output.strip()[-500:] or error}") from error
        archives = sorted(Path(download).glob(f"peft-{version}.tar.gz"))
        if not archives:
            raise RuntimeError(f"pip download left no peft-{version}.tar.gz in {download}")
        cache_root().mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_root()))
        try:
            _extract(archives[0], version, staging / PACKAGE)
            if target.exists():  # a partial earlier extraction
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _extract(archive_path: Path, version: str, package: Path) -> None:
    """Only the three test files, written as plain bytes (no tar member is extracted as a path)."""
    with tarfile.open(archive_path) as archive:
        members = {f"peft-{version}/tests/{name}": name for name in TEST_FILES}
        found = {m.name: m for m in archive.getmembers() if m.name in members and m.isfile()}
        missing = sorted(set(members) - set(found))
        if missing:
            raise RuntimeError(f"the peft {version} sdist has no {missing}")
        package.mkdir(parents=True, exist_ok=True)
        for member_name, name in members.items():
            (package / name).write_bytes(archive.extractfile(found[member_name]).read())
    (package / "__init__.py").write_text(f'"""PEFT {version} tests/ (fetched from PyPI by smoa)."""\n')
